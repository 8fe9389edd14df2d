"""Stage 2: bridge losses, save/reload exactness, 2-rank DeepSpeed training with resume, `scmm generate`."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from conftest import launch_ranks, read_metrics, save_tiny_stage1

N_QUERIES = 4


# --- fixtures: a tiny stage-1 model and a tiny LLM ---------------------------------------------------------
@pytest.fixture(scope="session")
def tiny_stage1(tmp_path_factory, small_corpus: Path) -> Path:
    return save_tiny_stage1(small_corpus, tmp_path_factory.mktemp("stage1") / "model", d_model=32,
                            num_queries=N_QUERIES, embed_dim=32, max_len=16)


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory, small_corpus: Path) -> Path:
    from scmm.data_pipeline.instructions import PROMPTS
    from scmm.data_pipeline.store import Corpus
    from scmm.model.llm import LlamaSize, build_llama, train_tokenizer
    folder = tmp_path_factory.mktemp("lm") / "lm"
    corpus = Corpus(small_corpus)
    texts = [str(t) for s in corpus.iter_shards("train", columns=("text",)) for t in s.obs["text"]]
    texts += [p for ps in PROMPTS.values() for p in ps] + ["B cell", "T cell", "natural killer cell", "blood"]
    tokenizer = train_tokenizer(texts, folder, vocab_size=400)
    torch.manual_seed(0)
    model = build_llama(LlamaSize(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  num_key_value_heads=2, max_position_embeddings=512), len(tokenizer))
    model.save_pretrained(folder)
    return folder


def _stage2_config(tmp_path: Path, corpus: Path, stage1: Path, lm: Path, out: str, steps: int,
                   bridge: dict | None = None, **train) -> Path:
    cfg = {
        "name": "test", "corpus": str(corpus), "stage1": str(stage1), "lm": str(lm), "out": str(tmp_path / out),
        "seed": 0,
        "model": {"lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
                  "bridge": {"decoder_hidden": 32, **(bridge or {})}, "max_length": 160},
        "data": {"tasks": ["describe", "cell_type", "tissue"], "n_hvg": 12},
        "loader": {"batch_size": 4, "shuffle_buffer": 64},
        "train": {"steps": steps, "lr": 3e-3, "warmup_steps": 1, "log_every": 1, "save_every": 2,
                  "precision": "fp32", **train},
        "refit": {"steps": 5, "batch_size": 4, "log_every": 2},
    }
    path = tmp_path / f"{out}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _build(small_corpus: Path, tiny_stage1: Path, tiny_lm: Path, tmp_path: Path, bridge: dict | None = None):
    from scmm.data_pipeline.store import Corpus
    from scmm.finetune.pairs import PairBuilder, hvg_info
    from scmm.finetune.train import load_config
    from scmm.model.stage2 import Stage2Model, reader_info
    cfg = load_config(str(_stage2_config(tmp_path, small_corpus, tiny_stage1, tiny_lm, "m", 1, bridge)))
    corpus = Corpus(small_corpus)
    hvg = hvg_info(corpus, cfg.data.n_hvg)
    torch.manual_seed(0)
    model = Stage2Model.build(cfg.model, cfg.stage1, cfg.lm, hvg, reader=reader_info(corpus))
    pairs = PairBuilder(corpus, "train", cfg.data.tasks, 0, np.asarray(hvg["indices"]), model.builder)
    model.decoder.init_from_profiles(pairs.x)
    return cfg, corpus, model, pairs


def _loader_batch(corpus, stage1: Path, split: str = "train", batch_size: int = 8) -> dict:
    """A batch encoded as the stage-1 model reads cells (its saved encoding and vocabulary)."""
    from scmm.data_pipeline.encoding import CellEncoding
    from scmm.data_pipeline.loader import CorpusLoader, LoaderConfig
    from scmm.data_pipeline.vocab import GeneVocab
    cfg = LoaderConfig(batch_size=batch_size, shuffle=False)
    vocab = GeneVocab.load(stage1 / "cell_tower" / "vocab.json")
    return next(iter(CorpusLoader(corpus, split, cfg, CellEncoding.load(stage1), vocab)))


def _fit(model, batch: dict, steps: int, lr: float) -> None:
    """A few AdamW steps of the stage-2 losses on one batch (enough to move every trained weight)."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        model(batch)["loss"].backward()
        opt.step()


# --- losses ------------------------------------------------------------------------------------------------
def test_bridge_mlps_keep_reading_their_input_when_every_preactivation_is_negative():
    """A LayerNorm before each GELU: a large negative shift of the first layer (what a few big steps can do)
    still leaves the decoder's and the projector's outputs depending on their input."""
    from scmm.model.bridge import CellProjector, PseudoCellDecoder
    torch.manual_seed(0)
    dec = PseudoCellDecoder(n_queries=2, d_query=8, n_genes=5, hidden=16)
    proj = CellProjector(8, 12)
    with torch.no_grad():
        dec.body[0].bias.fill_(-100.0)
        proj.mlp[1].bias.fill_(-100.0)
    a, b = torch.randn(2, 2, 8), torch.randn(2, 2, 8)
    assert (dec(a)[0] - dec(b)[0]).abs().max() > 1e-3
    assert (proj(a) - proj(b)).abs().max() > 1e-4


def test_forward_losses_finite_and_each_decreases(small_corpus, tiny_stage1, tiny_lm, tmp_path):
    from scmm.model.stage2 import LOSSES
    torch.set_num_threads(1)
    cfg, corpus, model, pairs = _build(small_corpus, tiny_stage1, tiny_lm, tmp_path)
    raw = _loader_batch(corpus, tiny_stage1)
    batch = pairs(raw, step=0, rank=0)
    # the c2t labels cover the answer and eos only; the slot positions hold the slot tokens
    c2t = batch["c2t"]
    assert (c2t["labels"][c2t["attention_mask"] == 0] == -100).all()
    slots = torch.gather(c2t["input_ids"], 1, c2t["slot_positions"])
    assert (slots == torch.tensor(model.cell_tokens.slot_ids)).all()
    assert (torch.gather(c2t["labels"], 1, c2t["slot_positions"]) == -100).all()
    assert batch["hvg"].shape == (8, len(model.hvg["indices"]))
    # frozen stage 1, LoRA: the base LLM's weights and the stage-1 weights are not trained
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert not any(n.startswith("aligner.") for n in trained)
    assert any("lora_" in n for n in trained) and any("trainable_tokens" in n or "token_adapter" in n for n in trained)
    assert not any(n.endswith("q_proj.base_layer.weight") for n in trained)

    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    history = []
    for _ in range(12):
        out = model(batch)
        assert all(torch.isfinite(out[k]) for k in (*LOSSES, "loss"))
        history.append({k: float(out[k].detach()) for k in LOSSES})
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    for k in LOSSES:
        assert history[-1][k] < history[0][k], (k, [h[k] for h in history])


