"""Evaluation metrics against values computed by hand on tiny fixtures, and the baselines on a small corpus."""
from __future__ import annotations

import math

import numpy as np
import pytest

from scmm.data_pipeline.hvg import log1p_profiles
from scmm.data_pipeline.ontology import get_ontology
from scmm.eval.baselines import (
    knn_smoothing,
    logistic_regression_baseline,
    majority_baseline,
    pca_knn_baseline,
    run_corpus_baselines,
)
from scmm.eval.knn import build_index, knn_search, knn_vote, pseudocell_knn_accuracy
from scmm.eval.metrics import (
    annotation_metrics,
    apply_unknown,
    choose_unknown_threshold,
    confusion_matrix_png,
    text_generation_metrics,
)
from scmm.eval.ontology_score import ontology_score, ppr_similarity
from scmm.eval.retrieval import retrieval_metrics

CD8_T, CD4_T, MATURE_AB_T, T_CELL = "CL:0000625", "CL:0000624", "CL:0000791", "CL:0000084"
B_CELL, CD14_MONO, HEPATOCYTE, EPITHELIAL, CELL = "CL:0000236", "CL:0001054", "CL:0000182", "CL:0000066", "CL:0000000"


@pytest.fixture(scope="module")
def onto():
    return get_ontology()


# --- ontology scores -----------------------------------------------------------------------------------

def test_ontology_path_score_by_hand(onto):
    assert onto.parents(CD8_T) == [MATURE_AB_T] and onto.parents(CD4_T) == [MATURE_AB_T]
    assert ontology_score(CD8_T, CD8_T, onto) == 1.0
    assert ontology_score(MATURE_AB_T, CD8_T, onto) == pytest.approx(0.8)  # parent: 1 step
    assert ontology_score(CD8_T, MATURE_AB_T, onto) == pytest.approx(0.8)  # child: 1 step
    assert ontology_score(CD4_T, CD8_T, onto) == pytest.approx(0.64)  # sibling: 1 + 1 steps
    # CD8 T -> mature ab T -> mature T -> T cell: 3 steps (shortest upward path)
    assert ontology_score(T_CELL, CD8_T, onto) == pytest.approx(0.8 ** 3)
    # B cell -> lymphocyte of B lineage -> lymphocyte (2) + CD8 T -> ... -> lymphocyte (4)
    assert ontology_score(B_CELL, CD8_T, onto) == pytest.approx(0.8 ** 6)
    # CD14 monocyte and hepatocyte share only 'eukaryotic cell' and 'cell' (generic): unrelated
    assert ontology_score(CD14_MONO, HEPATOCYTE, onto) == 0.0
    assert ontology_score(CELL, CD8_T, onto) == 0.0  # a generic prediction earns nothing
    assert ontology_score(HEPATOCYTE, EPITHELIAL, onto, decay=0.5) == pytest.approx(0.5)


def test_non_cl_labels_score_by_string_equality(onto):
    for fn in (ontology_score, ppr_similarity):
        assert fn("T cell", "T cell", onto) == 1.0
        assert fn("unknown", CD8_T, onto) == 0.0
        assert fn("some free text", "other text", onto) == 0.0
        assert fn("UBERON:0000178", CD8_T, onto) == 0.0
        assert fn("CL:9999999", "CL:9999999", onto) == 1.0


def test_ppr_similarity_two_way(onto):
    assert ppr_similarity(CD8_T, CD8_T, onto) == 1.0
    # hepatocyte's only non-generic ancestor is 'epithelial cell', whose parents are generic: a 2-node graph,
    # the walk from either end hits the other at its first step with probability 1 - alpha
    assert ppr_similarity(EPITHELIAL, HEPATOCYTE, onto) == pytest.approx(0.85, abs=1e-9)
    assert ppr_similarity(HEPATOCYTE, EPITHELIAL, onto, alpha=0.3) == pytest.approx(0.7, abs=1e-9)
    parent, t_cell = ppr_similarity(MATURE_AB_T, CD8_T, onto), ppr_similarity(T_CELL, CD8_T, onto)
    child = ppr_similarity(CD8_T, MATURE_AB_T, onto)
    unrelated = ppr_similarity(HEPATOCYTE, CD8_T, onto)
    assert unrelated == 0.0 and ppr_similarity(CD14_MONO, HEPATOCYTE, onto) == 0.0
    assert child == pytest.approx(parent)  # symmetric: the direction problem is gone
    assert 1.0 > parent > t_cell > ppr_similarity(B_CELL, CD8_T, onto) > unrelated
    assert ppr_similarity(CELL, CD8_T, onto) == 0.0


