"""Stage-2 language-model side: tokenizer, cell tokens, LoRA rows, constrained decoding, instructions, init-lm."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch
import yaml
from peft import PeftModel
from safetensors.torch import load_file
from transformers import LlamaTokenizer

from scmm.data_pipeline.instructions import PROMPTS, TASKS, instruction_dataset, prompt_for, template_for
from scmm.data_pipeline.store import Corpus
from scmm.errors import ScmmError
from scmm.model.constrained import LabelTrie, cell_ontology_names, cell_ontology_trie
from scmm.model.llm import (
    CELL_END,
    CELL_START,
    LlamaSize,
    LoraOptions,
    add_cell_tokens,
    apply_lora,
    build_llama,
    load_lm,
    optimizer_param_groups,
    save_adapter,
    slot_token,
    train_tokenizer,
)
from scmm.model.sequences import SequenceBuilder, encode_text
from tests.conftest import run_cli

torch.set_num_threads(2)
TINY = LlamaSize(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, max_position_embeddings=128)
LABELS = {"CL:0000084": ["T cell", "T-cell", "T lymphocyte"], "CL:0000236": ["B cell", "B lymphocyte"],
          "CL:0001054": ["CD14-positive monocyte"], "CL:0000623": ["natural killer cell", "NK cell"]}


def _ontology_sentences(n: int = 300) -> list[str]:
    from scmm.data_pipeline.ontology import get_ontology
    terms = get_ontology()._parser.cxg_schema.ontology("CL")
    out = []
    for meta in list(terms.values())[:n]:
        out.append(f"{meta['label']}. {' '.join((meta.get('description') or '').split())}")
        out += meta.get("synonyms", [])
    return out + [n for names in LABELS.values() for n in names]


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory) -> Path:
    """A folder holding a trained sentencepiece tokenizer and a tiny random Llama (as a user's LLM folder)."""
    folder = tmp_path_factory.mktemp("lm")
    tok = train_tokenizer(_ontology_sentences(), folder, vocab_size=700)
    torch.manual_seed(0)
    build_llama(TINY, len(tok)).save_pretrained(str(folder))
    return folder


@pytest.fixture
def lm(lm_dir):
    return load_lm(lm_dir)


# ------------------------------------------------------------------------------------------------ loading
def test_tokenizer_round_trip(lm_dir: Path) -> None:
    text = "A CD14-positive monocyte; T cell αβ, 10x 3' v3 (1,234 genes)."
    for tok in (load_lm(lm_dir)[1], LlamaTokenizer.from_pretrained(str(lm_dir))):
        ids = tok.encode(text, add_special_tokens=False)
        assert ids and tok.unk_token_id not in ids
        assert tok.decode(ids) == text
        assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (1, 2, 3, 0)
    assert (lm_dir / "tokenizer.model").is_file()
    tok = load_lm(lm_dir)[1]
    assert tok("T cell").input_ids == [1, *tok.encode("T cell", add_special_tokens=False)]  # bos, no eos


def test_load_lm_from_tokenizer_model_only(lm_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "tokenizer.model").write_bytes((lm_dir / "tokenizer.model").read_bytes())
    (tmp_path / "config.json").write_bytes((lm_dir / "config.json").read_bytes())
    (tmp_path / "model.safetensors").write_bytes((lm_dir / "model.safetensors").read_bytes())
    model, tok = load_lm(tmp_path)
    assert tok.pad_token == "<pad>" and model.config.pad_token_id == 3
    assert tok.decode(tok.encode("natural killer cell", add_special_tokens=False)) == "natural killer cell"


def test_load_lm_errors(lm_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ScmmError, match="not found"):
        load_lm(tmp_path / "nope")
    (tmp_path / "config.json").write_bytes((lm_dir / "config.json").read_bytes())
    with pytest.raises(ScmmError, match="has no tokenizer"):
        load_lm(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(ScmmError, match=str(tmp_path)):
        load_lm(tmp_path)


# ------------------------------------------------------------------------------------------- cell tokens
def test_add_cell_tokens_ids_init_and_idempotence(lm) -> None:
    model, tok = lm
    n = len(tok)
    old_emb = model.get_input_embeddings().weight.detach().clone()
    old_head = model.get_output_embeddings().weight.detach().clone()
    cell = add_cell_tokens(tok, model, 3)
    assert (cell.start_id, cell.end_id, cell.slot_ids) == (n, n + 1, [n + 2, n + 3, n + 4])
    assert len(tok) == n + 5 and model.get_input_embeddings().weight.shape[0] == n + 5
    assert tok.convert_ids_to_tokens(cell.all_ids) == [CELL_START, CELL_END, *(slot_token(i) for i in range(3))]
    assert tok.encode("<cell><cell_0><cell_1><cell_2></cell>", add_special_tokens=False) == \
        [cell.start_id, *cell.slot_ids, cell.end_id]
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert torch.equal(emb[:n], old_emb) and torch.equal(head[:n], old_head)
    for w, old in ((emb, old_emb), (head, old_head)):
        assert torch.allclose(w[n:], old.mean(0).expand(5, -1))
    assert tok.decode([5, cell.start_id, cell.slot_ids[0]], skip_special_tokens=True) == tok.decode([5])
    with torch.no_grad():
        emb[cell.slot_ids[0]] += 1.0  # a trained row must survive a second call
    trained = emb.detach().clone()
    again = add_cell_tokens(tok, model, 3)
    assert again == cell and len(tok) == n + 5
    assert torch.equal(model.get_input_embeddings().weight, trained)
    more = add_cell_tokens(tok, model, 4)  # one more slot: only it is new
    assert more.slot_ids == [*cell.slot_ids, n + 5] and len(tok) == n + 6
    assert torch.equal(model.get_input_embeddings().weight[: n + 5], trained)


# ---------------------------------------------------------------------------------------------------- LoRA
def _batch(tok, cell):
    builder = SequenceBuilder(tok, cell, max_length=48)
    items = [builder.cell_to_text("Which cell type is this?", "T cell"),
             builder.cell_to_text("Describe this cell.", "A natural killer cell from the blood.")]
    return builder.collate(items)


def _effective_rows(model) -> tuple[torch.Tensor, torch.Tensor]:
    """(input embedding, output head) as the (possibly peft-wrapped) model applies them, [V, H] each."""
    emb = model.get_input_embeddings()
    vocab = model.get_output_embeddings()
    with torch.no_grad():
        e = emb(torch.arange(model.config.vocab_size)[None])[0]
        h = vocab(torch.eye(model.config.hidden_size)).T
    return e.clone(), h.clone()


@pytest.mark.parametrize("full", [False, True])
def test_lora_trains_only_new_rows(lm, full: bool) -> None:
    model, tok = lm
    cell = add_cell_tokens(tok, model, 4)
    new = cell.all_ids
    model = apply_lora(model, LoraOptions(r=4, alpha=8, dropout=0.0, full_finetune=full), new)
    emb0, head0 = _effective_rows(model)
    opt = torch.optim.AdamW(optimizer_param_groups(model, weight_decay=0.1), lr=1e-2)
    batch = _batch(tok, cell)
    model.train()
    loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    loss.backward()
    opt.step()
    emb1, head1 = _effective_rows(model)
    old = torch.ones(emb0.shape[0], dtype=torch.bool)
    old[new] = False
    assert torch.equal(emb1[old], emb0[old]) and torch.equal(head1[old], head0[old])
    for rows1, rows0 in ((emb1, emb0), (head1, head0)):
        changed = (rows1[new] != rows0[new]).any(dim=1)
        assert changed.tolist() == [True] * len(new)
    if not full:
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert all("lora_" in n or "trainable_tokens_delta" in n for n in trainable)
        assert sum("trainable_tokens_delta" in n for n in trainable) == 2  # embedding and head


def test_lora_save_reload_identical(lm_dir: Path, tmp_path: Path) -> None:
    model, tok = load_lm(lm_dir)
    cell = add_cell_tokens(tok, model, 4)
    model = apply_lora(model, LoraOptions(r=4, alpha=8, dropout=0.0), cell.all_ids)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = _batch(tok, cell)
    for _ in range(3):
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
              labels=batch["labels"]).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    save_adapter(model, tmp_path / "adapter")
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert {tuple(v.shape) for k, v in saved.items() if "lora_" not in k} == {(len(cell.all_ids), TINY.hidden_size)}
    base, tok2 = load_lm(lm_dir)
    assert add_cell_tokens(tok2, base, 4) == cell
    reloaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    ids = batch["input_ids"][:1, :12]
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reloaded(input_ids=ids).logits)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    assert torch.equal(model.generate(input_ids=ids, **kw), reloaded.generate(input_ids=ids, **kw))