@pytest.mark.parametrize("cell_embedding", [False, True])
def test_soft_tokens_read_the_cell_embedding_only_when_asked(small_corpus, tiny_stage1, tiny_lm, tmp_path,
                                                             cell_embedding):
    """bridge.cell_embedding: the projector reads [query state ; <cls> embedding] per slot; only the slot
    positions change with the cell, and without the option the <cls> embedding is ignored."""
    torch.set_num_threads(1)
    cfg, corpus, model, pairs = _build(small_corpus, tiny_stage1, tiny_lm, tmp_path, {"cell_embedding": cell_embedding})
    model.eval()
    d_q, d_cell = model.aligner.qformer.hidden_size, model.aligner.cell_tower.d_model
    assert model.projector.mlp[1].in_features == d_q + (d_cell if cell_embedding else 0)
    enc = model.builder.collate([model.builder.cell_to_text("Which cell type is this?", None)] * 2)
    torch.manual_seed(1)
    query = torch.randn(1, model.n_slots, d_q).expand(2, -1, -1)
    cell = torch.randn(2, d_cell)
    with torch.no_grad():
        embeds = model._embed_with_cells(enc["input_ids"], enc["slot_positions"], query, cell)
    slots = torch.zeros(embeds.shape[1], dtype=torch.bool)
    slots[enc["slot_positions"][0]] = True
    assert torch.equal(embeds[0, ~slots], embeds[1, ~slots])
    differ = (embeds[0, slots] - embeds[1, slots]).abs().amax(-1)
    assert bool((differ > 1e-4).all()) if cell_embedding else bool((differ == 0).all())


def test_program_reader_reads_the_panel_values_and_fits_a_hand_computed_ridge():
    """The reader's input is each cell's values over its genes, genes outside them, <cls> and padding left out;
    its fit standardises them and solves the ridge in closed form (hand-computed on uncorrelated genes)."""
    from scmm.model.bridge import ProgramReader
    reader = ProgramReader([7, 3, 5], n_programs=2)
    gene_ids = torch.tensor([[0, 3, 5, 9, 7], [0, 7, 3, 1, 1]])  # 0: <cls>; 9: beyond the panel; 1: padding
    values = torch.tensor([[0.0, 2.0, 4.0, 8.0, 0.0], [0.0, 1.0, 3.0, -2.0, -2.0]])
    padding = torch.tensor([[False, False, False, False, True], [False, False, False, True, True]])
    panel = reader.panel_values(gene_ids, values, padding)
    assert torch.equal(panel, torch.tensor([[0.0, 2.0, 4.0], [1.0, 3.0, 0.0]]))  # columns: genes 7, 3, 5
    # genes 7 and 3 uncorrelated with unit sd after centring, gene 5 twice gene 7's scale; y0 = 3 z7 + 1, y1 = 2
    x = torch.tensor([[1.0, 1.0, 2.0], [-1.0, 1.0, -2.0], [1.0, -1.0, 2.0], [-1.0, -1.0, -2.0]]) + 5.0
    y = torch.stack([3.0 * (x[:, 0] - 5.0) + 1.0, torch.full((4,), 2.0)], dim=1)
    fit = reader.fit([(x[:2], y[:2]), (x[2:], y[2:])], ridge=0.5)
    assert torch.allclose(reader.mean, torch.tensor([5.0, 5.0, 5.0]))
    assert torch.allclose(reader.std, torch.tensor([1.0, 1.0, 2.0]))
    # z7 = z5 (collinear), z3 alone: (Czz + 0.5 I) w = Czy with Czy = [3, 0, 3] gives w = [1.2, 0, 1.2]
    assert torch.allclose(reader.weight, torch.tensor([[1.2, 0.0, 1.2], [0.0, 0.0, 0.0]]), atol=1e-6)
    assert torch.allclose(reader.bias, torch.tensor([1.0, 2.0]))
    assert fit["n_cells"] == 4
    # program 0: 2.4 z7 explains 1 - (3 - 2.4)^2 / 9 = 0.96; program 1 is constant (0 variance explained)
    assert fit["r2"] == pytest.approx((0.96 + 0.0) / 2, abs=1e-6)
    cell = torch.tensor([[0, 7, 3, 5]]), torch.tensor([[0.0, 6.0, 5.0, 7.0]]), torch.zeros(1, 4, dtype=torch.bool)
    assert torch.allclose(reader(*cell), torch.tensor([[1.0 + 1.2 * 1.0 + 1.2 * 1.0, 2.0]]))


def test_program_reader_recovers_the_corpus_scores_of_unseen_cells(small_corpus, tiny_stage1, tiny_lm, tmp_path):
    """bridge.programs: fitted on the training cells, the reader predicts the corpus's program scores of val
    cells (the scores are linear in the log1p values it reads); each prompt, in training and at inference, starts
    with the predicted top programs; without facts in the corpus the option is an error."""
    from scmm.data_pipeline.encoding import CellEncoding
    from scmm.data_pipeline.fact_text import program_context
    from scmm.data_pipeline.loader import CorpusLoader, LoaderConfig
    from scmm.data_pipeline.vocab import GeneVocab
    from scmm.errors import ScmmError
    from scmm.eval.language import reader_metrics, split_facts
    from scmm.model.stage2 import Stage2Model
    torch.set_num_threads(1)
    cfg, corpus, model, pairs = _build(small_corpus, tiny_stage1, tiny_lm, tmp_path, {"programs": True})
    names = corpus.facts["programs"]["names"]
    assert model.program_names == names and len(names) > 0
    vocab = GeneVocab.load(tiny_stage1 / "cell_tower" / "vocab.json")

    def cells(split):
        return CorpusLoader(corpus, split, LoaderConfig.inference(64), CellEncoding.load(tiny_stage1), vocab,
                            training=False)
    fit = model.fit_readers(cells("train"), pairs.program_scores)["programs"]
    assert fit["n_cells"] == corpus.manifest["splits"]["train"] and fit["r2"] > 0.99
    truth = {str(c): row for e in corpus.shards("val") for c, row in
             zip(corpus.read_shard(e["name"], ("cell_id",)).obs["cell_id"], corpus.read_facts(e["name"])[0])}
    batch = next(iter(cells("val")))
    predicted = model.predict_programs(batch)
    true = np.stack([truth[str(c)] for c in batch["cell_id"]])
    assert float(((predicted - true) ** 2).mean()) < 0.01 * float(true.var())
    top = [names[int(j)] for j in np.argsort(-predicted[0], kind="stable")[:3]]
    context = program_context(top)
    assert context.startswith("Programs read from its expression: ")
    assert model.cell_prompts(batch, "Describe this cell.")[0] == f"{context} Describe this cell."
    train = next(iter(cells("train")))
    pairs.contexts = dict(zip(train["cell_id"], model.cell_contexts(train)))
    first = {k: train[k][:1] for k in ("gene_ids", "values", "padding_mask", "cell_id", "text")}
    assert pairs.contexts[train["cell_id"][0]] in model.tokenizer.decode(pairs(first, 0, 0)["c2t"]["input_ids"][0])
    # eval's `language.reader`: the prediction ranks the val cells of high program activity first
    val = split_facts(corpus, "val")
    figures = reader_metrics(model, corpus, "val", val)
    assert figures["auroc"] > 0.95 and figures["top_precision"] == 1.0  # one program: its top is always right
    assert "marker_precision" not in figures
    with pytest.raises(ScmmError, match="per-cell facts"):
        Stage2Model.build(cfg.model, cfg.stage1, cfg.lm, model.hvg, reader=None)


