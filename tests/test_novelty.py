"""The novelty check's expression reference (scmm.eval.novelty): profiles, similarity, storage, fitting."""
from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from scmm.data_pipeline.hvg import hvg_panel, log1p_profiles
from scmm.data_pipeline.store import Corpus
from scmm.eval.novelty import (
    ExpressionNovelty,
    calibrated_novelty,
    fit_novelty,
    leave_group_out_similarity,
    split_similarity,
)


def _identity_check(reference: np.ndarray, k: int) -> ExpressionNovelty:
    """Two genes (vocab ids 11 and 12), PCA = the identity: a profile's point is the profile, normalised."""
    return ExpressionNovelty(vocab_ids=np.array([11, 12]), mean=np.zeros(2, np.float32),
                             components=np.eye(2, dtype=np.float32), reference=reference.astype(np.float16), k=k)


def test_profiles_are_log1p_cp10k_over_the_file_genes_and_missing_genes_are_zero():
    check = ExpressionNovelty(vocab_ids=np.array([11, 12, 99]), mean=np.zeros(3, np.float32),
                              components=np.eye(3, dtype=np.float32), reference=np.ones((1, 3), np.float16))
    block = sp.csr_matrix(np.array([[1.0, 3.0, 0.0], [0.0, 0.0, 0.0], [2.0, 0.0, 2.0]]))
    x = check.profiles(block, np.array([10, 11, 12]))  # the file's columns: vocab ids 10, 11, 12; 99 absent
    expected = np.array([[math.log1p(7500.0), 0.0, 0.0],  # gene 11 = 3 of 4 counts; gene 12 = 0; 99 missing
                         [0.0, 0.0, 0.0],  # an empty cell stays zero (no division by zero)
                         [0.0, math.log1p(5000.0), 0.0]])
    assert x.dtype == np.float32 and np.allclose(x, expected, rtol=1e-6)


def test_similarity_is_the_mean_cosine_to_the_k_nearest_reference_points():
    ref = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    x = np.array([[2.0, 0.0], [1.0, 1.0], [0.0, -3.0]])
    one = _identity_check(ref, k=1).similarity(x)
    assert np.allclose(one, [1.0, math.sqrt(0.5), 0.0], atol=1e-6)
    two = _identity_check(ref, k=2).similarity(x)
    assert np.allclose(two, [0.5, math.sqrt(0.5), 0.0], atol=1e-6)  # (1 + 0) / 2; (0.707 + 0.707) / 2; (0 + 0) / 2
    # k beyond the reference: all of it; (1 + 0 - 1) / 3, (0.707 + 0.707 - 0.707) / 3, (0 - 1 + 0) / 3
    assert np.allclose(_identity_check(ref, k=10).similarity(x), [0.0, math.sqrt(0.5) / 3, -1 / 3], atol=1e-6)
    assert _identity_check(ref, k=1).similarity(np.zeros((0, 2))).shape == (0,)


def test_storage_round_trip_and_bad_arrays(tmp_path: Path):
    check = _identity_check(np.array([[1.0, 0.0], [0.6, 0.8]]), k=2)
    path = tmp_path / "novelty_reference.npz"
    check.save(path)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == check.sha256() == check.describe()["sha256"]
    with np.load(path) as npz:
        back = ExpressionNovelty.from_arrays({k: npz[k] for k in npz.files})
    assert back.k == 2 and np.array_equal(back.reference, check.reference)
    assert np.array_equal(back.vocab_ids, check.vocab_ids) and back.sha256() == check.sha256()
    with pytest.raises(ValueError, match="lacks components"):
        ExpressionNovelty.from_arrays({"vocab_ids": [1], "mean": [0.0], "reference": [[1.0]], "k": 1})
    with pytest.raises(ValueError, match="inconsistent"):
        ExpressionNovelty(vocab_ids=np.array([1, 2]), mean=np.zeros(3, np.float32),
                          components=np.eye(2, dtype=np.float32), reference=np.ones((1, 2), np.float16))
    with pytest.raises(ValueError, match="non-finite"):
        _identity_check(np.array([[np.nan, 0.0]]), k=1)