def test_apply_lora_bad_target(lm) -> None:
    model, tok = lm
    cell = add_cell_tokens(tok, model, 2)
    with pytest.raises(ScmmError, match="LoRA"):
        apply_lora(model, LoraOptions(target_modules=["no_such_proj"]), cell.all_ids)


# ------------------------------------------------------------------------------------------- sequences
@pytest.fixture
def builder(lm):
    model, tok = lm
    return SequenceBuilder(tok, add_cell_tokens(tok, model, 3), max_length=40)


def test_cell_to_text_layout(builder: SequenceBuilder) -> None:
    tok, c = builder.tokenizer, builder.cell_tokens
    p, a = encode_text(tok, "Which cell type is this?"), encode_text(tok, "B cell")
    block = [1, c.start_id, *c.slot_ids, c.end_id]
    item = builder.cell_to_text("Which cell type is this?", "B cell")
    assert item["input_ids"] == block + p + a + [2]
    assert item["attention_mask"] == [1] * len(item["input_ids"])
    assert item["labels"] == [-100] * (len(block) + len(p)) + a + [2]
    assert item["slot_positions"] == [2, 3, 4]
    gen = builder.cell_to_text("Which cell type is this?", None)
    assert gen["input_ids"] == block + p and gen["labels"] == [-100] * len(block + p)
    assert gen["slot_positions"] == [2, 3, 4]