def test_marker_reader_picks_the_corpus_statistic_on_a_hand_computed_fixture():
    """The marker reader's moments are the training cells' mean, population sd and detected share; it picks the
    genes the cell expresses with z > 0 among those at least min_detection of training cells express, highest z
    first, ties to the lower column, -1 where fewer qualify."""
    from scmm.model.bridge import MarkerReader
    reader = MarkerReader([4, 2, 6, 8], min_detection=0.5)  # columns: genes 4, 2, 6, 8
    train = torch.tensor([[1.0, 0.0, 2.0, 0.0], [3.0, 2.0, 2.0, 0.0], [1.0, 2.0, 2.0, 0.0], [3.0, 0.0, 2.0, 4.0]])
    fit = reader.fit([train[:3], train[3:]])
    assert torch.allclose(reader.mean, torch.tensor([2.0, 1.0, 2.0, 1.0]))
    assert torch.allclose(reader.std, torch.tensor([1.0, 1.0, 0.0, 3.0 ** 0.5]))
    assert torch.allclose(reader.detected, torch.tensor([1.0, 0.5, 1.0, 0.25]))
    # gene 6 has sd 0 and gene 8 is expressed by a quarter of the cells: neither can be a marker
    assert fit == {"n_cells": 4, "n_eligible": 2}
    gene_ids = torch.tensor([[0, 4, 2, 6, 8], [0, 4, 2, 6, 8], [0, 2, 4, 1, 1]])  # 0: <cls>; 1: padding
    values = torch.tensor([[0.0, 3.0, 2.0, 9.0, 9.0], [0.0, 5.0, 2.0, 1.0, 1.0], [0.0, 0.0, 1.0, 7.0, 7.0]])
    padding = torch.tensor([[False] * 5, [False] * 5, [False, False, False, True, True]])
    # cell 0: z(4) = 1, z(2) = 1 (a tie: the lower column first); cell 1: z(4) = 3, z(2) = 1;
    # cell 2: gene 2 not expressed, gene 4 at its mean (z = 0): nothing qualifies
    assert reader(gene_ids, values, padding, k=3).tolist() == [[0, 1, -1], [0, 1, -1], [-1, -1, -1]]
    assert reader.vocab_ids() == [4, 2, 6, 8]


def test_marker_reader_finds_the_corpus_markers_and_the_prompt_names_them(small_corpus, tiny_stage1, tiny_lm,
                                                                          tmp_path):
    """bridge.markers: fitted on the training cells' log1p values (the demo's encoding), the reader picks exactly
    the corpus's stored top-20 markers of val cells; each prompt, in training and at inference, names the first 3
    with their NCBI names; eval's `language.reader` scores them."""
    from scmm.data_pipeline.encoding import CellEncoding
    from scmm.data_pipeline.fact_text import marker_context
    from scmm.data_pipeline.loader import CorpusLoader, LoaderConfig
    from scmm.data_pipeline.vocab import GeneVocab
    from scmm.eval.language import reader_metrics, split_facts
    torch.set_num_threads(1)
    assert CellEncoding.load(tiny_stage1).n_bins == 0
    cfg, corpus, model, pairs = _build(small_corpus, tiny_stage1, tiny_lm, tmp_path, {"markers": True})
    assert model.reader is None and len(model.marker_genes) == len(corpus.gene_symbols)
    vocab = GeneVocab.load(tiny_stage1 / "cell_tower" / "vocab.json")

    def cells(split):
        return CorpusLoader(corpus, split, LoaderConfig.inference(64), CellEncoding.load(tiny_stage1), vocab,
                            training=False)
    fit = model.fit_readers(cells("train"), pairs.program_scores)
    assert set(fit) == {"markers"} and fit["markers"]["n_cells"] == corpus.manifest["splits"]["train"]
    val = split_facts(corpus, "val")
    stored = dict(zip(val.cell_ids, val.marker_symbols(20)))
    batch = next(iter(cells("val")))
    picked = model.predict_markers(batch, k=20)
    assert sum(len(p) for p in picked) > 0
    for cid, genes in zip(batch["cell_id"], picked):
        assert [s for s, _ in genes] == stored[str(cid)], cid
    first = model.predict_markers(batch)[0]
    assert model.cell_contexts(batch)[0] == marker_context(first)
    assert all(name for _, name in first)  # the fixture's genes all have NCBI names
    train = next(iter(cells("train")))
    pairs.contexts = dict(zip(train["cell_id"], model.cell_contexts(train)))
    one = {k: train[k][:1] for k in ("gene_ids", "values", "padding_mask", "cell_id", "text")}
    assert pairs.contexts[train["cell_id"][0]] in model.tokenizer.decode(pairs(one, 0, 0)["c2t"]["input_ids"][0])
    assert reader_metrics(model, corpus, "val", val) == {"marker_precision": 1.0}


def test_answer_mean_counts_each_answer_once(small_corpus, tiny_stage1, tiny_lm, tmp_path):
    """loss.lm_mean: `token` averages over every answer token of the batch, `answer` averages each answer's
    tokens first; both equal what each sequence alone gives, weighted by its tokens or not."""
    torch.set_num_threads(1)
    cfg, corpus, model, pairs = _build(small_corpus, tiny_stage1, tiny_lm, tmp_path)
    model.eval()
    answers = ["B cell", "A natural killer cell from the blood of a healthy donor, sequenced with 10x."]
    items = [model.builder.cell_to_text("Which cell type is this?", a) for a in answers]
    torch.manual_seed(2)
    query, cell = torch.randn(2, model.n_slots, model.aligner.qformer.hidden_size), torch.randn(2, 4)

    def loss(rows: list[int], mean: str) -> float:
        model.config.loss.lm_mean = mean
        enc = model.builder.collate([items[i] for i in rows])
        with torch.no_grad():
            embeds = model._embed_with_cells(enc["input_ids"], enc["slot_positions"], query[rows], cell[rows])
            return float(model.answer_loss(embeds, enc["attention_mask"], enc["labels"]))

    n = [sum(1 for t in it["labels"] if t != -100) for it in items]
    assert n[0] < n[1]
    alone = [loss([0], "token"), loss([1], "token")]
    assert loss([0], "answer") == pytest.approx(alone[0], rel=1e-5)
    assert loss([0, 1], "answer") == pytest.approx((alone[0] + alone[1]) / 2, rel=1e-4)
    assert loss([0, 1], "token") == pytest.approx((n[0] * alone[0] + n[1] * alone[1]) / sum(n), rel=1e-4)


