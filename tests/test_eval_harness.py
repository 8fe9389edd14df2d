"""`scmm eval`: metrics.json with DESIGN's keys, report and plots, reproducible, bad input rejected."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from conftest import run_cli, save_tiny_stage1

DESIGN_KEYS = {
    "annotation": {"accuracy", "macro_f1", "ontology_score", "n_cells", "n_classes", "ece", "abstain_rate",
                   "lineage_accuracy", "lineage_accuracy_backoff", "temperature", "threshold", "margin"},
    "retrieval": {"cell_to_text_recall@1", "cell_to_text_recall@5", "text_to_cell_recall@1", "text_to_cell_recall@5"},
}
BASELINES = {"majority", "logistic_regression", "pca_knn", "scmm_knn_smoothing"}
COUNTS = {"n_cells", "n_classes", "n_pairs", "n_val_cells", "n_test_cells", "n_programs", "n_type_programs"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, small_corpus: Path) -> Path:
    """An untrained but complete stage-1 model folder (evaluation does not care how good it is)."""
    return save_tiny_stage1(small_corpus, tmp_path_factory.mktemp("model") / "model")


@pytest.fixture(scope="module")
def first_run(tiny_model: Path, small_corpus: Path, tmp_path_factory) -> tuple[dict, Path]:
    from scmm.eval.harness import evaluate
    out = tmp_path_factory.mktemp("eval") / "a"
    return evaluate(tiny_model, small_corpus, out, progress=False), out


def _check_ranges(section: str, values: dict) -> None:
    for key, value in values.items():
        if isinstance(value, dict):
            _check_ranges(f"{section}.{key}", value)
        elif key in COUNTS:
            assert isinstance(value, int) and value >= 0, (section, key, value)
        elif key.endswith("mean_rank"):
            assert value >= 1.0, (section, key, value)
        elif key in ("temperature", "backoff_mean_level"):
            assert isinstance(value, float) and value >= 0.0, (section, key, value)
        elif key in ("confidence_quantiles", "types"):  # val confidences at 0, 0.5 %, ..., 100 %; held-out CL IDs
            assert isinstance(value, list), (section, key, value)
        elif key == "unknown_rate" and value is None:  # a threshold set directly
            pass
        elif section.startswith("language") and value is None:  # nothing to measure (e.g. too few cells per type)
            pass
        elif key == "novelty_quantiles":  # val cells' mean cosine similarities to their nearest training cells
            assert isinstance(value, list) and all(-1.0 - 1e-5 <= v <= 1.0 + 1e-5 for v in value), (section, key)
        elif key == "novelty_threshold":  # a cosine similarity, or None (no novelty check)
            assert value is None or (isinstance(value, float) and -1.0 <= value <= 1.0 + 1e-5), (section, key, value)
        elif section.endswith("novelty_calibration"):  # which training cells calibrated the novelty threshold
            assert {"split": str, "left_out": str, "n_cells": int, "n_groups": int,
                    "n_pca_cells": int}[key] is type(value), (section, key)
        elif section.endswith("novelty_reference"):
            assert {"file": str, "space": str, "n_cells": int, "n_train_cells": int, "n_genes": int,
                    "n_components": int, "k": int, "sha256": str}[key] is type(value), (section, key, value)
        else:
            assert isinstance(value, float) and 0.0 <= value <= 1.0, (section, key, value)


def test_eval_writes_every_design_key_reproducibly(first_run, tiny_model: Path, small_corpus: Path, tmp_path: Path):
    from scmm.eval.harness import evaluate
    metrics, out = first_run
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert set(metrics) == {"annotation", "retrieval", "baselines", "language"}  # language: the corpus has facts
    for section, keys in DESIGN_KEYS.items():
        assert keys <= set(metrics[section]), (section, keys - set(metrics[section]))
    for section, values in metrics.items():
        _check_ranges(section, values)
    manifest = json.loads((small_corpus / "manifest.json").read_text())
    assert metrics["annotation"]["n_cells"] == manifest["splits"]["test"] == metrics["retrieval"]["n_pairs"]
    assert {"threshold", "accuracy", "unknown_rate"} <= set(metrics["annotation"]["with_unknown"])
    assert metrics["annotation"]["with_unknown"]["n_val_cells"] == manifest["splits"]["val"]
    assert set(metrics["baselines"]) == BASELINES
    assert all(set(v) == {"accuracy", "macro_f1"} for v in metrics["baselines"].values())
    # the marker genes of the fixture make the expression baselines easy
    assert metrics["baselines"]["logistic_regression"]["accuracy"] > metrics["baselines"]["majority"]["accuracy"]
    report = (out / "report.md").read_text()
    assert all(name in report for name in ("scmm (zero-shot by text)", *BASELINES))
    for png in ("confusion_matrix.png", "umap.png"):
        assert (out / png).read_bytes()[:8] == PNG_MAGIC
        assert f"]({png})" in report
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left
    evaluate(tiny_model, small_corpus, tmp_path / "b", progress=False)
    assert (out / "metrics.json").read_text() == (tmp_path / "b" / "metrics.json").read_text()


def test_main_table_lists_scmm_and_every_baseline(first_run):
    from scmm.eval.report import main_table
    metrics, _ = first_run
    lines = main_table(metrics).splitlines()
    assert lines[0] == "| method | accuracy | macro-F1 |"
    assert len(lines) == 2 + 1 + len(BASELINES)
    assert "scmm (zero-shot by text)" in lines[2] and f"{metrics['annotation']['accuracy']:.3f}" in lines[2]
    assert all(any(f"`{name}`" in line for line in lines) for name in BASELINES)


def test_rerun_into_the_same_folder_replaces_outputs(tiny_model: Path, small_corpus: Path, tmp_path: Path):
    from scmm.eval.harness import evaluate
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("the user's file")
    (out / "umap.png").write_bytes(b"stale")  # an earlier run's plot that this run does not produce
    metrics = evaluate(tiny_model, small_corpus, out, tasks="retrieve", progress=False)
    assert set(metrics) == {"retrieval", "language"}
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert (out / "keep.txt").read_text() == "the user's file" and not (out / "umap.png").exists()
    assert "retrieval" in (out / "report.md").read_text()


def test_cli_eval_with_user_labels(tiny_model: Path, small_corpus: Path, tmp_path: Path, capsys):
    from scmm.cli import main
    labels = tmp_path / "labels.txt"
    labels.write_text("# candidates\nCL:0000236\nT cell\n\nnatural killer cells\nsomething never seen\n")
    rc = main(["eval", "--model", str(tiny_model), "--corpus", str(small_corpus), "--out", str(tmp_path / "e"),
               "--tasks", "annotate", "--labels", str(labels), "--quiet"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert printed.startswith("| method | accuracy | macro-F1 |") and "scmm_knn_smoothing" in printed
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert set(metrics) == {"annotation", "baselines", "language"}
    report = (tmp_path / "e" / "report.md").read_text()
    assert "`CL:0000084`" in report and "something never seen" in report  # free text matched / kept as is


def test_candidates_and_options():
    from scmm.data_pipeline.ontology import get_ontology
    from scmm.errors import ScmmError
    from scmm.eval.annotate import Candidates, read_labels_option
    from scmm.eval.harness import parse_tasks
    assert parse_tasks("retrieve, annotate,retrieve") == ("retrieve", "annotate")
    with pytest.raises(ScmmError, match="unknown task"):
        parse_tasks("annotate,summarise")
    with pytest.raises(ScmmError, match="no task"):
        parse_tasks(" , ")
    assert read_labels_option("CL:0000236, T cell") == ["CL:0000236", "T cell"]
    with pytest.raises(ScmmError, match="no label"):
        read_labels_option(" , ")
    onto = get_ontology()
    c = Candidates.from_user(["CL:0000236", "T cell", "a cell nobody named"], onto)
    assert c.keys == ["CL:0000236", "CL:0000084", "a cell nobody named"]
    assert c.names == ["B cell", "T cell", "a cell nobody named"]
    assert c.cl_ids == ["CL:0000236", "CL:0000084", ""]
    assert "T cell" in c.texts[1][0] and "a cell nobody named" in c.texts[2][0]
    with pytest.raises(ScmmError, match="not a known Cell Ontology"):
        Candidates.from_user(["CL:9999999"], onto)


def test_a_model_folder_without_its_cell_encoding_is_an_error(tiny_model: Path, tmp_path: Path):
    """How a model encodes cells is saved with it; a folder without it is never guessed at."""
    import shutil

    from scmm.errors import ScmmError
    from scmm.model.folders import load_model
    assert load_model(tiny_model).encoding.n_bins == 0 and load_model(tiny_model).encoding.max_len == 256
    broken = tmp_path / "model"
    shutil.copytree(tiny_model, broken)
    (broken / "cell_encoding.json").unlink()
    with pytest.raises(ScmmError, match="no cell_encoding.json"):
        load_model(broken)


def test_eval_bad_input(tiny_model: Path, small_corpus: Path, tmp_path: Path):
    r = run_cli("eval", "--model", str(tmp_path / "nope"), "--corpus", str(small_corpus), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and r.stderr.strip().startswith("error: ") and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
    r = run_cli("eval", "--model", str(tiny_model), "--corpus", str(small_corpus), "--out", str(tmp_path / "o"),
                "--tasks", "describe")
    assert r.returncode == 2 and "stage-2" in r.stderr and not (tmp_path / "o").exists()
    assert len(r.stderr.strip().splitlines()) == 1


def test_eval_bad_input_in_process(tiny_model: Path, small_corpus: Path, tmp_path: Path, capsys):
    """More bad input through `main` (no subprocess start-up): one error line, exit 2, nothing written."""
    from scmm.cli import main
    out = tmp_path / "deep" / "o"
    cases = [
        (["--model", str(tiny_model), "--corpus", str(tmp_path / "no_corpus")], "corpus not found"),
        (["--model", str(tiny_model), "--corpus", str(small_corpus), "--tasks", "annotate,bogus"], "unknown task"),
        (["--model", str(small_corpus), "--corpus", str(small_corpus)], "not an scmm"),
        (["--model", str(tiny_model), "--corpus", str(small_corpus), "--labels", "CL:9999999"], "CL"),
        (["--model", str(tiny_model), "--corpus", str(small_corpus), "--tasks", "retrieve", "--labels", "T cell"],
         "annotate"),
    ]
    for args, message in cases:
        assert main(["eval", *args, "--out", str(out), "--quiet"]) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], (args, err)
        assert not (tmp_path / "deep").exists(), args


def test_pseudocell_stage1_space_encodes_like_the_loader(tiny_model: Path, small_corpus: Path, tmp_path: Path):
    from scmm.data_pipeline.hvg import log1p_profiles
    from scmm.data_pipeline.store import Corpus
    from scmm.eval.annotate import embed_split
    from scmm.eval.pseudocell import embed_profiles, pseudocell_report
    from scmm.model.aligner import CellTextAligner

    corpus = Corpus(small_corpus)
    model = CellTextAligner.from_pretrained(tiny_model)
    genes = np.arange(corpus.n_genes)
    x, ids, y = log1p_profiles(corpus, "test", genes)
    emb = embed_split(model, corpus, "test", progress=False)
    pos = {c: i for i, c in enumerate(emb.cell_ids)}
    ours = embed_profiles(model, x, genes, corpus.gene_vocab_ids)
    # a real cell given as its log1p profile over the whole panel embeds exactly as the loader encodes it
    np.testing.assert_allclose(ours, emb.embeddings[[pos[c] for c in ids]], atol=1e-5)
    panel = np.arange(0, corpus.n_genes, 2)
    r = pseudocell_report(corpus, x[:, panel], y, panel, k=3, n_components=4, aligner=model)
    assert set(r["spaces"]) == {"expression_pca", "stage1_embedding"}
    sp = r["spaces"]["stage1_embedding"]
    assert sp["metric"] == "ip" and 0 <= sp["knn_accuracy"] <= 1 and 0 <= sp["class_mean_reference"] <= 1
    assert sp["random_baseline"] == r["random_baseline"] and sp["n_scored"] == len(y)
    binned = CellTextAligner.from_pretrained(save_tiny_stage1(small_corpus, tmp_path / "binned", n_bins=51))
    r = pseudocell_report(corpus, x[:, panel], y, panel, k=3, n_components=4, aligner=binned)
    assert 0 <= r["spaces"]["stage1_embedding"]["knn_accuracy"] <= 1


def test_eval_with_held_out_types_reports_unseen_figures(tmp_path: Path):
    """A corpus with a held-out type: scored apart (never a candidate), with the unseen figures and the chosen
    temperature, threshold and margin stored for `scmm annotate`."""
    from conftest import make_adata
    from scmm.data_pipeline.build import BuildConfig, build_corpus
    from scmm.eval.calibration import Calibration
    from scmm.eval.harness import evaluate
    path = tmp_path / "in.h5ad"
    make_adata(n_cells=240, donors=12).write_h5ad(path)
    build_corpus(BuildConfig(inputs=[path], out=tmp_path / "c", holdout_types=("CL:0000623",), progress=False))
    model = save_tiny_stage1(tmp_path / "c", tmp_path / "model")
    metrics = evaluate(model, tmp_path / "c", tmp_path / "e", tasks="annotate", progress=False, unknown_rate=0.1)
    ann = metrics["annotation"]
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    n_nk = manifest["cell_types"]["CL:0000623"]["splits"]["test"]
    assert ann["unseen"]["n_cells"] == n_nk == 60 and ann["unseen"]["types"] == ["CL:0000623"]
    assert ann["n_cells"] == manifest["splits"]["test"] - n_nk and ann["n_test_cells"] == manifest["splits"]["test"]
    assert {"unknown_or_ancestor_rate", "auroc"} <= set(ann["unseen"])
    assert ann["unknown_rate"] == 0.1 and ann["calibration"]["n_val_cells"] == manifest["splits"]["val"]
    _check_ranges("annotation", ann)
    report = (tmp_path / "e" / "report.md").read_text()
    assert "Held-out (unseen) types" in report and "natural killer cell" in report
    assert Calibration.from_metrics(metrics).threshold == ann["threshold"]
    assert 0.0 < ann["ece_floor_p10"] <= ann["ece_floor"] <= ann["ece_floor_p90"]
    assert (tmp_path / "e" / "reliability.png").exists() and "reliability.png" in report
    # the novelty check: half of the rate on the confidence, half on the expression profile's similarity to the
    # nearest training cells (scmm.eval.novelty)
    cal = Calibration.from_metrics(metrics)
    n_val, n_train = manifest["splits"]["val"], manifest["splits"]["train"]
    assert cal.has_novelty and ann["novelty_threshold"] == cal.novelty_threshold is not None
    assert cal.novelty_reference["n_cells"] == cal.novelty_reference["n_train_cells"] == n_train
    assert cal.novelty_reference["space"] == "expression"
    from scmm.data_pipeline.hvg import log1p_profiles
    from scmm.data_pipeline.store import Corpus
    from scmm.eval.annotate import Candidates, embed_split, label_prototypes
    from scmm.eval.calibration import softmax
    from scmm.eval.novelty import ExpressionNovelty
    from scmm.model.aligner import CellTextAligner
    with np.load(tmp_path / "e" / "novelty_reference.npz") as npz:
        arrays = {k: npz[k] for k in npz.files}
    reference = ExpressionNovelty.from_arrays(arrays)
    assert reference.reference.shape == (n_train, cal.novelty_reference["n_components"])
    assert reference.sha256() == cal.novelty_reference["sha256"]
    aligner = CellTextAligner.from_pretrained(model)
    corpus = Corpus(tmp_path / "c")
    val = embed_split(aligner, corpus, "val", progress=False)
    vconf = softmax(val.embeddings @ label_prototypes(aligner, Candidates.from_corpus(corpus)).T,
                    cal.temperature).max(1)
    pos = {int(v): i for i, v in enumerate(corpus.gene_vocab_ids)}
    x, vids, _ = log1p_profiles(corpus, "val", np.array([pos[int(v)] for v in reference.vocab_ids]))
    vsim = reference.similarity(x)[[vids.index(c) for c in val.cell_ids]]
    j = int(np.floor(0.1 / 2 * (n_val + 1) + 1e-9))  # half of the rate each: the j-th smallest val confidence
    assert j >= 1 and cal.threshold == pytest.approx(np.sort(vconf)[j - 1])
    # the novelty threshold: the j-th smallest of the train cells' leave-donor-out similarities (not val's)
    from scmm.eval.novelty import calibrated_novelty
    _, calib = calibrated_novelty(corpus, seed=0)
    jn = int(np.floor(0.1 / 2 * (len(calib.values) + 1) + 1e-9))
    assert calib.left_out == "donor_id" and cal.novelty_calibration == calib.describe()
    assert len(calib.values) + calib.n_pca_cells == n_train and len(calib.values) > n_val
    assert cal.novelty_threshold == pytest.approx(np.sort(calib.values)[jn - 1], abs=1e-6)
    assert cal.novelty_quantiles == pytest.approx(list(np.quantile(calib.values, np.linspace(0, 1, 201))), abs=1e-9)
    # val checks the stated rate on cells the novelty PCA never saw
    left_out = [vconf[i] < np.sort(np.delete(vconf, i))[int(np.floor(0.05 * n_val + 1e-9)) - 1] for i in range(n_val)]
    assert ann["val_abstain_rate"] == pytest.approx(np.mean(np.array(left_out) | (vsim < cal.novelty_threshold)))
    assert ann["val_abstain_rate_novelty"] == pytest.approx(np.mean(vsim < cal.novelty_threshold))
    assert ann["foreign"]["n_cells"] == 300 and 0.0 <= ann["foreign"]["novel_rate"] <= ann["foreign"]["unknown_rate"]
    assert "val abstain rate" in report and "Foreign cells" in report
    assert {"auroc", "auroc_confidence", "auroc_novelty", "novel_rate"} <= set(ann["unseen"])
    assert 0.0 <= ann["abstain_rate_novelty"] <= ann["abstain_rate"]
    fixed = evaluate(model, tmp_path / "c", tmp_path / "f", tasks="annotate", progress=False, unknown_threshold=1.0)
    assert fixed["annotation"]["abstain_rate"] == 1.0 and fixed["annotation"]["unseen"]["unknown_rate"] == 1.0
    assert fixed["annotation"]["novelty_threshold"] is None  # a threshold stated directly: no novelty check
    never = evaluate(model, tmp_path / "c", tmp_path / "g", tasks="annotate", progress=False, unknown_rate=0.0)
    assert never["annotation"]["abstain_rate"] == 0.0 and never["annotation"]["unseen"]["unknown_rate"] == 0.0
    assert never["annotation"]["novelty_threshold"] is None and never["annotation"]["threshold"] == 0.0

    # eval -> package -> annotate applies the novelty check; a package without the reference does not
    from conftest import make_adata as adata_of
    from scmm.api import annotate, load_model
    from scmm.cli import main
    assert main(["package", "--stage1", str(model), "--corpus", str(tmp_path / "c"), "--metrics",
                 str(tmp_path / "e" / "metrics.json"), "--out", str(tmp_path / "pkg")]) == 0
    pkg = load_model(tmp_path / "pkg")
    assert all(np.array_equal(pkg.novelty_reference[k], arrays[k]) for k in arrays)
    # annotating the corpus's own input file gives its val cells the novelty eval computed (h5ad counts -> profiles
    # at inference = the corpus's profiles), and every cell below the threshold is unknown
    whole = annotate(tmp_path / "in.h5ad", pkg)
    rows = whole.obs_names.get_indexer(val.cell_ids)
    assert (rows >= 0).all() and np.allclose(whole.obs["scmm_novelty"].to_numpy()[rows], vsim, atol=1e-5)
    assert whole.obs["scmm_novelty"].dtype == np.float32
    low = whole.obs["scmm_novelty"].to_numpy() < cal.novelty_threshold
    assert low.any() and (whole.obs["scmm_cell_type"].astype(str)[low] == "unknown").all()
    # hand-made cells whose every count sits in one gene are unlike any training cell: always unknown
    cells = adata_of(n_cells=40, donors=2)
    spikes = cells.copy()
    spikes.X = sp.csr_matrix((np.full(40, 50.0, np.float32), (np.arange(40), np.arange(40) % spikes.n_vars)),
                             shape=spikes.shape)
    odd = annotate(spikes, pkg)
    assert (odd.obs["scmm_novelty"] < cal.novelty_threshold).all()
    assert (odd.obs["scmm_cell_type"].astype(str) == "unknown").all()
    # without the cells' expression (embeddings alone) there is no novelty check and no novelty column
    from scmm.api import annotate_embeddings
    from scmm.eval.annotate import Candidates as Cands
    frame = annotate_embeddings(odd.obsm["X_scmm"], pkg, Cands.from_labels(pkg.labels))
    assert "scmm_novelty" not in frame
    assert np.array_equal(frame["scmm_cell_type"].astype(str).to_numpy() == "unknown",
                          frame["scmm_confidence"].to_numpy() < np.float32(cal.threshold))
    forced = annotate(cells, pkg, unknown_threshold=0.0)  # the stated threshold is the whole rule
    assert (forced.obs["scmm_cell_type"].astype(str) != "unknown").all()
    old = tmp_path / "old_metrics"
    old.mkdir()
    (old / "metrics.json").write_text((tmp_path / "e" / "metrics.json").read_text())
    from scmm.errors import ScmmError
    with pytest.raises(ScmmError, match="novelty_reference.npz"):  # the reference must travel with the metrics
        from scmm.package import package_model
        package_model(model, tmp_path / "c", tmp_path / "pkg2", metrics=old / "metrics.json")
    doc = json.loads((old / "metrics.json").read_text())
    doc["annotation"]["calibration"]["novelty_reference"].pop("space")  # an earlier scmm's (embedding space)
    (old / "metrics.json").write_text(json.dumps(doc))
    assert main(["package", "--stage1", str(model), "--corpus", str(tmp_path / "c"), "--metrics",
                 str(old / "metrics.json"), "--out", str(tmp_path / "pkg_old")]) == 0
    earlier = load_model(tmp_path / "pkg_old")
    assert earlier.novelty_reference is None and not (tmp_path / "pkg_old" / "novelty_reference.npz").exists()
    plain = annotate(cells, earlier)
    conf = plain.obs["scmm_confidence"].to_numpy()
    called = plain.obs["scmm_cell_type"].astype(str).to_numpy() == "unknown"
    assert np.array_equal(called, conf < cal.threshold)  # only the confidence decides


def test_split_val_is_for_the_stage2_tasks_only(tiny_model: Path, small_corpus: Path, tmp_path: Path, capsys):
    """`scmm eval --split val` refuses the tasks that calibrate on val, in one error line, writing nothing."""
    from scmm.cli import main
    out = tmp_path / "eval_val"
    code = main(["eval", "--model", str(tiny_model), "--corpus", str(small_corpus), "--out", str(out),
                 "--tasks", "annotate", "--split", "val", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and not out.exists()
    assert len(err) == 1 and err[0].startswith("error: --split val scores only the stage-2 tasks"), err