def test_cell_to_text_truncates_the_answer(builder: SequenceBuilder) -> None:
    tok, c = builder.tokenizer, builder.cell_tokens
    p = encode_text(tok, "Describe this cell.")
    a = encode_text(tok, "A natural killer cell " * 10)
    room = 40 - 6 - len(p)
    item = builder.cell_to_text("Describe this cell.", "A natural killer cell " * 10)
    assert len(item["input_ids"]) == 40
    assert item["input_ids"][:6 + len(p)] == [1, c.start_id, *c.slot_ids, c.end_id] + p  # only the answer is cut
    assert item["input_ids"][6 + len(p):] == a[:room] and item["labels"][6 + len(p):] == a[:room]
    assert 2 not in item["labels"]  # a cut answer has no eos
    with pytest.raises(ScmmError, match="prompt too long"):
        builder.cell_to_text("natural killer cell " * 20, "B cell")
    with pytest.raises(ScmmError, match="prompt too long"):
        builder.cell_to_text("natural killer cell " * 20, None)


def test_text_to_cell_layout_and_truncation(builder: SequenceBuilder) -> None:
    tok, c = builder.tokenizer, builder.cell_tokens
    d = encode_text(tok, "A B cell from the blood.")
    item = builder.text_to_cell("A B cell from the blood.")
    assert item["input_ids"] == [1, *d, c.start_id, *c.slot_ids, c.end_id]
    assert item["attention_mask"] == [1] * len(item["input_ids"]) and "labels" not in item
    assert item["slot_positions"] == [len(d) + 2, len(d) + 3, len(d) + 4]
    long = encode_text(tok, "natural killer cell " * 30)
    item = builder.text_to_cell("natural killer cell " * 30)
    assert item["input_ids"] == [1, *long[:34], c.start_id, *c.slot_ids, c.end_id]
    assert item["slot_positions"] == [36, 37, 38]


