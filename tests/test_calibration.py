"""Calibrated confidence, abstention, ontology back-off (eval/calibration.py) and held-out-type splits."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from scmm.data_pipeline.ontology import get_ontology
from scmm.errors import ScmmError
from scmm.eval.calibration import (
    Calibration,
    abstention_score,
    abstention_threshold,
    backoff,
    below_cut_left_out,
    calibrated_answers,
    check_unknown_options,
    choose_margin,
    confidence_quantiles,
    fit_temperature,
    nll,
    novelty_summary,
    novelty_threshold,
    report_novelty,
    softmax,
    split_rate,
    threshold_from_quantiles,
)
from scmm.eval.metrics import (
    binary_auroc,
    calibrated_ece,
    expected_calibration_error,
    lineage_accuracy,
    reliability_png,
)
from scmm.eval.novelty import ExpressionNovelty, leave_group_out_similarity
from scmm.eval.ontology_score import informative_common_ancestor, is_same_or_ancestor


# --- a hand-built ontology ----------------------------------------------------------------------------
class TinyOntology:
    """cell (root, generic) <- eukaryotic cell (generic) <- {leukocyte, neuron}; leukocyte <- {T cell, B cell};
    T cell <- {CD4 T, CD8 T}; 'double' has two parents, CD4 T and CD8 T."""

    PARENTS = {"CL:0000000": [], "CL:0000255": ["CL:0000000"], "CL:9000001": ["CL:0000255"],
               "CL:9000002": ["CL:9000001"], "CL:9000003": ["CL:9000001"], "CL:9000004": ["CL:9000002"],
               "CL:9000005": ["CL:9000002"], "CL:9000006": ["CL:0000255"], "CL:9000007": ["CL:9000004", "CL:9000005"]}
    LABELS = {"CL:0000000": "cell", "CL:0000255": "eukaryotic cell", "CL:9000001": "leukocyte",
              "CL:9000002": "T cell", "CL:9000003": "B cell", "CL:9000004": "CD4 T", "CL:9000005": "CD8 T",
              "CL:9000006": "neuron", "CL:9000007": "double"}

    def is_valid(self, term: str) -> bool:
        return term in self.PARENTS

    def parents(self, term: str) -> list[str]:
        return list(self.PARENTS[term])

    def label(self, term: str) -> str:
        return self.LABELS[term]


TINY = TinyOntology()
LEUK, T, B, CD4, CD8, NEURON, DOUBLE = (f"CL:900000{i}" for i in range(1, 8))


def test_informative_common_ancestor_by_hand():
    assert informative_common_ancestor([CD4, CD8], TINY) == (T, 1)
    assert informative_common_ancestor([CD4, B], TINY) == (LEUK, 2)
    assert informative_common_ancestor([B, CD4], TINY) == (LEUK, 1)  # the level counts from the first term
    assert informative_common_ancestor([T, CD4], TINY) == (T, 0)  # an ancestor of the other: itself, level 0
    assert informative_common_ancestor([CD4, CD4], TINY) == (CD4, 0)
    assert informative_common_ancestor([CD4, NEURON], TINY) is None  # they share only generic terms
    assert informative_common_ancestor([CD4, "free text"], TINY) is None
    assert informative_common_ancestor([DOUBLE, CD8], TINY) == (CD8, 1)  # two parents: the nearer common one
    assert is_same_or_ancestor(T, CD4, TINY) and is_same_or_ancestor(CD4, CD4, TINY)
    assert not is_same_or_ancestor(CD8, CD4, TINY) and not is_same_or_ancestor("unknown", CD4, TINY)


def test_backoff_answers_and_levels():
    ids = [CD4, CD8, B, ""]
    prob = np.array([[0.50, 0.45, 0.05, 0.00],   # CD4 vs CD8: T cell, 1 step up
                     [0.90, 0.05, 0.05, 0.00],   # clear: no back-off
                     [0.50, 0.02, 0.46, 0.02],   # CD4 vs B: leukocyte, 2 steps up
                     [0.05, 0.02, 0.48, 0.45]])  # B vs a free-text label: no common term, keep B
    answer, level = backoff(prob, ids, 0.1, TINY)
    assert answer.tolist() == [T, "", LEUK, ""] and level.tolist() == [1, 0, 2, 0]
    assert backoff(prob, ids, 0.0, TINY)[0].tolist() == ["", "", "", ""]  # margin 0 never backs off
    calib = Calibration(temperature=1.0, threshold=0.49, margin=0.1)
    out = calibrated_answers(np.zeros((4, 4)), [*ids[:3], "x"], ["CD4 T", "CD8 T", "B cell", "x"], ids, calib, TINY,
                             prob=prob)
    assert out.keys.tolist() == [T, CD4, LEUK, "unknown"]  # the last one is below the threshold
    assert out.names.tolist() == ["T cell", "CD4 T", "leukocyte", "unknown"]
    assert out.level.tolist() == [1, 0, 2, 0]
    np.testing.assert_allclose(out.confidence, [0.5, 0.9, 0.5, 0.48])


def test_backoff_on_the_real_cell_ontology():
    onto = get_ontology()
    cd4_memory, cd8 = "CL:0000897", "CL:0000625"
    term, level = informative_common_ancestor([cd4_memory, cd8], onto)
    assert onto.label(term) in ("mature alpha-beta T cell", "T cell", "alpha-beta T cell") and level >= 1
    assert informative_common_ancestor(["CL:0000236", "CL:0000182"], onto) is None  # B cell vs hepatocyte


def test_margin_rule_on_a_hand_made_val_set():
    ids = [CD4, CD8, B]
    sure = [0.85, 0.10, 0.05]
    torn = [0.50, 0.40, 0.10]  # a CD8 T cell called CD4 T, second choice right
    prob = np.array([sure] * 8 + [torn] * 2)
    truth = [CD4] * 8 + [CD8] * 2
    m = choose_margin(prob, ids, truth, TINY)
    assert 0.1 - 1e-9 < m < 0.75  # the smallest margin that backs off the two torn cells only
    answer, _ = backoff(prob, ids, m, TINY)
    assert answer.tolist() == [""] * 8 + [T] * 2
    assert choose_margin(prob, ids, truth, TINY, max_backoff=0.1) == 0.0  # 20 % backed off is above the cap
    assert choose_margin(prob[:8], ids, truth[:8], TINY) == 0.0  # already right: no back-off


# --- temperature and threshold --------------------------------------------------------------------------
def test_fit_temperature_recovers_a_known_temperature():
    rng = np.random.default_rng(0)
    for true_t in (0.05, 0.3, 2.0):
        logits = rng.normal(0.0, 0.5, size=(20_000, 6))
        p = softmax(logits, true_t)
        labels = (rng.random((len(p), 1)) > p.cumsum(1)).sum(1)  # one draw from each row's softmax
        t = fit_temperature(logits, labels)
        assert t == pytest.approx(true_t, rel=0.05)
        assert nll(logits, labels, t) <= min(nll(logits, labels, t * 1.1), nll(logits, labels, t / 1.1))
    with pytest.raises(ValueError):
        fit_temperature(np.zeros((2, 3)), [0, 3])


def test_threshold_rule_picks_the_quantile():
    conf = [0.7, 0.1, 0.9, 0.3, 0.5, 0.2, 0.6, 0.8, 0.4, 1.0]  # 0.1 ... 1.0, shuffled
    assert abstention_threshold(conf, 0.2) == 0.2  # j = floor(0.2 * 11) = 2: the 2nd smallest; 0.1 lies below
    assert abstention_threshold(conf, 0.3) == 0.3  # j = floor(3.3) = 3
    assert abstention_threshold(conf, 0.1) == 0.1  # j = 1: no val cell below, a new one with probability 1/11
    assert abstention_threshold(conf, 0.05) == 0.0 and abstention_threshold(conf, 0.0) == 0.0  # j = 0: never
    for rate in (0.1, 0.3, 0.5, 0.9):
        th = abstention_threshold(conf, rate)
        assert np.mean(np.asarray(conf) < th) <= rate + 1e-12
    assert np.mean(np.asarray([0.5] * 10) < abstention_threshold([0.5] * 10, 0.5)) == 0.0  # ties: fewer abstain
    with pytest.raises(ValueError):
        abstention_threshold(conf, 1.0)
    q = confidence_quantiles(conf)
    assert len(q) == 201 and q[0] == 0.1 and q[-1] == 1.0
    assert threshold_from_quantiles(q, 0.5) == pytest.approx(float(np.quantile(conf, 0.5)))
    assert threshold_from_quantiles(q, 0.0) == 0.0


def test_calibration_round_trip_and_options():
    c = Calibration(temperature=0.2, threshold=0.3, unknown_rate=0.05, margin=0.1,
                    quantiles=confidence_quantiles(np.linspace(0, 1, 101)), n_val_cells=101)
    back = Calibration.from_metrics(json.loads(json.dumps({"annotation": {"calibration": c.to_dict()}})))
    assert back == c
    assert Calibration.from_metrics({"annotation": {"with_unknown": {"threshold": 0.6}}}) is None  # older metrics
    assert c.with_options(0.2, None).threshold == pytest.approx(0.2)
    assert c.with_options(None, 0.7).threshold == 0.7 and c.with_options(None, None) == c
    with pytest.raises(ScmmError, match="unknown-rate"):
        Calibration(temperature=1.0).with_options(0.1, None)  # no stored val confidences
    for rate, threshold in ((1.0, None), (-0.1, None), (None, 1.5), (None, math.nan), (0.1, 0.5)):
        with pytest.raises(ScmmError):
            check_unknown_options(rate, threshold)


# --- novelty ----------------------------------------------------------------------------------------
def test_novelty_threshold_rule_on_a_hand_made_set():
    sim = [0.95, 0.2, 0.9, 0.5, 0.8, 0.3, 0.85, 0.7, 0.4, 0.99]  # shuffled
    assert novelty_threshold(sim, 0.1) == 0.2  # j = floor(0.1 * 11) = 1: the smallest
    assert novelty_threshold(sim, 0.2) == 0.3  # j = 2: only 0.2 lies below 0.3
    assert novelty_threshold(sim, 0.3) == 0.4  # j = 3
    assert novelty_threshold(sim, 0.05) is None and novelty_threshold(sim, 0.0) is None  # j = 0: no check
    for rate in (0.1, 0.2, 0.5, 0.9):
        assert np.mean(np.asarray(sim) < novelty_threshold(sim, rate)) <= rate + 1e-12
    assert novelty_threshold([-0.5, -0.2, 0.1, 0.3], 0.5) == -0.2  # cosines may be negative; j = floor(2.5)
    with pytest.raises(ValueError):
        novelty_threshold(sim, 1.0)
    with pytest.raises(ValueError):
        novelty_threshold([], 0.1)
    assert split_rate(0.1, 0.5) == (0.05, 0.05) and split_rate(0.1, None) == (0.1, 0.0)
    assert split_rate(0.1, 1.0) == (0.0, 0.1)
    # the union of the two checks at half the rate each stays within the rate on the val cells themselves
    rng = np.random.default_rng(0)
    conf, nov = rng.random(97), rng.random(97)
    for rate in (0.02, 0.05, 0.1, 0.3):
        c, n = split_rate(rate, 0.5)
        th_c, th_n = abstention_threshold(conf, c), novelty_threshold(nov, n)
        out = (conf < th_c) | (nov < (th_n if th_n is not None else -np.inf))
        assert out.sum() <= np.floor(rate * 97 + 1e-9)


@pytest.mark.parametrize("n, rate", [(69, 0.025), (69, 0.05), (19, 0.1), (200, 0.05), (10, 0.3)])
def test_a_new_cell_abstains_with_probability_at_most_the_rate(n: int, rate: float):
    """The split-conformal guarantee, by simulation: n val values and one new value, all exchangeable (iid); the
    new one falls below the threshold chosen on the others with probability floor(rate (n + 1)) / (n + 1)."""
    rng = np.random.default_rng(n)
    trials = 20_000
    values = rng.random((trials, n + 1))
    below = np.array([row[-1] < (abstention_threshold(row[:-1], rate) or 0.0) for row in values])
    exact = math.floor(rate * (n + 1) + 1e-9) / (n + 1)
    assert exact <= rate and below.mean() == pytest.approx(exact, abs=4 * math.sqrt(rate / trials) + 1e-3)


def _donor_cells(rng: np.random.Generator, centres: np.ndarray, n_donors: int, per_donor: int,
                 donor_sd: float, cell_sd: float) -> tuple[np.ndarray, np.ndarray]:
    """Log-expression-like profiles: a type centre, plus a shift shared by the donor's cells, plus cell noise."""
    x, donor = [], []
    for d in range(n_donors):
        shift = rng.normal(0.0, donor_sd, centres.shape[1])
        types = rng.integers(0, len(centres), per_donor)
        x.append(centres[types] + shift + rng.normal(0.0, cell_sd, (per_donor, centres.shape[1])))
        donor += [d] * per_donor
    return np.concatenate(x).astype(np.float32), np.asarray(donor)