def test_answer_logprobs_are_the_training_loss_of_each_answer(trained_stage2, small_corpus, tiny_stage1):
    """The score of a candidate answer is minus the summed answer loss (its tokens and eos) that training reads,
    cell by cell; the probabilities over every answer the LLM could give sum to at most 1."""
    from scmm.data_pipeline.instructions import prompt_for
    from scmm.model.stage2 import Stage2Model
    model = Stage2Model.from_pretrained(trained_stage2)
    batch = _loader_batch(small_corpus, tiny_stage1, "val", batch_size=4)
    answers = ["B cell", "natural killer cell", "CD14-positive monocyte"]
    scores = model.answer_logprobs(batch, answers)
    assert scores.shape == (4, 3) and (scores < 0).all()
    model.config.loss.lm_mean = "token"
    with torch.no_grad():
        query, cell = model.encode(batch["gene_ids"], batch["values"], batch["padding_mask"])
        for j, answer in enumerate(answers):
            item = model.builder.cell_to_text(prompt_for("cell_type", 0), answer)
            n_tokens = sum(1 for t in item["labels"] if t != -100)
            for i in range(4):
                enc = model.builder.collate([item])
                embeds = model._embed_with_cells(enc["input_ids"], enc["slot_positions"], query[i:i + 1],
                                                 cell[i:i + 1])
                loss = float(model.answer_loss(embeds, enc["attention_mask"], enc["labels"]))
                assert scores[i, j] == pytest.approx(-loss * n_tokens, rel=1e-4, abs=1e-4)
    assert (np.exp(scores).sum(1) <= 1.0 + 1e-6).all()


@pytest.mark.parametrize("mean", ["token", "answer"])
def test_length_grouped_answer_loss_equals_one_padded_batch(small_corpus, tiny_stage1, tiny_lm, tmp_path, mean):
    """Training runs short and long answers as two groups cut to their own length: the same loss (and gradients)
    as one padded batch, for either averaging."""
    torch.set_num_threads(1)
    cfg, corpus, model, pairs = _build(small_corpus, tiny_stage1, tiny_lm, tmp_path)
    model.eval()
    model.config.loss.lm_mean = mean
    answers = ["B cell", "A natural killer cell from the blood of a healthy donor, sequenced with 10x.", "T cell",
               "A monocyte from the blood.", "NK cell", "A CD14-positive monocyte that expresses CD14 and CD16."]
    enc = model.builder.collate([model.builder.cell_to_text("Which cell type is this?", a) for a in answers])
    torch.manual_seed(3)
    query = torch.randn(6, model.n_slots, model.aligner.qformer.hidden_size, requires_grad=True)
    cell = torch.randn(6, 4)
    one = model.answer_loss(model._embed_with_cells(enc["input_ids"], enc["slot_positions"], query, cell),
                            enc["attention_mask"], enc["labels"])
    (g_one,) = torch.autograd.grad(one, query)
    grouped = model._grouped_answer_loss(enc, query, cell)
    (g_grouped,) = torch.autograd.grad(grouped, query)
    assert float(grouped.detach()) == pytest.approx(float(one.detach()), rel=1e-5)
    torch.testing.assert_close(g_grouped, g_one, rtol=1e-4, atol=1e-6)


def test_length_grouped_slot_states_equal_one_padded_batch(small_corpus, tiny_stage1, tiny_lm, tmp_path):
    """The text -> cell sequences (a cell's long caption mixed with short program queries) run as two groups cut to
    their own length: the same slot states and gradients as one padded batch, each row in its place; and
    :meth:`mapped_states`, which batches texts by length, keeps the order of its texts."""
    torch.set_num_threads(1)
    cfg, corpus, model, pairs = _build(small_corpus, tiny_stage1, tiny_lm, tmp_path)
    model.eval()
    texts = ["B cell with high interferon response.",
             "A natural killer cell from the blood of a healthy donor. Its transcriptome points to apical surface, "
             "myogenesis and allograft rejection; it shows strong expression of KLRC2 and XCL2.",
             "T cell with low hypoxia.", "A monocyte from the blood of a healthy donor, sequenced with 10x 3' v1.",
             "NK cell."]
    enc = model.builder.collate([model.builder.text_to_cell(t) for t in texts], padding_side="right")
    assert len(set(enc["attention_mask"].sum(1).tolist())) == len(texts)  # every row padded differently
    weight = next(p for p in model.t2c_head.parameters() if p.requires_grad)
    one = model.slot_states(enc["input_ids"], enc["attention_mask"], enc["slot_positions"])
    (g_one,) = torch.autograd.grad(one.square().sum(), weight)
    grouped = model._grouped_slot_states(enc)
    (g_grouped,) = torch.autograd.grad(grouped.square().sum(), weight)
    torch.testing.assert_close(grouped, one, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_grouped, g_one, rtol=1e-4, atol=1e-6)
    one_by_one = torch.cat([model.mapped_states([t]) for t in texts])  # each text alone: no padding, no reordering
    torch.testing.assert_close(model.mapped_states(texts, batch_size=2), one_by_one, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("key,value,message", [("model", {"loss": {"lm_mean": "sentence"}}, "lm_mean"),
                                               ("refit", {"step": 10}, "refit.step"),
                                               ("refit", {"steps": -1}, "steps >= 0")])
def test_stage2_config_rejects_bad_loss_and_refit_keys(small_corpus, tiny_stage1, tiny_lm, tmp_path, key, value,
                                                      message):
    from scmm.errors import ScmmError
    from scmm.finetune.train import load_config
    path = _stage2_config(tmp_path, small_corpus, tiny_stage1, tiny_lm, "bad", 1)
    cfg = yaml.safe_load(path.read_text())
    cfg[key] = value
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ScmmError, match=message):
        load_config(str(path))


def _pairs_loss(model, pairs) -> float:
    """decode_llm (MSE + 0.1 NLL) of the decoder on every training pair's mapped description."""
    from scmm.model.bridge import decoder_loss
    with torch.no_grad():
        return float(decoder_loss(model.decoder(model.mapped_states(pairs.text_pool)[pairs.text_index]), pairs.x, 0.1))