# --- annotation metrics ----------------------------------------------------------------------------------

def test_annotation_metrics_six_cells(onto, tmp_path):
    y_true = [CD8_T, CD8_T, CD8_T, CD4_T, CD4_T, B_CELL]
    y_pred = [CD8_T, CD8_T, CD4_T, CD4_T, B_CELL, B_CELL]
    m = annotation_metrics(y_true, y_pred, onto)
    assert m["accuracy"] == pytest.approx(4 / 6)
    # F1: CD8 (P 1, R 2/3) 0.8; CD4 (P 1/2, R 1/2) 0.5; B (P 1/2, R 1) 2/3
    assert m["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    # 4 exact + sibling (0.64) + B cell for CD4 T (0.8**6)
    assert m["ontology_score"] == pytest.approx((4 + 0.64 + 0.8 ** 6) / 6)
    assert 0.0 < m["ppr_score"] < 1.0
    assert m["n_cells"] == 6 and m["n_classes"] == 3
    rows = {r["label"]: r for r in m["per_class"]}
    assert rows[CD8_T]["precision"] == 1.0 and rows[CD8_T]["recall"] == pytest.approx(2 / 3)
    assert rows[B_CELL]["support"] == 1 and rows[B_CELL]["name"] == "B cell"
    # an extra requested label is reported but does not enter the macro average
    m2 = annotation_metrics(y_true, y_pred, onto, labels=[B_CELL, CD4_T, CD8_T, CD14_MONO])
    assert [r["label"] for r in m2["per_class"]] == [B_CELL, CD4_T, CD8_T, CD14_MONO]
    assert m2["macro_f1"] == pytest.approx(m["macro_f1"])
    path = confusion_matrix_png(y_true, y_pred[:-1] + ["unknown"], [CD8_T, CD4_T, B_CELL],
                                [onto.label(c) for c in (CD8_T, CD4_T, B_CELL)], tmp_path / "cm.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unknown_threshold_on_validation_then_applied():
    scores = [0.9, 0.8, 0.7, 0.4, 0.3, 0.2]
    correct = [True, True, False, True, False, False]
    # correct decisions per threshold: keep all 3/6; <0.25: 4; <0.35: 5; <0.55: 4; <0.75: 5; <0.85: 4
    assert choose_unknown_threshold(scores, correct) == pytest.approx(0.35)  # lowest of the tied best
    # accuracy of kept cells is 1 at 0.75 (coverage 1/3); with >= 50 % coverage 0.35 is best (3/4)
    assert choose_unknown_threshold(scores, correct, criterion="accuracy") == pytest.approx(0.75)
    assert choose_unknown_threshold(scores, correct, "accuracy", min_coverage=0.5) == pytest.approx(0.35)
    assert choose_unknown_threshold([0.1, 0.5], [True, True]) == -math.inf
    out = apply_unknown(["a", "b", "c"], [0.5, 0.3, 0.35], 0.35)
    assert out.tolist() == ["a", "unknown", "c"]
    assert apply_unknown(["a"], [-5.0], -math.inf).tolist() == ["a"]


def test_text_generation_metrics_by_hand():
    same = text_generation_metrics(["a cd8 positive t cell from blood"], ["a cd8 positive t cell from blood"])
    assert all(v == pytest.approx(1.0) for v in same.values()) and set(same) == {"bleu2", "bleu4", "rouge1",
                                                                                  "rouge2", "rougeL"}
    disjoint = text_generation_metrics(["alpha beta gamma delta"], ["one two three four"])
    assert all(v == 0.0 for v in disjoint.values())
    m = text_generation_metrics(["the cat sat on the mat"], ["the cat sat on a mat"])
    # unigram 5/6, bigram 3/5, trigram 2/4, 4-gram 1/3 matches; equal lengths, so no brevity penalty
    assert m["bleu2"] == pytest.approx(math.sqrt(5 / 6 * 3 / 5), abs=1e-6)
    assert m["bleu4"] == pytest.approx((5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25, abs=1e-6)
    assert m["rouge1"] == pytest.approx(5 / 6) and m["rouge2"] == pytest.approx(3 / 5)
    assert m["rougeL"] == pytest.approx(5 / 6)  # LCS "the cat sat on mat"


# --- k-NN --------------------------------------------------------------------------------------------------

def test_knn_vote_majority_and_ties():
    lab = np.array([[1, 2, 2, 1, 3],   # 1 and 2 tie (2 votes): 1 is nearest
                    [2, 1, 1, 2, 3],   # tie: 2 is nearest
                    [3, 1, 2, 1, 2],   # 1 and 2 tie: 1 occurs first
                    [3, 3, 0, 0, 0],   # plain majority
                    [0, 0, 1, -1, -1]])  # missing neighbours do not vote
    pred, conf = knn_vote(lab, n_classes=4)
    assert pred.tolist() == [1, 2, 1, 0, 0]
    assert conf.tolist() == pytest.approx([0.4, 0.4, 0.4, 0.6, 2 / 3])
    spred, _ = knn_vote(np.array([["b", "a", "a", "b"]]))
    assert spred.tolist() == ["b"]


def test_faiss_search_exact():
    x = np.array([[0, 0], [1, 0], [5, 5]], dtype=np.float32)
    _, ids = knn_search(build_index(x, "l2"), np.array([[0.9, 0.1]], dtype=np.float32), 2)
    assert ids.tolist() == [[1, 0]]


def test_pseudocell_knn_accuracy_excludes_rare_types():
    rng = np.random.default_rng(0)
    centres = {"a": (0, 0), "b": (10, 0), "c": (0, 10)}
    ref_lab = ["a"] * 6 + ["b"] * 6 + ["c"] * 2  # 'c' has 2 < k = 5 reference cells
    ref = np.array([centres[t] for t in ref_lab]) + rng.normal(0, 0.1, (14, 2))
    gen_lab = ["a", "a", "a", "b", "b", "b", "c", "c", "d"]
    gen_at = ["a", "a", "a", "b", "b", "a", "c", "c", "a"]  # one 'b' pseudo-cell lands among the 'a' cells
    gen = np.array([centres[t] for t in gen_at]) + rng.normal(0, 0.1, (9, 2))
    r = pseudocell_knn_accuracy(gen, gen_lab, ref, ref_lab, k=5)
    assert r["knn_accuracy"] == pytest.approx(5 / 6) and r["k"] == 5 and r["n_scored"] == 6
    assert r["random_baseline"] == pytest.approx(1 / 2)
    assert r["excluded_types"] == {"c": 2, "d": 0}
    assert r["per_type"]["a"]["accuracy"] == 1.0 and r["per_type"]["b"]["accuracy"] == pytest.approx(2 / 3)
    assert pseudocell_knn_accuracy(gen, gen_lab, ref, ref_lab, k=5, metric="ip")["k"] == 5


# --- retrieval ---------------------------------------------------------------------------------------------

def test_retrieval_recall_and_mean_rank_3x3():
    cells = np.eye(3, dtype=np.float32)
    texts = np.array([[0.8, 0.6, 0.0], [0.6, 0.0, 0.8], [0.0, 0.8, 0.6]], dtype=np.float32)
    # cell->text scores = texts.T: the match ranks 1 (0.8 top), 3 (0 lowest), 2 (0.6 below 0.8)
    r = retrieval_metrics(cells, texts, cell_labels=["x", "y", "x"])
    for d in ("cell_to_text", "text_to_cell"):
        assert r[f"{d}_recall@1"] == pytest.approx(1 / 3)
        assert r[f"{d}_recall@5"] == 1.0 and r[f"{d}_recall@10"] == 1.0
        assert r[f"{d}_mean_rank"] == pytest.approx(2.0)
    # top-1 text of cell 0 is text 0 (x: hit), of cell 1 text 2 (x != y), of cell 2 text 1 (y != x)
    assert r["cell_to_text_label_recall@1"] == pytest.approx(1 / 3)
    assert r["cell_to_text_label_recall@5"] == 1.0


def test_retrieval_ties_count_as_random_order():
    cells = np.array([[1, 0], [0.9, 0.1], [0, 1]], dtype=np.float32)
    texts = np.array([[1, 0], [1, 0], [0, 1]], dtype=np.float32)  # cells 0 and 1 share one text
    r = retrieval_metrics(cells, texts)
    assert r["cell_to_text_recall@1"] == pytest.approx((0.5 + 0.5 + 1) / 3)
    assert r["cell_to_text_mean_rank"] == pytest.approx((1.5 + 1.5 + 1) / 3)
    assert r["cell_to_text_recall@5"] == 1.0


def test_retrieval_faiss_topk_and_blocked_ranks_match_brute_force():
    from scmm.eval.knn import l2_normalise
    from scmm.eval.retrieval import faiss_topk, match_counts
    rng = np.random.default_rng(0)
    cells = l2_normalise(rng.normal(size=(300, 16)))
    texts = l2_normalise(cells + rng.normal(scale=0.8, size=cells.shape))
    labels = rng.integers(0, 6, 300).astype(str)
    s = cells @ texts.T
    top = faiss_topk(cells, texts, 10)
    assert top.shape == (300, 10)
    np.testing.assert_array_equal(top, np.argsort(-s, axis=1, kind="stable")[:, :10])
    assert faiss_topk(cells[:3], texts[:4], 10).shape == (3, 4)  # k capped at the number of targets
    counts = match_counts(cells, texts, topk=10, block_bytes=4 * 300 * 7)  # blocks of 7 rows
    d = np.diag(s)
    rank_row = 1 + (s > d[:, None] + 1e-5).sum(1)
    rank_col = 1 + (s > d[None, :] + 1e-5).sum(0)
    np.testing.assert_array_equal(counts["g_row"] + 1, rank_row)
    np.testing.assert_array_equal(counts["g_col"] + 1, rank_col)
    r = retrieval_metrics(cells, texts, cell_labels=labels)
    assert r["cell_to_text_mean_rank"] == pytest.approx(rank_row.mean() + counts["e_row"].mean() / 2)
    assert r["text_to_cell_mean_rank"] == pytest.approx(rank_col.mean() + counts["e_col"].mean() / 2)
    for k in (1, 5, 10):
        assert r[f"cell_to_text_recall@{k}"] == pytest.approx(np.mean(rank_row <= k))
        assert r[f"text_to_cell_recall@{k}"] == pytest.approx(np.mean(rank_col <= k))
        brute = np.argsort(-s, axis=1)[:, :k]
        assert r[f"cell_to_text_label_recall@{k}"] == pytest.approx(
            np.mean((labels[brute] == labels[:, None]).any(1)))
        brute_t = np.argsort(-s.T, axis=1)[:, :k]
        assert r[f"text_to_cell_label_recall@{k}"] == pytest.approx(
            np.mean((labels[brute_t] == labels[:, None]).any(1)))


# --- baselines ---------------------------------------------------------------------------------------------

def test_baselines_on_small_corpus(small_corpus, onto):
    from scmm.data_pipeline.store import Corpus

    corpus = Corpus(small_corpus)
    x_train, _, y_train = log1p_profiles(corpus, "train", np.arange(corpus.n_genes))
    y_train = np.asarray(y_train)
    assert x_train.shape == (320, 20) and x_train.dtype == np.float32 and len(y_train) == 320
    assert np.expm1(x_train.astype(np.float64)).sum(axis=1) == pytest.approx(np.full(320, 1e4), rel=1e-4)
    out = run_corpus_baselines(corpus, n_genes=2000)
    y = out["y_true"]
    scores = {name: annotation_metrics(y, p, onto)["accuracy"] for name, p in out["predictions"].items()}
    assert scores["logistic_regression"] >= 0.9 and scores["pca_knn"] >= 0.9
    assert scores["logistic_regression"] > scores["majority"] + 0.4
    assert majority_baseline(["b", "a", "b", "a"], 2).tolist() == ["a", "a"]  # tie -> smallest label
    # k-NN smoothing repairs scattered errors in another model's predictions
    noisy = out["predictions"]["logistic_regression"].copy()
    noisy[::8] = CD8_T
    smoothed = knn_smoothing(noisy, out["z_test"], k=15, fit_pca=False)
    assert np.mean(smoothed == y) > np.mean(noisy == y)
    assert out["z_test"].shape[0] == len(y) and out["n_train_used"] == 320
    # the train cap: a seeded subsample, the same for a seed
    capped = run_corpus_baselines(corpus, n_genes=2000, max_train_cells=50, seed=3)
    assert capped["n_train_used"] == 50 and list(capped["y_true"]) == list(y)
    again = run_corpus_baselines(corpus, n_genes=2000, max_train_cells=50, seed=3)
    assert all(np.array_equal(capped["predictions"][n], again["predictions"][n]) for n in capped["predictions"])
    # the streamed baselines agree with the in-memory functions fitted on the same cells
    x_test, _, _ = log1p_profiles(corpus, "test", out["genes"])
    assert out["predictions"]["pca_knn"].tolist() == \
        pca_knn_baseline(x_train[:, out["genes"]], y_train, x_test).tolist()
    assert out["predictions"]["logistic_regression"].tolist() == \
        logistic_regression_baseline(x_train[:, out["genes"]], y_train, x_test).tolist()
    assert logistic_regression_baseline(x_train, y_train, x_train[:3]).shape == (3,)
    assert pca_knn_baseline(x_train, y_train, x_train[:3], k=1).tolist() == list(y_train[:3])


def test_smoothing_k_rule():
    from scmm.eval.baselines import smoothing_k
    assert [smoothing_k(n) for n in (0, 10, 40, 70, 400, 900, 10 ** 5)] == [3, 3, 3, 4, 10, 15, 15]


def test_knn_smoothing_by_hand():
    x = np.array([[0, 0], [0.1, 0], [0, 0.1], [5, 5], [5.1, 5], [5, 5.1]], dtype=np.float32)
    pred = ["a", "a", "b", "b", "b", "b"]
    assert knn_smoothing(pred, x, k=3).tolist() == ["a", "a", "a", "b", "b", "b"]
    assert knn_smoothing(pred, x, k=1).tolist() == pred  # a cell is its own nearest neighbour


# --- pseudo-cells (eval.pseudocell) ------------------------------------------------------------------------

def test_pseudocell_report_real_cells_hit_and_class_mean_is_seeded(small_corpus):
    from scmm.data_pipeline.hvg import log1p_profiles
    from scmm.data_pipeline.store import Corpus
    from scmm.eval.pseudocell import class_mean_profiles, pseudocell_report, type_moments
    from scmm.eval.report import pseudocell_section

    corpus = Corpus(small_corpus)
    genes = np.arange(corpus.n_genes)
    # pseudo-cells that are copies of real held-out cells of their type: their neighbours are their own kind
    x_val, _, y_val = log1p_profiles(corpus, "val", genes)
    x_test, _, y_test = log1p_profiles(corpus, "test", genes)
    x, y = np.concatenate([x_val, x_test]), np.array(y_val + y_test)
    # an extra set scored against the same PCA and references: the copies, and the copies with shuffled labels
    shuffled = np.random.default_rng(0).permutation(y)
    r = pseudocell_report(corpus, x, y, genes, k=5, n_components=5, extra={"same": (x, y), "wrong": (x, shuffled)})
    assert r["extra"]["same"] == {"expression_pca": 1.0}
    assert r["extra"]["wrong"]["expression_pca"] == pytest.approx(np.mean(shuffled == y), abs=0.15)
    assert r["knn_accuracy"] == 1.0 and r["space"] == "expression_pca" and r["k"] == 5
    assert r["random_baseline"] == pytest.approx(1 / 4) and set(r["spaces"]) == {"expression_pca"}
    sp = r["spaces"]["expression_pca"]
    assert sp["n_scored"] == len(y) and sp["excluded_types"] == {} and sp["knn_accuracy"] == 1.0
    assert 0.9 <= r["class_mean_reference"] <= 1.0  # well separated types: the class means hit too
    # real train cells of each type, as many as pseudo-cells: well separated types, so they hit as well
    assert r["real_cells_reference"] == sp["real_cells_reference"] >= 0.9
    from scmm.eval.pseudocell import real_cell_sample
    counts = {"CL:0000084": 3, "CL:0000236": 500, "CL:0000000": 2}
    rx, rl = real_cell_sample(corpus, genes, counts, seed=1)
    x_train, _, y_train = log1p_profiles(corpus, "train", genes)
    n_b = sum(t == "CL:0000236" for t in y_train)
    assert rl == ["CL:0000084"] * 3 + ["CL:0000236"] * n_b  # all of a type with fewer; none of an absent one
    rows = {tuple(v) for v in x_train}
    assert all(tuple(v) in rows for v in rx)  # real train rows
    again, _ = real_cell_sample(corpus, genes, counts, seed=1)
    other, _ = real_cell_sample(corpus, genes, counts, seed=2)
    assert np.array_equal(rx, again) and not np.array_equal(rx[:3], other[:3])
    assert set(sp["per_type"]) == set(y) and all(v["n_reference"] >= 5 for v in sp["per_type"].values())
    assert r["n_reference"] == len(y) and r["notes"] == []  # >= 20 pseudo-cells per type
    # the class-mean reference is deterministic for a seed, and changes with it
    assert pseudocell_report(corpus, x, y, genes, k=5, n_components=5)["class_mean_reference"] == \
        r["class_mean_reference"]
    moments = type_moments(corpus, genes)
    a, la, _ = class_mean_profiles(moments, {"CL:0000084": 3, "CL:0000236": 2}, seed=1)
    b, lb, _ = class_mean_profiles(moments, {"CL:0000084": 3, "CL:0000236": 2}, seed=1)
    c, _, missing = class_mean_profiles(moments, {"CL:0000084": 3, "CL:0000236": 2, "CL:0000000": 1}, seed=2)
    assert np.array_equal(a, b) and la.tolist() == lb.tolist() == ["CL:0000084"] * 3 + ["CL:0000236"] * 2
    assert not np.array_equal(a, c[:5]) and missing == ["CL:0000000"] and a.min() >= 0
    m = moments["CL:0000084"]
    x_tr, _, y_tr = log1p_profiles(corpus, "train", genes)
    rows = x_tr[np.array(y_tr) == "CL:0000084"].astype(np.float64)
    assert m.n == len(rows)
    np.testing.assert_allclose(m.mean, rows.mean(0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(m.std, rows.std(0, ddof=1), rtol=1e-5, atol=1e-5)
    g = int(np.argmax(((rows > 0).sum(0) >= 2) & ((rows > 0).sum(0) < len(rows))))  # a gene sometimes detected
    detected = rows[rows[:, g] > 0, g]
    assert m.detected[g] == pytest.approx(len(detected) / len(rows))
    assert m.detected_mean[g] == pytest.approx(detected.mean(), rel=1e-6)
    assert m.detected_std[g] == pytest.approx(detected.std(ddof=1), rel=1e-5)
    # the class-mean profiles are as sparse as the type's train cells (5,000 draws of the type)
    big, _, _ = class_mean_profiles(moments, {"CL:0000084": 5000}, seed=0)
    np.testing.assert_allclose((big > 0).mean(0), m.detected, atol=0.03)
    # pseudo-cells that are copies of the reference cells are exactly as sparse as them
    assert r["zero_fraction_ratio"] == pytest.approx(1.0, abs=1e-9)
    assert set(r["zero_fraction"]) == set(y)
    text = "\n".join(pseudocell_section(r))
    assert "class-mean reference" in text and "expression_pca" in text


def test_zero_fractions_on_hand_computed_cells():
    from scmm.eval.pseudocell import zero_fractions
    gen = np.array([[0, 1, 2, 0], [0, 0, 0, 1], [1, 1, 1, 1]], dtype=np.float32)  # zeros: 1/2, 3/4, 0
    out = zero_fractions(gen, np.array(["a", "a", "b"]), np.array([0.5, 0.75, 0.25, 0.5, 0.0]),
                         np.array(["a", "a", "b", "b", "c"]))
    assert out["per_type"]["a"] == {"pseudo": 0.625, "real": 0.625, "ratio": 1.0}
    assert out["per_type"]["b"] == {"pseudo": 0.0, "real": 0.375, "ratio": 0.0}
    assert out["ratio"] == 0.5 and "c" not in out["per_type"]  # c: no pseudo-cells


def test_pseudocell_report_excludes_types_with_few_reference_cells(small_corpus):
    from scmm.data_pipeline.store import Corpus
    from scmm.eval.pseudocell import pseudocell_report
    from scmm.eval.report import pseudocell_section

    corpus = Corpus(small_corpus)
    genes = np.arange(corpus.n_genes)
    n_ref = {t: rec["splits"].get("val", 0) + rec["splits"].get("test", 0)
             for t, rec in corpus.manifest["cell_types"].items()}
    rng = np.random.default_rng(0)
    # a type with no reference cell at all, and k above some types' reference counts
    labels = np.array(sorted(n_ref) * 20 + ["CL:0000000"] * 20)
    x = rng.random((len(labels), len(genes))).astype(np.float32)
    k = sorted(n_ref.values())[len(n_ref) // 2]
    r = pseudocell_report(corpus, x, labels, genes, k=k, n_components=5)
    sp = r["spaces"]["expression_pca"]
    expect = {t: n for t, n in n_ref.items() if n < k} | {"CL:0000000": 0}
    assert sp["excluded_types"] == expect
    assert sp["n_types_scored"] == len(n_ref) - len(expect) + 1
    assert r["random_baseline"] == pytest.approx(1 / sp["n_types_scored"])
    assert set(sp["per_type"]).isdisjoint(expect) and sp["n_scored"] == 20 * sp["n_types_scored"]
    assert r["class_mean_missing_types"] == ["CL:0000000"]
    assert "`CL:0000000` (0)" in "\n".join(pseudocell_section(r))
    with pytest.raises(ValueError, match="reference cells"):
        pseudocell_report(corpus, x[-20:], labels[-20:], genes, k=5, n_components=5)
    with pytest.raises(ValueError):
        pseudocell_report(corpus, x[:, :3], labels, genes)


def test_pseudocell_report_reference_splits_val_only(small_corpus):
    """Tuning on val scores against val cells only: the reference holds exactly the val cells."""
    from scmm.data_pipeline.store import Corpus
    from scmm.eval.pseudocell import pseudocell_report

    corpus = Corpus(small_corpus)
    genes = np.arange(corpus.n_genes)
    n_val = {t: rec["splits"].get("val", 0) for t, rec in corpus.manifest["cell_types"].items()}
    labels = np.array([t for t, n in sorted(n_val.items()) if n >= 1] * 20)
    x = np.random.default_rng(0).random((len(labels), len(genes))).astype(np.float32)
    r = pseudocell_report(corpus, x, labels, genes, k=1, n_components=5, reference_splits=("val",))
    assert r["reference_splits"] == ["val"] and r["n_reference"] == corpus.manifest["splits"]["val"]
    both = pseudocell_report(corpus, x, labels, genes, k=1, n_components=5)
    assert both["reference_splits"] == ["val", "test"]
    assert both["n_reference"] == corpus.manifest["splits"]["val"] + corpus.manifest["splits"]["test"]


def test_repeated_phrase_rate():
    from scmm.eval.metrics import repeated_phrase_rate
    texts = ["A T cell from the blood of a healthy donor.",
             "A blood of the blood of a healthy donor. A blood of the blood.",  # "a blood of the" twice
             "The cell, the cell: THE CELL the cell."]  # "the cell the cell" twice, case and commas ignored
    assert repeated_phrase_rate(texts) == pytest.approx(2 / 3)
    assert repeated_phrase_rate(["one two three"]) == 0.0
    with pytest.raises(ValueError):
        repeated_phrase_rate([])