def _pca_check(x: np.ndarray, fit: np.ndarray, n_components: int, k: int) -> tuple[ExpressionNovelty, np.ndarray]:
    """A novelty check whose PCA is fitted on the cells ``fit`` and whose reference is every cell of ``x``."""
    from sklearn.decomposition import PCA
    pca = PCA(n_components=n_components, random_state=0).fit(x[fit])
    mean, comp = pca.mean_.astype(np.float32), pca.components_.astype(np.float32)
    z = (x - mean) @ comp.T
    points = (z / np.linalg.norm(z, axis=1, keepdims=True)).astype(np.float32)
    check = ExpressionNovelty(vocab_ids=np.arange(x.shape[1]), mean=mean, components=comp,
                              reference=points.astype(np.float16), k=k)
    return check, points


def test_the_rate_holds_for_new_donors_with_the_leave_donor_out_calibration_set():
    """The issue's simulation, as scmm.eval.novelty.calibrated_novelty does it: the novelty check's PCA fitted on
    half of the train donors; the calibration set is the other half's cells, each one's similarity to the other
    train cells with its own donor left out. Cells of *new* donors (never seen, each donor with its own shift)
    then fall below the threshold at the stated rate (within the issue's 2 points; a little under: the calibration
    cells see the reference without their donor, a smaller one). Calibrated on every train cell instead (the PCA
    fitted on them), the threshold sits far too low and the stated rate means nothing."""
    rng = np.random.default_rng(0)
    genes, rate, k = 30, 0.05, 5
    half_rates, in_sample_rates = [], []
    for _ in range(30):
        centres = rng.normal(0.0, 2.0, (4, genes))
        x, donor = _donor_cells(rng, centres, n_donors=12, per_donor=30, donor_sd=0.5, cell_sd=1.0)
        new, _ = _donor_cells(rng, centres, n_donors=5, per_donor=30, donor_sd=0.5, cell_sd=1.0)
        fit = donor % 2 == 0
        check, points = _pca_check(x, fit, n_components=10, k=k)
        values = leave_group_out_similarity(points, check.reference, donor, k=k, queries=np.flatnonzero(~fit))
        half_rates.append(np.mean(check.similarity(new) < novelty_threshold(values, rate)))
        check, points = _pca_check(x, np.ones(len(x), dtype=bool), n_components=10, k=k)
        values = leave_group_out_similarity(points, check.reference, donor, k=k)
        in_sample_rates.append(np.mean(check.similarity(new) < novelty_threshold(values, rate)))
    exact = math.floor(rate * (180 + 1)) / (180 + 1)
    assert exact - 0.02 <= np.mean(half_rates) <= exact + 0.005, (np.mean(half_rates), exact)
    assert np.mean(in_sample_rates) < 0.02  # the in-sample calibration: far below the stated rate