def test_decoder_refit_trains_the_decoder_alone_on_each_description_once(small_corpus, tiny_stage1, tiny_lm,
                                                                          tmp_path):
    from scmm.finetune.refit import RefitOptions, refit_decoder
    torch.set_num_threads(1)
    opts = RefitOptions(steps=150, batch_size=8, lr=1e-2, log_every=50)
    decoders = []
    for run in ("a", "b"):
        (tmp_path / run).mkdir()
        cfg, corpus, model, pairs = _build(small_corpus, tiny_stage1, tiny_lm, tmp_path / run)
        assert len(pairs.text_index) == len(pairs.x) == corpus.manifest["splits"]["train"]
        assert len(pairs.text_pool) == len(set(pairs.text_pool)) and pairs.text_pool[int(pairs.text_index[0])] == \
            str(next(corpus.iter_shards("train", columns=("text",))).obs["text"][0])
        before = {k: v.clone() for k, v in model.state_dict().items()}
        loss0 = _pairs_loss(model, pairs)
        seen: list[str] = []
        mapped = model.mapped_states
        model.mapped_states = lambda texts, seen=seen, mapped=mapped: (seen.extend(texts), mapped(texts))[1]
        summary = refit_decoder(model, pairs.text_pool, pairs.text_index, pairs.x, opts, seed=3, nll_weight=0.1,
                                log_path=tmp_path / f"{run}.jsonl", progress=False)
        del model.mapped_states
        assert _pairs_loss(model, pairs) < 0.7 * loss0
        changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
        assert changed and all(k.startswith("decoder.") for k in changed), changed
        assert all(p.requires_grad for p in model.decoder.parameters())  # as they were before the refit
        assert len(seen) == len(set(seen)) == summary["distinct_texts"] and set(seen) <= set(pairs.text_pool)
        lines = [json.loads(line) for line in (tmp_path / f"{run}.jsonl").read_text().splitlines()]
        assert [r["step"] for r in lines] == [50, 100, 150] and lines[-1]["decode_llm"] == summary["last_window"]
        # the rate of each window's last step: linear decay to 0, so the last step runs at lr / steps
        assert lines[-1]["decode_llm"] < lines[0]["decode_llm"] and lines[-1]["lr"] == pytest.approx(opts.lr / 150)
        decoders.append(model.decoder.state_dict())
    for k, v in decoders[0].items():
        assert torch.equal(v, decoders[1][k]), k  # the same seed gives the same decoder


# --- save / reload -----------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def trained_stage2(tmp_path_factory, small_corpus, tiny_stage1, tiny_lm) -> Path:
    tmp = tmp_path_factory.mktemp("s2")
    cfg, corpus, model, pairs = _build(small_corpus, tiny_stage1, tiny_lm, tmp, {"cell_embedding": True})
    _fit(model, pairs(_loader_batch(corpus, tiny_stage1), 0, 0), steps=3, lr=3e-3)
    folder = tmp / "model"
    model.save_pretrained(folder)
    return folder


def test_save_reload_gives_identical_generation_and_pseudocells(trained_stage2, small_corpus, tiny_stage1):
    from scmm.data_pipeline.store import Corpus
    from scmm.model.stage2 import Stage2Model
    for name in ("config.json", "bridge.safetensors", "hvg.json", "lora/adapter_config.json",
                 "lora/adapter_model.safetensors", "lm/config.json", "stage1/config.json", "stage1/cell_encoding.json"):
        assert (trained_stage2 / name).is_file(), name
    a = Stage2Model.from_pretrained(trained_stage2)
    b = Stage2Model.from_pretrained(trained_stage2)
    raw = _loader_batch(Corpus(small_corpus), tiny_stage1, "val", 4)
    for kw in ({"task": "cell_type"}, {"task": "cell_type", "constrained": True},
               {"task": "describe", "num_beams": 2, "max_new_tokens": 12}):
        ga, gb = a.describe_cells(raw, **kw), b.describe_cells(raw, **kw)
        assert ga == gb and len(ga) == 4, kw
        if kw.get("constrained"):
            assert all(a.answer_to_cl(t) is not None for t in ga), ga
    texts = ["A B cell from the blood of a healthy donor.", "A natural killer cell."]
    xa, xb = a.generate_pseudocells(texts, 3, seed=7), b.generate_pseudocells(texts, 3, seed=7)
    assert xa.shape == (6, len(a.hvg["indices"])) and xa.dtype == np.float32 and (xa >= 0).all()
    np.testing.assert_array_equal(xa, xb)
    assert not np.array_equal(xa, a.generate_pseudocells(texts, 3, seed=8))


@pytest.mark.parametrize("programs,markers", [(False, False), (True, False), (False, True)])
def test_reloaded_model_equals_the_trained_one(small_corpus, tiny_stage1, tiny_lm, tmp_path, programs, markers):
    """What the trainer holds and what from_pretrained rebuilds give the same losses and pseudo-cells (and, with
    bridge.programs / bridge.markers, the same program predictions / marker genes and prompts)."""
    from scmm.model.stage2 import LOSSES, Stage2Model
    cfg, corpus, model, pairs = _build(small_corpus, tiny_stage1, tiny_lm, tmp_path,
                                       {"programs": programs, "markers": markers})
    raw = _loader_batch(corpus, tiny_stage1)
    if programs or markers:
        model.fit_readers([raw], pairs.program_scores)
    batch = pairs(raw, 0, 0)
    _fit(model, batch, steps=2, lr=1e-2)
    model.save_pretrained(tmp_path / "out")
    back = Stage2Model.from_pretrained(tmp_path / "out")
    model.eval()
    with torch.no_grad():
        la, lb = model(batch), back(batch)
    for k in LOSSES:
        assert float(lb[k]) == pytest.approx(float(la[k]), rel=1e-5, abs=1e-6), k
    if programs:
        assert back.program_names == corpus.facts["programs"]["names"]
        np.testing.assert_allclose(back.predict_programs(raw), model.predict_programs(raw), rtol=1e-6, atol=1e-7)
    if markers:
        assert back.reader is None and back.predict_markers(raw) == model.predict_markers(raw)
        assert any(model.predict_markers(raw))
    assert back.cell_prompts(raw, "Describe it.") == model.cell_prompts(raw, "Describe it.")
    np.testing.assert_allclose(model.generate_pseudocells(["a B cell"], 2, seed=1),
                               back.generate_pseudocells(["a B cell"], 2, seed=1), rtol=1e-5, atol=1e-6)


