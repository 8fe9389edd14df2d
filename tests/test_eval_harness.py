"""`scmm eval`: metrics.json with DESIGN's keys, report and plots, reproducible, bad input rejected."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import run_cli

DESIGN_KEYS = {
    "annotation": {"accuracy", "macro_f1", "ontology_score", "n_cells", "n_classes"},
    "retrieval": {"cell_to_text_recall@1", "cell_to_text_recall@5", "text_to_cell_recall@1", "text_to_cell_recall@5"},
}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, small_corpus: Path) -> Path:
    """An untrained but complete stage-1 model folder (evaluation does not care how good it is)."""
    from eval.annotate import corpus_label_texts
    from data_pipeline.store import Corpus
    from model.aligner import AlignerConfig, CellTextAligner, CellTowerOptions, QFormerOptions
    from model.text_tower import TextTowerConfig
    torch.manual_seed(0)
    vocab = json.loads((small_corpus / "vocab.json").read_text())
    cfg = AlignerConfig(cell_tower=CellTowerOptions(d_model=16, nhead=2, d_hid=32, nlayers=1),
                        text_tower=TextTowerConfig(freeze=True, max_length=64),
                        qformer=QFormerOptions(num_queries=2, num_layers=1, embed_dim=16))
    model = CellTextAligner(cfg, vocab)
    model.set_text_center(corpus_label_texts(Corpus(small_corpus)))
    folder = tmp_path_factory.mktemp("model") / "model"
    model.save_pretrained(folder)
    return folder


def test_eval_writes_every_design_key_reproducibly(tiny_model: Path, small_corpus: Path, tmp_path: Path):
    from eval.harness import evaluate
    metrics = evaluate(tiny_model, small_corpus, tmp_path / "a", progress=False)
    for section, keys in DESIGN_KEYS.items():
        assert keys <= set(metrics[section]), (section, keys - set(metrics[section]))
    for key in ("accuracy", "macro_f1", "ontology_score"):
        assert 0.0 <= metrics["annotation"][key] <= 1.0
    assert metrics["annotation"]["n_cells"] == json.loads((small_corpus / "manifest.json").read_text())["splits"]["test"]
    assert set(metrics["baselines"]) == {"majority", "logistic_regression", "pca_knn", "scmm_knn_smoothing"}
    assert metrics["baselines"]["logistic_regression"]["accuracy"] > metrics["baselines"]["majority"]["accuracy"]
    report = (tmp_path / "a" / "report.md").read_text()
    assert all(name in report for name in ("scmm", "majority", "logistic_regression", "pca_knn"))
    for png in ("confusion_matrix.png", "umap.png"):
        assert (tmp_path / "a" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    evaluate(tiny_model, small_corpus, tmp_path / "b", progress=False)
    assert (tmp_path / "a" / "metrics.json").read_text() == (tmp_path / "b" / "metrics.json").read_text()


def test_eval_bad_input(tiny_model: Path, small_corpus: Path, tmp_path: Path):
    r = run_cli("eval", "--model", str(tmp_path / "nope"), "--corpus", str(small_corpus), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and r.stderr.strip().startswith("error: ") and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
    r = run_cli("eval", "--model", str(tiny_model), "--corpus", str(small_corpus), "--out", str(tmp_path / "o"),
                "--tasks", "describe")
    assert r.returncode == 2 and "stage-2" in r.stderr and not (tmp_path / "o").exists()