def test_far_cells_are_unknown_and_near_ones_are_not():
    """Reference cells along four axes; cells near one of them keep their answer, cells far from all are unknown,
    whatever their confidence."""
    d = 8
    reference = np.eye(d, dtype=np.float32)[:4].astype(np.float16)
    rng = np.random.default_rng(1)
    near = np.eye(d)[[0, 1, 2, 3, 0, 1]] + 0.05 * rng.normal(size=(6, d))
    far = np.eye(d)[[4, 5, 6, 7]] + 0.05 * rng.normal(size=(4, d))
    emb = np.concatenate([near, far]).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    check = ExpressionNovelty(vocab_ids=np.arange(d), mean=np.zeros(d, np.float32),
                              components=np.eye(d, dtype=np.float32), reference=reference, k=1)
    similarity = check.similarity(emb)  # the PCA is the identity: the profile's direction is its point
    assert (similarity[:6] > 0.9).all() and (similarity[6:] < 0.3).all()
    assert similarity == pytest.approx((emb @ reference.astype(np.float32).T).max(1), abs=1e-5)
    sim = np.tile([[5.0, 0.0]], (10, 1))  # every cell confidently the first candidate
    val_sim = np.linspace(0.6, 1.0, 41)
    calib = Calibration(temperature=1.0, threshold=0.1, novelty_threshold=novelty_threshold(val_sim, 0.05),
                        quantiles=confidence_quantiles(np.linspace(0.5, 1, 41)),
                        novelty_quantiles=confidence_quantiles(val_sim),
                        novelty_reference={"file": "novelty_reference.npz", "space": "expression", "n_cells": 4})
    ont = get_ontology()
    a = calibrated_answers(sim, ["CL:0000236", "CL:0000084"], ["B cell", "T cell"], ["CL:0000236", "CL:0000084"],
                           calib, ont, novelty=similarity)
    assert list(a.unknown) == [False] * 6 + [True] * 4 and list(a.novel) == list(a.unknown)
    assert (a.confidence > 0.99).all()  # the confidence stays the calibrated top-1 probability
    plain = calibrated_answers(sim, ["CL:0000236", "CL:0000084"], ["B cell", "T cell"], ["CL:0000236", "CL:0000084"],
                               calib, ont)  # no similarities given (a model without a reference): no check
    assert not plain.unknown.any() and plain.novel is None
    # the abstention score: the smaller val rank; far cells rank at the bottom
    score = abstention_score(a.confidence, similarity, calib)
    assert (score[6:] == 0.0).all() and (score[:6] > 0.0).all()
    assert abstention_score(np.array([0.5, 1.0]), None, calib) == pytest.approx([0.0, 1.0])
    # --unknown-rate on the stored quantiles splits the rate; --unknown-threshold and rate 0 turn the check off
    assert calib.with_options(0.1, None).novelty_threshold == pytest.approx(np.quantile(val_sim, 0.05))
    assert calib.with_options(0.1, None).threshold == pytest.approx(np.quantile(np.linspace(0.5, 1, 41), 0.05))
    assert calib.with_options(None, 0.3).novelty_threshold is None
    never = calib.with_options(0.0, None)
    assert never.novelty_threshold is None and never.threshold == 0.0
    assert not calibrated_answers(sim, ["a", "b"], ["a", "b"], ["", ""], never, ont, novelty=similarity).unknown.any()
    back = Calibration.from_metrics(json.loads(json.dumps({"annotation": {"calibration": calib.to_dict()}})))
    assert back == calib and back.has_novelty and not back.without_novelty().has_novelty
    earlier = calib.to_dict()  # an earlier scmm's novelty check (embedding space, no "space"): not applied
    earlier["novelty_reference"] = {"file": "novelty_reference.npy", "n_cells": 4}
    old = Calibration.from_metrics({"annotation": {"calibration": earlier}})
    assert not old.has_novelty and old.novelty_threshold is None and old.threshold == calib.threshold