def test_a_format_3_folder_loads_with_its_dense_decoder(trained_stage2, tmp_path):
    """Folders written before the zero model (format 3, no ``zero_head``) load as ``zero_inflated: false``."""
    from safetensors.torch import load_file, save_file

    from scmm.errors import ScmmError
    from scmm.model.stage2 import Stage2Model
    old = tmp_path / "old"
    shutil.copytree(trained_stage2, old)
    cfg = json.loads((old / "config.json").read_text())
    assert cfg["format_version"] == 4 and cfg["bridge"]["zero_inflated"] is True
    cfg["format_version"] = 3
    del cfg["bridge"]["zero_inflated"]
    (old / "config.json").write_text(json.dumps(cfg))
    state = {k: v for k, v in load_file(str(old / "bridge.safetensors")).items() if "zero_head" not in k}
    save_file(state, str(old / "bridge.safetensors"))
    model = Stage2Model.from_pretrained(old)
    assert model.config.bridge.zero_inflated is False and model.decoder.zero_head is None
    x = model.generate_pseudocells(["a B cell"], 4, seed=0)
    assert (x >= 0).all() and x.shape == (4, len(model.hvg["indices"]))
    cfg["format_version"] = 2
    (old / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ScmmError, match="format scmm-stage2 version 2"):
        Stage2Model.from_pretrained(old)


# --- DeepSpeed: 2 ranks, resume ----------------------------------------------------------------------------
def _launch(config: Path, *extra: str) -> subprocess.CompletedProcess:
    return launch_ranks("finetune/train.py", config, 2, *extra)


@pytest.mark.slow
def test_two_rank_deepspeed_steps_resume_exactly_and_export(tmp_path, small_corpus, tiny_stage1, tiny_lm):
    full = _stage2_config(tmp_path, small_corpus, tiny_stage1, tiny_lm, "full", steps=4)
    _launch(full)
    split = _stage2_config(tmp_path, small_corpus, tiny_stage1, tiny_lm, "split", steps=4)
    _launch(split, "--stop-at", "2")
    assert not (tmp_path / "split" / "model").exists()
    _launch(split, "--resume")
    a, b = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "split")
    assert [r["step"] for r in a] == [1, 2, 3, 4] and [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        assert ra["batch_digest"] == rb["batch_digest"]
        for key in ("loss", "lm", "t2c", "decode_real", "decode_llm", "lr"):
            assert np.isfinite(ra[key])
            assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-6), (ra["step"], key)
    from scmm.model.stage2 import Stage2Model
    models = [Stage2Model.from_pretrained(tmp_path / run / "model") for run in ("full", "split")]
    x = models[0].generate_pseudocells(["A B cell."], 2, seed=0)
    assert x.shape == (2, len(models[0].hvg["indices"])) and np.isfinite(x).all()
    for run in ("full", "split"):  # the decoder refit ran once, after the last step, on rank 0
        refit = [json.loads(line) for line in (tmp_path / run / "decoder_refit.jsonl").read_text().splitlines()]
        assert [r["step"] for r in refit] == [2, 4, 5]
        summary = json.loads((tmp_path / run / "model" / "train_summary.json").read_text())["decoder_refit"]
        assert summary["steps"] == 5 and summary["last_window"] == refit[-1]["decode_llm"]
    for k, v in models[0].decoder.state_dict().items():
        torch.testing.assert_close(models[1].decoder.state_dict()[k], v, rtol=1e-5, atol=1e-6)
    # self-contained: the training corpus's gene panel and labels are in the folder
    from scmm.data_pipeline.store import Corpus
    from scmm.model.folders import load_model
    opened = load_model(tmp_path / "full" / "model")
    assert opened.panel_vocab_ids.tolist() == [int(i) for i in Corpus(small_corpus).gene_vocab_ids]
    assert {r["key"] for r in opened.labels} == set(Corpus(small_corpus).manifest["cell_types"])


# --- scmm generate -----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_scmm_generate_writes_a_valid_h5ad(trained_stage2, tmp_path):
    import anndata as ad

    from conftest import run_cli
    out = tmp_path / "gen.h5ad"
    text = "A natural killer cell from the blood of a healthy donor."
    r = run_cli("generate", "--model", str(trained_stage2), "--text", text, "--n", "5", "--out", str(out),
                "--seed", "3")
    assert r.returncode == 0, r.stderr[-3000:]
    adata = ad.read_h5ad(out)
    hvg = json.loads((trained_stage2 / "hvg.json").read_text())
    assert adata.shape == (5, len(hvg["symbols"]))
    assert list(adata.var_names) == hvg["symbols"]
    assert (adata.obs["prompt"] == text).all()
    x = np.asarray(adata.X)
    assert x.dtype == np.float32 and np.isfinite(x).all() and (x >= 0).all()
    out2 = tmp_path / "gen2.h5ad"
    assert run_cli("generate", "--model", str(trained_stage2), "--text", text, "--n", "5", "--out", str(out2),
                   "--seed", "3").returncode == 0
    np.testing.assert_array_equal(np.asarray(ad.read_h5ad(out2).X), x)


def test_generate_written_in_chunks_equals_the_whole_in_memory(trained_stage2, tmp_path):
    """``generate(out=...)`` draws and writes the pseudo-cells chunk by chunk (chunks and draw blocks smaller
    than the output); the file equals the in-memory AnnData, and rows drawn in parts equal the same rows drawn
    whole. Up to one draw block (4096 rows) the cells are those of the earlier single draw (seed used as is)."""
    import anndata as ad

    from scmm import api
    from scmm.model.stage2 import PSEUDOCELL_BLOCK, Stage2Model
    texts = ["A B cell.", "A natural killer cell from the blood."]
    n = api.GENERATE_CHUNK + 1000  # two chunks per text, three draw blocks per chunk
    path = api.generate(trained_stage2, texts, n=n, seed=5, out=tmp_path / "gen.h5ad")
    whole = api.generate(trained_stage2, texts, n=n, seed=5)
    written = ad.read_h5ad(path)
    np.testing.assert_array_equal(np.asarray(written.X), whole.X)
    assert list(written.obs.columns) == ["prompt", "pseudocell"] and list(written.obs_names) == list(whole.obs_names)
    assert written.obs["prompt"].astype(str).tolist() == whole.obs["prompt"].tolist()  # categorical, as anndata writes
    np.testing.assert_array_equal(written.obs["pseudocell"].to_numpy(), whole.obs["pseudocell"].to_numpy())
    assert list(written.obs["prompt"].cat.categories) == sorted(texts)
    assert list(written.obs_names[[0, n]]) == ["pseudocell_0", f"pseudocell_{n}"]
    pd.testing.assert_frame_equal(written.var, whole.var)
    assert written.uns["scmm_generate"]["n_per_text"] == n
    model = Stage2Model.from_pretrained(trained_stage2)
    np.testing.assert_array_equal(model.generate_pseudocells(texts, n, seed=5, rows=(4000, 9000)),
                                  whole.X[4000:9000])
    small = model.generate_pseudocells(texts, 7, seed=5)  # one block: the single draw of before
    gen = torch.Generator().manual_seed(5)
    states = model.mapped_states(texts).repeat_interleave(7, dim=0).to(model.decoder.mean_head.weight.dtype)
    np.testing.assert_array_equal(small, model.decoder.sample(states, generator=gen).numpy())
    assert PSEUDOCELL_BLOCK < api.GENERATE_CHUNK < n
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gen.h5ad"]