def test_fit_on_a_corpus_and_split_similarity(small_corpus: Path):
    corpus = Corpus(small_corpus)
    n_train = corpus.manifest["splits"]["train"]
    check = fit_novelty(corpus, seed=0, k=1)
    genes = hvg_panel(corpus, 2000, "train")
    assert np.array_equal(check.vocab_ids, np.asarray(corpus.gene_vocab_ids)[genes])
    assert check.reference.shape == (n_train, len(check.components)) and check.n_train_cells == n_train
    # every train cell is its own nearest reference point: similarity 1 (float16 reference)
    sim, ids = split_similarity(check, corpus, "train")
    assert len(ids) == n_train and np.allclose(sim, 1.0, atol=2e-3)
    # the other splits, shard by shard, as the profiles of the whole split give them
    val, vids = split_similarity(check, corpus, "val")
    x, xids, _ = log1p_profiles(corpus, "val", genes)
    assert vids == xids and np.allclose(val, check.similarity(x), atol=1e-6) and (val < 1.0 - 1e-3).any()
    # a bounded reference is a seeded subsample of the train cells
    part = fit_novelty(corpus, seed=3, max_cells=n_train // 2)
    again = fit_novelty(corpus, seed=3, max_cells=n_train // 2)
    assert len(part.reference) == n_train // 2 and part.n_train_cells == n_train
    assert part.sha256() == again.sha256() != fit_novelty(corpus, seed=4, max_cells=n_train // 2).sha256()


# --- calibration on the training cells (leave-donor-out) ------------------------------------------------------
def test_leave_group_out_similarity_on_hand_made_points():
    """Four unit points in the plane; cosines p0.p1 = 0.6, p0.p2 = 0, p0.p3 = -0.6, p1.p2 = 0.8, p1.p3 = 0.28,
    p2.p3 = 0.8. Each cell's value is the mean of its k largest cosines to the cells of *other* groups."""
    p = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [-0.6, 0.8]], dtype=np.float32)
    two = ["a", "a", "b", "b"]
    assert np.allclose(leave_group_out_similarity(p, p, two, k=1), [0.0, 0.8, 0.8, 0.28], atol=1e-6)
    assert np.allclose(leave_group_out_similarity(p, p, two, k=2), [-0.3, 0.54, 0.4, -0.16], atol=1e-6)
    # each cell its own group (leave-self-out)
    assert np.allclose(leave_group_out_similarity(p, p, range(4), k=1), [0.6, 0.8, 0.8, 0.8], atol=1e-6)
    # fewer other cells than k: the mean over those there are (p0..p2 see only p3; p3 its best two of three)
    uneven = ["a", "a", "a", "b"]
    assert np.allclose(leave_group_out_similarity(p, p, uneven, k=2), [-0.6, 0.28, 0.8, 0.54], atol=1e-6)
    # the reference rows are normalised again (as the stored float16 ones are at search), blocks change nothing
    assert np.allclose(leave_group_out_similarity(p, 3 * p, two, k=2, block=1), [-0.3, 0.54, 0.4, -0.16], atol=1e-6)
    # only some cells queried: their values, in the order asked
    assert np.allclose(leave_group_out_similarity(p, p, two, k=2, queries=[3, 1]), [-0.16, 0.54], atol=1e-6)
    with pytest.raises(ValueError, match="one group holds every cell"):
        leave_group_out_similarity(p, p, ["a"] * 4)
    with pytest.raises(ValueError, match="must agree"):
        leave_group_out_similarity(p, p[:3], two)


def test_calibration_on_a_corpus_leaves_each_donor_out(small_corpus: Path):
    """The PCA is fitted on half of the train donors; every train cell of the other half gets a calibration value
    equal to a hand computation: its point against every train cell of another donor, the k nearest averaged."""
    corpus = Corpus(small_corpus)
    assert corpus.manifest["split_group_by"] == "donor_id"
    n_train = corpus.manifest["splits"]["train"]
    check, calib = calibrated_novelty(corpus, seed=0, k=3)
    assert calib.left_out == "donor_id" and calib.describe() == {
        "split": "train", "left_out": "donor_id", "n_cells": len(calib.cells), "n_groups": calib.n_groups,
        "n_pca_cells": n_train - len(calib.cells)}
    assert check.sha256() == fit_novelty(corpus, seed=0, k=3).sha256()  # the check that is stored
    assert len(check.reference) == n_train  # every train cell is a reference cell
    pos = {int(v): i for i, v in enumerate(corpus.gene_vocab_ids)}
    x, ids, _ = log1p_profiles(corpus, "train", np.array([pos[int(v)] for v in check.vocab_ids]))
    donor = {}
    for shard in corpus.iter_shards("train", columns=("cell_id", "donor_id")):
        donor.update(zip(shard.obs["cell_id"], shard.obs["donor_id"]))
    groups = np.array([donor[c] for c in ids])
    assert calib.n_groups == len(set(groups)) >= 4
    # the PCA's cells and the calibration cells: whole donors, about half of them each, never shared
    fit = np.ones(n_train, dtype=bool)
    fit[calib.cells] = False
    assert not set(groups[fit]) & set(groups[~fit]) and abs(len(set(groups[fit])) - len(set(groups[~fit]))) <= 1
    np.testing.assert_allclose(check.mean, x[fit].mean(axis=0), atol=1e-5)  # the PCA saw only its half
    q = check.points(x).astype(np.float64)
    ref = check.reference.astype(np.float64)
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    hand = []
    for i in calib.cells:
        cos = [float(q[i] @ ref[j]) for j in range(len(ref)) if groups[j] != groups[i]]
        hand.append(np.mean(sorted(cos, reverse=True)[:3]))
    assert np.allclose(calib.values, hand, atol=1e-5)
    # leaving the donor out is stricter than leaving the cell out: each cell's own point is excluded anyway
    self_out = leave_group_out_similarity(q, check.reference, ids, k=3, queries=calib.cells)
    assert (calib.values <= self_out + 1e-6).all() and (calib.values < self_out - 1e-3).any()