# --- metrics ----------------------------------------------------------------------------------------
def test_ece_floor_of_a_perfectly_calibrated_model(tmp_path):
    """Sure answers are always right: floor 0. At confidence 0.5 (one bin) the ECE is |mean - 0.5| of n fair
    coins, whose expectation is 0.5 sqrt(2 / (pi n)) for large n; more cells, lower floor."""
    assert calibrated_ece([1.0] * 50) == (0.0, 0.0, 0.0)
    mean, p10, p90 = calibrated_ece([0.5] * 400, n_draws=4000)
    assert mean == pytest.approx(0.5 * math.sqrt(2 / (math.pi * 400)), rel=0.05) and p10 < mean < p90
    assert calibrated_ece([0.5] * 1600)[0] == pytest.approx(mean / 2, rel=0.1)
    assert calibrated_ece([0.3, 0.9], seed=1) == calibrated_ece([0.3, 0.9], seed=1)  # seeded
    path = reliability_png([0.9, 0.9, 0.6, 0.2], [True, False, True, False], tmp_path / "r.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ece_auroc_lineage_by_hand():
    conf = [0.9, 0.9, 0.6, 0.6, 0.2]
    correct = [True, False, True, True, False]
    # bins: {0.9, 0.9}: |0.5 - 0.9|; {0.6, 0.6}: |1 - 0.6|; {0.2}: |0 - 0.2|
    assert expected_calibration_error(conf, correct) == pytest.approx(2 / 5 * 0.4 + 2 / 5 * 0.4 + 1 / 5 * 0.2)
    assert expected_calibration_error([1.0, 0.0], [True, False]) == 0.0
    assert binary_auroc([0.9, 0.8, 0.4], [0.5, 0.4]) == pytest.approx(4.5 / 6)
    assert math.isnan(binary_auroc([0.5], []))
    onto = get_ontology()
    truth = ["CL:0000625"] * 4
    pred = ["CL:0000084", "CL:0000625", "CL:0000624", "unknown"]  # T cell (ancestor), exact, CD4 (wrong), unknown
    assert lineage_accuracy(truth, pred, onto) == 0.5


# --- held-out types in the splits -----------------------------------------------------------------------
def _obs(n: int, donors: int | None) -> pd.DataFrame:
    obs = pd.DataFrame(index=[f"c{i}" for i in range(n)])
    if donors:
        obs["donor_id"] = [f"d{i % donors}" for i in range(n)]
    return obs


def test_holdout_splits_keep_donors_whole():
    from scmm.data_pipeline.splits import plan_splits
    n = 600
    obs = _obs(n, donors=12)
    labels = np.array(["A", "B", "C"])[np.arange(n) % 3]
    held = (labels == "C") & np.isin(obs["donor_id"], ["d2", "d5"])  # type C seen only in donors 2 and 5
    plan = plan_splits(obs, labels, seed=1, holdout=held)
    assert plan.group_by == "donor_id"
    assert (plan.split[held] == 2).all()
    for donor in obs["donor_id"].unique():
        assert len(set(plan.split[(obs["donor_id"] == donor).to_numpy()])) == 1
    assert (plan.split == 0).sum() > 0 and (plan.split == 1).sum() > 0
    every = np.isin(obs["donor_id"], [f"d{i}" for i in range(11)])
    with pytest.raises(ValueError, match="held-out"):
        plan_splits(obs, labels, holdout=every)


def test_holdout_splits_per_cell_and_unchanged_without_holdout():
    from scmm.data_pipeline.splits import plan_splits
    n = 300
    obs = _obs(n, donors=None)
    labels = np.array(["A", "B", "C"])[np.arange(n) % 3]
    held = labels == "B"
    plan = plan_splits(obs, labels, seed=3, holdout=held)
    assert plan.group_by == "cell" and (plan.split[held] == 2).all()
    assert set(plan.split[~held]) == {0, 1, 2}
    none = plan_splits(obs, labels, seed=3)
    assert (plan_splits(obs, labels, seed=3, holdout=np.zeros(n, bool)).split == none.split).all()


def test_build_with_holdout_types(tmp_path: Path):
    from conftest import make_adata, run_cli
    from scmm.data_pipeline.build import BuildConfig, build_corpus
    from scmm.data_pipeline.store import Corpus
    from scmm.data_pipeline.text import corpus_labels
    path = tmp_path / "in.h5ad"
    make_adata(n_cells=160, donors=8).write_h5ad(path)
    manifest = build_corpus(BuildConfig(inputs=[path], out=tmp_path / "c", holdout_types=("CL:0000623",),
                                        progress=False))
    assert manifest["holdout_types"] == ["CL:0000623"]
    nk = manifest["cell_types"]["CL:0000623"]["splits"]
    assert nk["train"] == nk["val"] == 0 and nk["test"] == 40
    corpus = Corpus(tmp_path / "c")
    assert corpus.holdout_types == ["CL:0000623"]
    assert "CL:0000623" not in [r["key"] for r in corpus_labels(corpus)]  # never a candidate
    donors = {}
    for split in ("train", "val", "test"):
        for shard in corpus.iter_shards(split, columns=("donor_id",)):
            for d in shard.obs["donor_id"]:
                donors.setdefault(str(d), set()).add(split)
    assert all(len(s) == 1 for s in donors.values())
    info = json.loads(run_cli("data", "info", str(tmp_path / "c"), "--json").stdout)
    assert info["holdout_types"] == {"CL:0000623": "natural killer cell"}
    for bad, message in (("CL:9999999", "not a known"), ("CL:0000182", "no cell of type")):
        with pytest.raises(ScmmError, match=message):
            build_corpus(BuildConfig(inputs=[path], out=tmp_path / "d", holdout_types=(bad,), progress=False))
    assert not (tmp_path / "d").exists()


def test_the_file_level_rule_counts_novel_cells_and_says_so_once(caplog):
    """novelty_summary: the share below the novelty threshold; foreign from FOREIGN_SHARE (half) of the cells on."""
    s = novelty_summary([0.1, 0.2, 0.3, 0.9, 0.95], threshold=0.35, rate=0.025)
    assert s == {"n_cells": 5, "n_novel": 3, "novel_share": 0.6, "expected_share": 0.025, "threshold": 0.35,
                 "median_similarity": 0.3, "foreign_share": 0.5, "foreign": True}
    assert not novelty_summary([0.1, 0.9, 0.95], 0.35, 0.025)["foreign"]
    assert novelty_summary([0.1], None, 0.025) is None and novelty_summary([], 0.3, 0.025) is None
    calib = Calibration(temperature=1.0, unknown_rate=0.05, novelty_threshold=0.35)
    with caplog.at_level("INFO", logger="scmm"):
        s = report_novelty([0.1, 0.2, 0.3, 0.9, 0.0], calib, "tumour.h5ad", ignore=np.array([0, 0, 0, 0, 1], bool))
    assert s["n_cells"] == 4 and s["n_novel"] == 3 and s["expected_share"] == 0.025 and s["foreign"]
    warned = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and "tumour.h5ad: 3 of 4 cells (75.0%) are unlike every training cell" in warned[0].message
    assert "unlike the model's training data" in warned[0].message
    caplog.clear()
    with caplog.at_level("INFO", logger="scmm"):
        s = report_novelty([0.9, 0.8, 0.3, 0.95], calib, "pbmc.h5ad")
    assert not s["foreign"] and [r.levelname for r in caplog.records] == ["INFO"]
    assert "1 of 4 cells (25.0%)" in caplog.records[0].message
    assert report_novelty([0.1], Calibration(temperature=1.0), "x") is None  # no novelty check, nothing to say


def test_each_value_against_the_cut_chosen_on_the_others():
    """below_cut_left_out: value i against the j-th smallest of the other values, j = floor(rate n)."""
    v = [0.3, 0.1, 0.5, 0.2, 0.4]
    assert below_cut_left_out(v, 0.25).tolist() == [False, True, False, False, False]  # j = 1: the others' minimum
    assert below_cut_left_out(v, 0.45).tolist() == [False, True, False, True, False]  # j = 2
    assert not below_cut_left_out(v, 0.1).any() and not below_cut_left_out([0.5], 0.9).any()  # j = 0: none
    rng = np.random.default_rng(0)
    w = rng.random(40)
    for rate in (0.05, 0.2, 0.5):
        j = int(np.floor(rate * 40 + 1e-9))
        hand = [w[i] < np.sort(np.delete(w, i))[j - 1] for i in range(40)]
        assert below_cut_left_out(w, rate).tolist() == hand
    assert below_cut_left_out([0.2, 0.2, 0.2, 0.9], 0.5).tolist() == [False] * 4  # ties are not below