@pytest.mark.slow
def test_generate_memory_is_set_by_the_chunk_not_n(trained_stage2, tmp_path):
    """10x the pseudo-cells, the same peak RSS within a few bytes per added cell: held in memory, each would
    cost at least its row of X (4 bytes per HVG gene) several times over."""
    hvg = json.loads((trained_stage2 / "hvg.json").read_text())
    code = ("import resource, sys\nfrom scmm.cli import main\nrc = main(sys.argv[1:])\n"
            "sys.stderr.write(f'PEAK_RSS_KIB {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}\\n')\n"
            "sys.exit(rc)\n")
    sizes, peaks = (20_000, 200_000), []
    for n in sizes:
        out = tmp_path / f"gen_{n}.h5ad"
        r = subprocess.run([sys.executable, "-c", code, "generate", "--model", str(trained_stage2), "--text",
                            "A B cell.", "--n", str(n), "--out", str(out)], capture_output=True, text=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}, timeout=900)
        assert r.returncode == 0, r.stderr[-3000:]
        peaks.append(int(r.stderr.rsplit("PEAK_RSS_KIB ", 1)[1].split()[0]) / 1024)
        out.unlink()
    growth = (peaks[1] - peaks[0]) * 2**20 / (sizes[1] - sizes[0])
    assert growth < 4 * len(hvg["symbols"]) / 2, f"peak RSS {peaks} MiB at n={sizes}: {growth:.0f} B per cell"


def test_sigterm_during_generate_and_describe_removes_the_temporary(trained_stage2, tiny_stage1, small_corpus,
                                                                     tmp_path):
    from terminate import assert_terminated_cleanly, terminate_while_writing

    from conftest import make_adata
    out = tmp_path / "gen.h5ad"
    result = terminate_while_writing(["generate", "--model", str(trained_stage2), "--text", "A B cell.", "--n",
                                      "1000000", "--out", str(out)], out)
    assert_terminated_cleanly(result, tmp_path, [])
    cells = tmp_path / "cells" / "in.h5ad"
    cells.parent.mkdir()
    make_adata(n_cells=2000, donors=2).write_h5ad(cells)
    out = tmp_path / "cells" / "described.h5ad"
    result = terminate_while_writing(["describe", str(cells), "--model", str(trained_stage2), "--out", str(out),
                                      "--chunk-size", "50", "--quiet"], out)
    assert_terminated_cleanly(result, cells.parent, ["in.h5ad"])


@pytest.mark.parametrize("args", [
    ["--n", "0"],
    ["--text", "   "],
    ["--model", "/nonexistent/model"],
    ["--out", "OUT.csv"],
])
def test_scmm_generate_bad_input_is_one_error_line_and_writes_nothing(trained_stage2, tmp_path, args):
    from conftest import run_cli
    opts = {"--model": str(trained_stage2), "--text": "A B cell.", "--n": "3", "--out": str(tmp_path / "o.h5ad")}
    for k, v in zip(args[::2], args[1::2]):
        opts[k] = v if k != "--out" else str(tmp_path / v)
    r = run_cli("generate", *[x for kv in opts.items() for x in kv])
    assert r.returncode == 2
    assert r.stderr.strip().startswith("error: ") and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert list(tmp_path.iterdir()) == []


# --- the stage-2 model in the evaluation harness and in inference -------------------------------------------
def test_eval_package_and_describe_use_the_stage2_model(trained_stage2, tiny_stage1, small_corpus, tmp_path):
    from conftest import make_adata
    from scmm import api
    from scmm.eval.harness import evaluate
    from scmm.package import package_model
    package = package_model(tiny_stage1, small_corpus, tmp_path / "package", stage2=trained_stage2)
    metrics = evaluate(package, small_corpus, tmp_path / "eval", progress=False)  # default: every task
    assert set(metrics) == {"annotation", "retrieval", "baselines", "generation", "pseudocell", "language"}
    gen, pc = metrics["generation"], metrics["pseudocell"]
    assert {"bleu4", "rougeL", "type_accuracy", "ontology_score", "type_accuracy_constrained"} <= set(gen)
    assert all(0.0 <= gen[k] <= 1.0 for k in ("bleu4", "rougeL", "type_accuracy", "type_accuracy_constrained"))
    assert gen["valid_answer_rate_constrained"] == 1.0  # the prefix tree only lets Cell Ontology names through
    # the LLM as a classifier over the corpus's types, calibrated and backed off on val like the annotation
    scored = gen["scored"]
    assert scored["n_cells"] == gen["n_cells"] and scored["temperature"] > 0 and scored["margin"] >= 0
    assert all(0.0 <= scored[k] <= 1.0 for k in ("accuracy", "lineage_accuracy", "lineage_accuracy_backoff",
                                                   "accuracy_backoff", "backoff_rate", "ece"))
    assert scored["accuracy"] <= scored["lineage_accuracy"]
    assert {"knn_accuracy", "k", "space", "random_baseline", "class_mean_reference"} <= set(pc)
    assert pc["k"] == 5 and set(pc["spaces"]) == {"expression_pca", "stage1_embedding"}
    # what training never said: the type question in other words, pseudo-cells from ontology synonyms/definitions
    assert 0.0 <= gen["type_accuracy_unseen_phrasing"] <= 1.0 and 0.0 <= pc["knn_accuracy_unseen_phrasing"] <= 1.0
    assert pc["unseen_phrasing"]["n_types"] == 4 and set(pc["unseen_phrasing"]["spaces"]) == set(pc["spaces"])
    # language.* (DESIGN.md, 2026-12-07): every key, over the seen-type test cells, beside its baseline
    lang = metrics["language"]
    assert {"program_claims", "marker_claims", "search", "text_to_cell", "n_programs", "n_cells", "answers"} \
        <= set(lang)
    assert {"precision", "recall", "f1", "f1_within_type", "baseline_f1_within_type"} <= set(lang["program_claims"])
    assert {"precision", "baseline_precision"} <= set(lang["marker_claims"])
    assert {"auroc", "auroc_within_type"} <= set(lang["search"]) and "auroc" in lang["text_to_cell"]
    assert lang["n_cells"] == gen["n_cells"] and lang["n_programs"] == 1  # small_corpus: allograft rejection alone
    # with one program the LLM's likeliest program is the cell's top one, whatever it learnt
    assert lang["answers"]["ranked_programs"] == {"precision": 1.0, "precision_within_type": 1.0,
                                                  "baseline_precision": 1.0, "chance": 1.0}
    assert 0.0 <= gen["repeated_phrase_rate"] <= 1.0 and 0.0 <= gen["repeated_phrase_rate_raw"] <= 1.0
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "## Descriptions and cell-type answers" in report and "## Pseudo-cells" in report
    assert "## Language about each cell" in report and "type-template baseline" in report
    assert "Scored over the corpus's cell types" in report
    # the bare stage-2 folder evaluates to the same numbers as its package
    assert evaluate(trained_stage2, small_corpus, tmp_path / "eval2", progress=False) == metrics

    adata = make_adata(n_cells=10, donors=2)
    described = api.describe(adata, package)
    assert "scmm_description" not in adata.obs  # the input is left alone
    texts = described.obs["scmm_description"].tolist()
    assert len(texts) == 10 and all(isinstance(t, str) for t in texts)
    assert api.describe(adata, package).obs["scmm_description"].tolist() == texts  # greedy: deterministic