def test_collate_both_sides(builder: SequenceBuilder) -> None:
    a = {"input_ids": [1, 7, 8, 9], "attention_mask": [1, 1, 1, 1], "labels": [-100, -100, 9, 2],
         "slot_positions": [1, 2]}
    b = {"input_ids": [1, 7], "attention_mask": [1, 1], "labels": [-100, 5], "slot_positions": [0, 1]}
    right = builder.collate([a, b])
    assert right["input_ids"].tolist() == [[1, 7, 8, 9], [1, 7, 3, 3]]
    assert right["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert right["labels"].tolist() == [[-100, -100, 9, 2], [-100, 5, -100, -100]]
    assert right["slot_positions"].tolist() == [[1, 2], [0, 1]]
    left = builder.collate([a, b], padding_side="left")
    assert left["input_ids"].tolist() == [[1, 7, 8, 9], [3, 3, 1, 7]]
    assert left["attention_mask"].tolist() == [[1, 1, 1, 1], [0, 0, 1, 1]]
    assert left["labels"].tolist() == [[-100, -100, 9, 2], [-100, -100, -100, 5]]
    assert left["slot_positions"].tolist() == [[1, 2], [2, 3]]
    assert all(t.dtype == torch.long for t in left.values())
    no_labels = builder.collate([{k: v for k, v in a.items() if k != "labels"}])
    assert set(no_labels) == {"input_ids", "attention_mask", "slot_positions"}
    with pytest.raises(ScmmError, match="padding_side"):
        builder.collate([a], padding_side="middle")


def test_collated_slots_point_at_slot_tokens(builder: SequenceBuilder) -> None:
    items = [builder.cell_to_text("Describe this cell.", "A T cell."), builder.text_to_cell("A B cell from the blood.")]
    for side in ("left", "right"):
        batch = builder.collate(items, padding_side=side)
        got = torch.gather(batch["input_ids"], 1, batch["slot_positions"])
        assert got.tolist() == [builder.cell_tokens.slot_ids] * 2


# ------------------------------------------------------------------------------------ constrained decoding
def test_label_trie_allowed(lm) -> None:
    _, tok = lm
    trie = LabelTrie(tok, LABELS)
    names = [n for ns in LABELS.values() for n in ns]
    seqs = {n: encode_text(tok, n) + [2] for n in names}
    assert trie.allowed([]) == sorted({s[0] for s in seqs.values()})
    t_cell = seqs["T cell"]
    followers = sorted({s[len(t_cell) - 2] for s in seqs.values() if s[:len(t_cell) - 2] == t_cell[:-2]})
    assert trie.allowed(t_cell[:-2]) == followers
    assert 2 in trie.allowed(t_cell[:-1])  # "T cell" may end here
    assert trie.allowed(t_cell) == [2]  # complete
    assert trie.allowed([99999]) == [2]  # off the tree: stop
    for s in seqs.values():  # every name is spelled by a walk through allowed()
        assert all(tok_id in trie.allowed(s[:i]) for i, tok_id in enumerate(s))


def test_label_trie_lookup(lm) -> None:
    _, tok = lm
    trie = LabelTrie(tok, LABELS)
    assert trie.lookup("T cell") == "CL:0000084"
    assert trie.lookup(" t-cells. ") == "CL:0000084"
    assert trie.lookup("NK cell") == "CL:0000623"
    assert trie.lookup("CD14+ monocytes") == "CL:0001054"
    assert trie.lookup("dendritic cell") is None and trie.lookup("") is None


def test_constrained_generate_yields_a_label(lm) -> None:
    model, tok = lm
    cell = add_cell_tokens(tok, model, 3)
    builder = SequenceBuilder(tok, cell, max_length=48)
    trie = LabelTrie(tok, LABELS)
    valid = {" ".join(n.split()) for ns in LABELS.values() for n in ns}
    items = [builder.cell_to_text(prompt_for("cell_type", i), None) for i in range(3)]
    batch = builder.collate(items, padding_side="left")
    model.eval()
    width = batch["input_ids"].shape[1]
    kw = dict(max_new_tokens=12, do_sample=False, eos_token_id=2, pad_token_id=3)
    for seed in range(3):
        torch.manual_seed(seed)
        with torch.no_grad():
            for p in model.model.layers.parameters():
                p.normal_(0, 0.5)  # a different random model each round: constraints alone make it valid
        out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             prefix_allowed_tokens_fn=trie.prefix_allowed_tokens_fn(width), **kw)
        answers = tok.batch_decode(out[:, width:], skip_special_tokens=True)
        assert all(a.strip() in valid for a in answers), answers
        assert all(trie.lookup(a) in LABELS for a in answers)
        # from inputs_embeds, HF passes only the generated ids
        embeds = model.get_input_embeddings()(batch["input_ids"])
        out2 = model.generate(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                              prefix_allowed_tokens_fn=trie.prefix_allowed_tokens_fn(width), **kw)
        answers2 = tok.batch_decode(out2, skip_special_tokens=True)
        assert answers2 == answers


def test_cell_ontology_trie(lm) -> None:
    _, tok = lm
    start = time.perf_counter()
    trie = cell_ontology_trie(tok)
    assert time.perf_counter() - start < 10
    names = cell_ontology_names()
    assert len(names) > 3000 and trie.n_names == sum(len(v) for v in names.values())
    assert trie.lookup("CD14-positive monocyte") == "CL:0001054"
    assert trie.lookup("natural killer cell") == "CL:0000623"
    assert trie.lookup("NK cell") == "CL:0000623"  # a synonym
    labels_only = cell_ontology_trie(tok, include_synonyms=False)
    assert labels_only.n_names == len(names) and labels_only.lookup("NK cell") is None


