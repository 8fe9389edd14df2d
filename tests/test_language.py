"""language.* (scmm.eval.language): claim metrics on a hand-made fixture, search AUROC, stage-2 fact questions,
and corpora with and without facts through instructions, pairs and `scmm eval`."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import make_adata, save_tiny_stage1
from scmm.data_pipeline.fact_text import fact_sentence, parse_claims
from scmm.eval.language import SplitFacts, claim_metrics, ranked_metrics, search_metrics, type_templates

P = ["HALLMARK_APOPTOSIS", "HALLMARK_COMPLEMENT", "HALLMARK_GLYCOLYSIS", "HALLMARK_HYPOXIA"]  # A, B, C, D


def _facts(types, scores, markers) -> SplitFacts:
    symbols = np.array([f"G{i}" for i in range(30)], dtype=object)
    m = np.full((len(types), 20), -1, dtype=np.int32)
    for i, row in enumerate(markers):
        m[i, :len(row)] = row
    return SplitFacts([f"c{i}" for i in range(len(types))], np.array(types, dtype=object),
                      np.array(types, dtype=object), np.asarray(scores, dtype=np.float32), m, P, symbols)


def test_claim_metrics_on_a_hand_made_fixture():
    """Two cells of type T, one of type U. Top 3 programs: c0 A,B,C; c1 D,C,B; c2 A,D,B.
    Texts: c0 names A,B (both right), c1 names A,D (D right), c2 names nothing.
    Precision 3/4, recall 3/9, F1 2*.75*(1/3)/(.75+1/3) = 6/13. Within type: T has P 3/4, R 3/6 -> F1 .6; U F1 0;
    mean .3. Type template from the training facts: T -> A,B,C (most common in its cells' top 3, ties by name),
    U -> A,B,D: baseline on test: T hits 3 + 2 of 6 -> P 5/6 R 5/6; U hits 3 of 3 -> F1 1; mean (5/6 + 1)/2.
    Markers: c0 names G1 (a top-20 marker) and G9 (not), c1 names G2 (yes): precision 2/3."""
    scores = [[3, 2, 1, 0], [0, 1, 2, 3], [3, 1, 0, 2]]
    test = _facts(["T", "T", "U"], scores, [[1, 4], [2, 3], [5]])
    train = _facts(["T", "T", "U"], [[3, 2, 1, 0], [3, 1, 2, 0], [3, 2, 0, 1]], [[1, 2, 3], [1, 2], [5, 6]])
    templates = type_templates(train)
    assert templates == {"T": ([P[0], P[1], P[2]], ["G1", "G2", "G3"]), "U": ([P[0], P[1], P[3]], ["G5", "G6"])}
    texts = [f"A cell. {fact_sentence([P[0], P[1]], [('G1', 'one'), ('G9', 'nine')], 0)}",
             f"A cell. {fact_sentence([P[0], P[3]], [('G2', 'two')], 1)}", "A cell."]
    m = claim_metrics(texts, test, templates)
    pc, mc = m["program_claims"], m["marker_claims"]
    assert pc["precision"] == pytest.approx(0.75) and pc["recall"] == pytest.approx(1 / 3)
    assert pc["f1"] == pytest.approx(6 / 13)
    assert pc["f1_within_type"] == pytest.approx(0.3)
    assert pc["baseline_f1_within_type"] == pytest.approx((5 / 6 + 1) / 2)
    assert mc["precision"] == pytest.approx(2 / 3) and mc["unknown_rate"] == 0.0
    # baseline markers: T names G1, G2, G3 for both cells: c0 top-20 {1,4}: 1 hit; c1 {2,3}: 2; U names G5, G6: 1
    assert mc["baseline_precision"] == pytest.approx(4 / 8)


def test_ranked_program_precision_on_a_hand_made_fixture():
    """The cells of the fixture above (top 3: c0 A,B,C; c1 D,C,B; c2 A,D,B) with the LLM's 3 likeliest programs
    c0 D,A,C (2 right), c1 D,C,B (3), c2 C,D,B (2): precision 7/9; within type T 5/6, U 2/3, mean 3/4. Type
    template T -> A,B,C, U -> A,B,D: c0 3, c1 2, c2 3 right: 8/9. Chance: 3 of 4 programs."""
    scores = [[3, 2, 1, 0], [0, 1, 2, 3], [3, 1, 0, 2]]
    test = _facts(["T", "T", "U"], scores, [[1], [2], [5]])
    train = _facts(["T", "T", "U"], [[3, 2, 1, 0], [3, 1, 2, 0], [3, 2, 0, 1]], [[1], [1], [5]])
    A, B, C, D = P
    m = ranked_metrics([[D, A, C], [D, C, B], [C, D, B]], test, type_templates(train))
    assert m == pytest.approx({"precision": 7 / 9, "precision_within_type": 3 / 4, "baseline_precision": 8 / 9,
                               "chance": 3 / 4})


def test_search_auroc_is_one_when_similarity_follows_the_score_and_half_when_it_is_flat():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(40, 4))
    test = _facts(["T"] * 20 + ["U"] * 20, scores, [[]] * 40)
    emb = np.hstack([scores, np.zeros((40, 1))])
    text = np.eye(5)[:4]
    m = search_metrics(emb, text, test)
    assert m["auroc"] == 1.0 and m["auroc_within_type"] == 1.0 and m["n_programs"] == 4
    flat = search_metrics(np.ones((40, 5)), text, test)
    assert flat["auroc"] == 0.5 and flat["auroc_within_type"] == 0.5


GENES = ["STAT1", "ISG15", "IFIT1", "IFIT3", "CXCL10", "IRF1", "HLA-DRA", "CD74", "LYZ", "CD3D", "CD3E",
         "CD8A", "CD4", "MS4A1", "CD79A", "NKG7", "GNLY", "CD14", "GZMB", "IL7R"]


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> dict[str, Path]:
    from scmm.data_pipeline.build import BuildConfig, build_corpus
    tmp = tmp_path_factory.mktemp("lang")
    make_adata(n_cells=160, donors=8, genes=GENES).write_h5ad(tmp / "a.h5ad")
    out = {}
    for facts in (True, False):
        out[str(facts)] = tmp / f"c{facts}"
        build_corpus(BuildConfig(inputs=[tmp / "a.h5ad"], out=out[str(facts)], facts=facts, progress=False))
    return out


def test_fact_questions_answer_with_the_cells_facts_and_vanish_without_facts(corpora):
    from scmm.data_pipeline.instructions import instruction_dataset
    from scmm.data_pipeline.store import Corpus
    corpus = Corpus(corpora["True"])
    names = corpus.facts["programs"]["names"]
    assert len(names) == 3
    ds = instruction_dataset(corpus, "train", ("programs", "markers"))
    entry = corpus.shards("train")[0]
    scores, markers = corpus.read_facts(entry["name"])
    rows = [r for r in ds][:2]
    assert [r["task"] for r in rows] == ["programs", "markers"]
    assert parse_claims(rows[0]["answer"]).programs == [names[p] for p in np.argsort(-scores[0], kind="stable")]
    assert parse_claims(rows[1]["answer"]).genes == [str(corpus.gene_symbols[g]) for g in markers[0][:3] if g >= 0]
    assert len(instruction_dataset(Corpus(corpora["False"]), "train", ("programs", "markers"))) == 0
    assert len(instruction_dataset(Corpus(corpora["False"]), "train", ("describe", "programs"))) > 0


def test_describe_answers_without_the_fact_sentence_keep_every_other_sentence(corpora):
    """data.describe_facts: false (an LLM too small to learn the cell-specific sentence): the describe answer is the
    caption without it, word for word otherwise, and names no program or gene; a corpus without facts is unchanged."""
    from scmm.data_pipeline.instructions import instruction_dataset
    from scmm.data_pipeline.store import Corpus
    corpus = Corpus(corpora["True"])
    full = instruction_dataset(corpus, "train", ("describe",))
    short = instruction_dataset(corpus, "train", ("describe",), describe_facts=False)
    assert full["cell_id"] == short["cell_id"] and len(full) > 100
    for f, s in zip(full["answer"], short["answer"]):
        claims = parse_claims(f)
        assert claims.programs and claims.genes  # the caption's sentence
        assert parse_claims(s).programs == [] and parse_claims(s).genes == []
        first = f.split(". ")[0] + "."
        rest = f[f.index(claims.genes[-1]):].split("). ", 1)[1]  # after the sentence's last "SYMBOL (name)."
        assert s == f"{first} {rest}"
    plain = Corpus(corpora["False"])
    assert instruction_dataset(plain, "train", ("describe",), describe_facts=False)["answer"] == \
        instruction_dataset(plain, "train", ("describe",))["answer"]


def test_eval_writes_language_keys_with_facts_and_marks_them_absent_without(corpora, tmp_path):
    from scmm.eval.harness import evaluate
    with_facts = evaluate(save_tiny_stage1(corpora["True"], tmp_path / "m1"), corpora["True"], tmp_path / "e1",
                          tasks="retrieve", progress=False)
    lang = with_facts["language"]
    assert lang["n_programs"] == 3 and lang["n_cells"] > 0
    assert 0.0 <= lang["search"]["auroc"] <= 1.0 and lang["search"]["n_programs"] == 3
    assert "## Language about each cell" in (tmp_path / "e1" / "report.md").read_text()
    without = evaluate(save_tiny_stage1(corpora["False"], tmp_path / "m2"), corpora["False"], tmp_path / "e2",
                       tasks="retrieve", progress=False)
    assert set(without["language"]) == {"absent"} and "retrieval" in without
    assert "Not measured: the corpus has no per-cell facts" in (tmp_path / "e2" / "report.md").read_text()


def _older(corpus: Path, out: Path) -> Path:
    """A copy of ``corpus`` whose manifest has no ``facts`` entry (as corpora built before the facts existed)."""
    import json
    import shutil
    shutil.copytree(corpus, out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest.pop("facts")
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def test_stage2_pairs_use_program_texts_with_facts_and_descriptions_without(corpora, tmp_path):
    """With facts the text -> cell inputs include "<type> with high/low <program> activity" (the cell's most / least
    active program) and the refit sees each profile with its description and both texts; an older corpus gives the
    descriptions alone and its fact tasks no rows, so it still trains."""
    from scmm.data_pipeline.hvg import hvg_panel
    from scmm.data_pipeline.store import Corpus
    from scmm.finetune.pairs import PairBuilder
    corpus = Corpus(corpora["True"])
    genes = hvg_panel(corpus, n_top=8, split="train")
    tasks = ["describe", "cell_type", "programs", "markers"]
    pairs = PairBuilder(corpus, "train", tasks, 0, genes, builder=None)
    texts, index, x = pairs.refit_data()
    n = corpus.manifest["splits"]["train"]
    assert len(index) == len(x) == 3 * n
    high, low = texts[int(index[n])], texts[int(index[2 * n])]
    assert high.endswith("activity") and " with high " in high and " with low " in low
    assert all(len(r) == 4 for r in pairs.rows.values())
    old = Corpus(_older(corpora["True"], tmp_path / "old"))
    assert old.facts is None
    pairs = PairBuilder(old, "train", tasks, 0, genes, builder=None)
    texts, index, x = pairs.refit_data()
    assert len(index) == len(x) == n and pairs.query_index is None
    assert all(len(r) == 2 for r in pairs.rows.values())  # describe and cell_type


def test_eval_of_an_older_corpus_marks_language_absent(corpora, tmp_path):
    from scmm.eval.harness import evaluate
    old = _older(corpora["True"], tmp_path / "old")
    m = evaluate(save_tiny_stage1(old, tmp_path / "m"), old, tmp_path / "e", tasks="retrieve", progress=False)
    assert set(m["language"]) == {"absent"} and "retrieval" in m


def test_fact_views_replace_the_asked_share_of_texts_and_keep_label_captions(small_corpus, tmp_path):
    import torch

    from scmm.model.aligner import AlignerLoss, CellTextAligner
    model = CellTextAligner.from_pretrained(save_tiny_stage1(small_corpus, tmp_path / "s1"))
    caption = "A B cell from the blood. " + fact_sentence(["HALLMARK_HYPOXIA"], [("LYZ", "lysozyme")], 0)
    texts = [caption] * 200 + ["A B cell from the blood."] * 50

    def views():
        return model._text_views(texts, torch.Generator().manual_seed(3))

    assert views() == texts  # fact_view 0: the captions as they are
    model.config.loss.fact_view = 0.5
    out = views()
    assert out == views()  # seeded by the step's generator
    changed = [v != t for v, t in zip(out, texts)]
    assert 70 <= sum(changed[:200]) <= 130 and not any(changed[200:])  # a caption without claims stays
    full = parse_claims(caption)
    seen = set()
    for v in (v for v, c in zip(out, changed) if c):
        claims = parse_claims(v)
        assert "B cell" not in v and claims.programs in ([], full.programs) and claims.genes in ([], full.genes)
        seen.add((bool(claims.programs), bool(claims.genes)))
    assert seen == {(True, True), (True, False), (False, True)}  # programs and genes, programs, genes
    assert len({v for v, c in zip(out, changed) if c}) > 3  # and several phrasings
    model.config.loss.fact_view = 1.0
    assert all(v != t for v, t in zip(views()[:200], texts))
    with pytest.raises(ValueError, match="fact_view"):
        AlignerLoss(fact_view=1.5)


def test_a_fact_view_is_a_negative_for_the_other_cells_of_its_type(corpora, tmp_path, monkeypatch):
    """Two captions of one type share its description, so the contrastive loss masks such pairs; a fact view shares
    nothing but what the cells share, so it enters unmasked (label -1)."""
    import torch

    from scmm.data_pipeline.loader import CorpusLoader, LoaderConfig
    from scmm.model import aligner as aligner_module
    model = aligner_module.CellTextAligner.from_pretrained(save_tiny_stage1(corpora["True"], tmp_path / "s1"))
    model.config.loss.matching = 0.0
    batch = next(iter(CorpusLoader(corpora["True"], "train", LoaderConfig(batch_size=16, shuffle=False),
                                   model.encoding, model.vocab)))
    seen = []
    real = aligner_module.contrastive_loss
    monkeypatch.setattr(aligner_module, "contrastive_loss",
                        lambda cell, text, scale, labels, *rest: seen.append(labels) or real(cell, text, scale, labels,
                                                                                             *rest))
    for share in (0.0, 1.0):
        model.config.loss.fact_view = share
        model(batch)
    assert torch.equal(seen[0], batch["labels"]) and (seen[0] >= 0).all()
    assert (seen[1] == -1).all()


def test_query_contrastive_aligns_the_query_states_alone_and_adds_to_the_loss(corpora, tmp_path):
    """loss.query_contrastive: the contrastive loss of the query states without the <cls> shortcut (the states
    stage 2 reads), weighted into the total; its gradient reaches the Q-Former but not the shortcut."""
    import torch

    from scmm.data_pipeline.loader import CorpusLoader, LoaderConfig
    from scmm.model.aligner import AlignerLoss, CellTextAligner
    from scmm.model.losses import contrastive_loss
    model = CellTextAligner.from_pretrained(save_tiny_stage1(corpora["True"], tmp_path / "s1"))
    model.eval()  # no dropout: the forwards below are compared exactly
    assert model.heads.cls_proj is not None  # the shortcut the query-only term leaves out
    model.config.loss.matching = 0.0
    batch = next(iter(CorpusLoader(corpora["True"], "train", LoaderConfig(batch_size=16, shuffle=False),
                                   model.encoding, model.vocab)))
    off = model(batch, step=1)
    assert "query_contrastive" not in off
    model.config.loss.query_contrastive = 0.5
    seen = []  # the query states of the forward (matching is off: the Q-Former runs once)
    hook = model.qformer.register_forward_hook(lambda mod, args, out: seen.append(out.detach()))
    on = model(batch, step=1)
    hook.remove()
    lo = model.config.loss
    torch.testing.assert_close(on["loss"], lo.contrastive * on["contrastive"] + lo.reconstruction * on["reconstruction"]
                               + 0.5 * on["query_contrastive"])
    torch.testing.assert_close(on["contrastive"], off["contrastive"])  # the other terms are unchanged
    with torch.no_grad():
        (query,) = seen
        want = contrastive_loss(model.heads.cell_features(query).float(), model.text_features(batch["text"]).float(),
                                model.heads.get_logit_scale(), batch["labels"] if lo.same_label_not_negative else None)
    torch.testing.assert_close(on["query_contrastive"], want)
    model.zero_grad()
    on["query_contrastive"].backward()
    assert model.heads.cls_proj.weight.grad is None or not model.heads.cls_proj.weight.grad.any()
    assert model.qformer.query_tokens.grad is not None
    assert model.heads.cell_proj.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="loss weights"):
        AlignerLoss(query_contrastive=-1.0)