def test_describe_cell_type_is_the_eval_scored_answer_calibrated_as_eval_chose(trained_stage2, tiny_stage1,
                                                                                small_corpus, tmp_path, monkeypatch):
    """`scmm describe --cell-type` on the corpus's own val cells gives the answers that `scmm eval`'s scored answers
    give them, calibrated and backed off with the temperature and margin stored in generation.scored. The tiny
    LLM barely reads the cell, so its scores are replaced by a function of each cell's values: the rows must land
    on their own cells."""
    import json

    import anndata as ad

    from conftest import split_cell_ids
    from scmm import api
    from scmm.cli import main
    from scmm.data_pipeline.ontology import get_ontology
    from scmm.data_pipeline.store import Corpus
    from scmm.eval.annotate import Candidates
    from scmm.eval.calibration import calibrated_answers
    from scmm.eval.harness import evaluate
    from scmm.eval.stage2 import candidate_answers, scored_answers, scored_calibration
    from scmm.model.stage2 import Stage2Model
    from scmm.package import package_model
    metrics = evaluate(trained_stage2, small_corpus, tmp_path / "eval", tasks="describe", progress=False)
    assert scored_calibration(metrics).temperature == metrics["generation"]["scored"]["temperature"]
    metrics["generation"]["scored"].update(temperature=0.5, margin=0.3)  # a calibration that backs some cells off
    (tmp_path / "eval" / "metrics.json").write_text(json.dumps(metrics))
    package = package_model(tiny_stage1, small_corpus, tmp_path / "package", stage2=trained_stage2,
                            metrics=tmp_path / "eval" / "metrics.json")

    def by_values(self, batch, answers, task="cell_type", template=0):
        v = batch["values"].float().masked_fill(batch["padding_mask"], 0.0).sum(1).double().cpu().numpy()
        return 3.0 * np.sin(np.outer(v, np.arange(1, len(answers) + 1)) / 7.0)
    monkeypatch.setattr(Stage2Model, "answer_logprobs", by_values)

    corpus, ontology = Corpus(small_corpus), get_ontology()
    model = api.load_model(package)
    cal = scored_calibration(model.metrics)
    cands = Candidates.from_labels(model.labels)
    logp, _ = scored_answers(model.stage2, corpus, "val", candidate_answers(cands, ontology))
    expected = calibrated_answers(logp, cands.keys, cands.names, cands.cl_ids, cal, ontology)
    assert len(set(expected.cl_ids)) > 2 and (expected.level > 0).any() and (expected.level == 0).any()
    cells = ad.read_h5ad(small_corpus.parent / "in.h5ad")[split_cell_ids(small_corpus, "val")].copy()
    cells.write_h5ad(tmp_path / "val.h5ad")
    assert main(["describe", str(tmp_path / "val.h5ad"), "--model", str(package), "--out",
                 str(tmp_path / "described.h5ad"), "--cell-type", "--chunk-size", "7"]) == 0
    obs = ad.read_h5ad(tmp_path / "described.h5ad").obs
    assert np.allclose(obs["scmm_llm_confidence"].to_numpy(), expected.confidence, atol=1e-5)
    assert obs["scmm_llm_cell_type_ontology_term_id"].astype(str).tolist() == [str(x) for x in expected.cl_ids]
    assert obs["scmm_llm_cell_type"].astype(str).tolist() == [str(x) for x in expected.names]
    assert obs["scmm_llm_cell_type_level"].tolist() == expected.level.tolist()
    plain = api.describe(cells, package)  # without --cell-type: the description alone
    assert "scmm_llm_cell_type" not in plain.obs and "scmm_description" in plain.obs

def test_unseen_phrasings_are_never_training_phrasings_and_come_from_the_ontology():
    from scmm.data_pipeline.instructions import PROMPTS, UNSEEN_PROMPTS
    from scmm.data_pipeline.ontology import get_ontology
    from scmm.eval.stage2 import ontology_phrasings
    seen = {p.lower() for task in PROMPTS.values() for p in task}
    assert UNSEEN_PROMPTS["cell_type"] and not seen & {p.lower() for p in UNSEEN_PROMPTS["cell_type"]}
    ontology = get_ontology()
    texts = ontology_phrasings(["CL:0000623", "CL:0001054", "unknown type"], ontology)
    assert set(texts) == {"CL:0000623", "CL:0001054"}  # a label key without a CL term gets none
    nk = texts["CL:0000623"]
    assert ontology.definition("CL:0000623") in nk
    assert {f"A {s}." for s in ontology.synonyms("CL:0000623")} <= set(nk)
    assert not any(t.lower().startswith(f"a {ontology.label('CL:0000623').lower()}.") for t in nk)


def test_type_answers_in_other_phrasings_ask_each_cell_its_phrasing(trained_stage2, small_corpus):
    """describe_split(type_prompts=...) asks cell i of the split phrasing i % n: the same answers as asking the
    phrasings one at a time over the whole split."""
    from scmm.data_pipeline.store import Corpus
    from scmm.eval.stage2 import _loader, describe_split
    from scmm.model.stage2 import Stage2Model
    model = Stage2Model.from_pretrained(trained_stage2)
    corpus = Corpus(small_corpus)
    prompts = ["Identify the kind of cell shown here.", "Tell me what sort of cell this is."]
    mixed = describe_split(model, corpus, "val", describe=False, type_prompts=prompts, batch_size=7)
    batch = next(iter(_loader(model, corpus, "val", 64)))  # the whole split (40 cells)
    each = [model.describe_cells(batch, task="cell_type", prompt=p) for p in prompts]
    assert mixed["type_answers"] == [each[i % 2][i] for i in range(len(mixed["type_answers"]))]


def test_generation_figures_leave_out_the_held_out_types():
    from scmm.eval.stage2 import seen_types_only
    result = {"cell_id": ["a", "b", "c"], "true_cl": ["CL:1", "CL:9", "CL:2"], "descriptions": [],
              "type_answers": ["x", "y", "z"]}
    kept = seen_types_only(result, ["CL:9"])
    assert kept == {"cell_id": ["a", "c"], "true_cl": ["CL:1", "CL:2"], "descriptions": [], "type_answers": ["x", "z"]}
    assert seen_types_only(result, []) == result