# ------------------------------------------------------------------------------------------ instructions
def test_instruction_dataset(small_corpus: Path) -> None:
    corpus = Corpus(small_corpus)
    label_tasks = ("describe", "cell_type", "tissue")  # the per-cell fact questions: tests/test_language.py
    ds = instruction_dataset(corpus, "train", tasks=label_tasks)
    n_train = corpus.manifest["splits"]["train"]
    assert len(ds) == 3 * n_train
    assert ds.column_names == ["cell_id", "task", "prompt", "answer", "cell_type_ontology_term_id"]
    assert ds["task"][:3] == list(label_tasks)
    every = instruction_dataset(corpus, "train")  # the corpus has facts: every cell also gets a programs question
    tasks = list(every["task"])
    assert tasks[:3] == list(label_tasks) and set(tasks) == set(TASKS)
    assert tasks.count("programs") == n_train
    labels = {"CL:0000084": "T cell", "CL:0000236": "B cell", "CL:0000623": "natural killer cell",
              "CL:0001054": "CD14-positive monocyte"}
    texts = {}
    for shard in corpus.iter_shards("train", columns=("cell_id", "text")):
        texts.update(zip(shard.obs["cell_id"], shard.obs["text"]))
    for row in ds:
        assert row["prompt"] == PROMPTS[row["task"]][template_for(0, row["cell_id"], row["task"])]
        if row["task"] == "cell_type":
            assert row["answer"] == labels[row["cell_type_ontology_term_id"]]
        elif row["task"] == "tissue":
            assert row["answer"] == "blood"
        else:
            assert row["answer"] == texts[row["cell_id"]]
    for task in label_tasks:  # several phrasings in use, each task
        assert len(set(ds.filter(lambda r, task=task: r["task"] == task)["prompt"])) >= 3
    assert instruction_dataset(corpus, "train", tasks=label_tasks)["prompt"] == ds["prompt"]  # deterministic
    assert instruction_dataset(corpus, "train", tasks=label_tasks, seed=1)["prompt"] != ds["prompt"]
    sub = instruction_dataset(corpus, "val", tasks=("cell_type",))
    assert set(sub["task"]) == {"cell_type"} and len(sub) == corpus.manifest["splits"]["val"]
    with pytest.raises(ScmmError, match="unknown task"):
        instruction_dataset(corpus, "train", tasks=("poetry",))
    assert prompt_for("cell_type") == PROMPTS["cell_type"][0]
    assert all(len(PROMPTS[t]) >= 3 for t in TASKS)
    with pytest.raises(ScmmError):
        prompt_for("cell_type", 99)


# ---------------------------------------------------------------------------------------------- init-lm
def _init_config(tmp_path: Path, corpus: Path, **train) -> Path:
    cfg = {"corpus": str(corpus), "out": str(tmp_path / "lm"), "seed": 0, "tokenizer": {"vocab_size": 500},
           "model": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "num_key_value_heads": 2, "max_position_embeddings": 64},
           "data": {"batch_size": 4, "seq_len": 32},
           "train": {"steps": 4, "lr": 3e-3, "warmup_steps": 1, "log_every": 1, **train}}
    path = tmp_path / "lm.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_init_lm_end_to_end(small_corpus: Path, tmp_path: Path) -> None:
    from scmm.finetune.init_lm import init_lm, load_config
    out = init_lm(load_config(_init_config(tmp_path, small_corpus)), progress=False)
    assert out == tmp_path / "lm"
    assert {"config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json",
            "init_lm_summary.json"} <= {p.name for p in out.iterdir()}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".lm.tmp")]
    summary = json.loads((out / "init_lm_summary.json").read_text())
    assert summary["steps"] == 4 and len(summary["loss_curve"]) == 4 and summary["tokens_per_s"] > 0
    model, tok = load_lm(out)
    assert model.config.hidden_size == 32 and model.config.vocab_size == len(tok) <= 500
    assert tok.decode(tok.encode("CD14-positive monocyte", add_special_tokens=False)) == "CD14-positive monocyte"


def test_cli_init_lm_bad_config(small_corpus: Path, tmp_path: Path) -> None:
    path = _init_config(tmp_path, small_corpus, stepz=3)
    r = run_cli("finetune", "init-lm", "--config", str(path))
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert r.stderr.startswith("error: unknown config key(s) train.stepz")
    r = run_cli("finetune", "init-lm", "--config", str(tmp_path / "missing.yaml"))
    assert r.returncode == 2 and r.stderr == f"error: config file not found: {tmp_path / 'missing.yaml'}\n"
    cfg = yaml.safe_load(path.read_text())
    cfg["train"].pop("stepz")
    cfg["corpus"] = str(tmp_path / "no_corpus")
    path.write_text(yaml.safe_dump(cfg))
    r = run_cli("finetune", "init-lm", "--config", str(path))
    assert r.returncode == 2 and r.stderr.startswith("error: corpus not found") and r.stderr.count("\n") == 1
    assert not (tmp_path / "lm").exists()
