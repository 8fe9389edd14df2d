"""Foreign data: cells unlike everything the model saw are called unknown, and the file as a whole is flagged
(eval/foreign.py, scmm.eval.calibration.report_novelty, scmm annotate's uns['scmm']['novelty_summary'])."""
from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from conftest import make_adata, save_tiny_stage1


@pytest.fixture(scope="module")
def packaged(tmp_path_factory) -> tuple[Path, Path, dict, Path]:
    """(corpus, its input h5ad, eval metrics, package): a model evaluated and packaged with its novelty check.
    The tiny model is untrained: the novelty check is model-free (expression PCA of the train split), and a
    confidence that knows nothing only adds unknowns."""
    from scmm.cli import main
    from scmm.data_pipeline.build import BuildConfig, build_corpus
    from scmm.eval.harness import evaluate
    tmp = tmp_path_factory.mktemp("foreign")
    make_adata(n_cells=360, donors=12).write_h5ad(tmp / "in.h5ad")
    build_corpus(BuildConfig(inputs=[tmp / "in.h5ad"], out=tmp / "c", progress=False))
    model = save_tiny_stage1(tmp / "c", tmp / "model")
    metrics = evaluate(model, tmp / "c", tmp / "e", tasks="annotate", progress=False)
    assert main(["package", "--stage1", str(model), "--corpus", str(tmp / "c"), "--metrics",
                 str(tmp / "e" / "metrics.json"), "--out", str(tmp / "pkg")]) == 0
    return tmp / "c", tmp / "in.h5ad", metrics, tmp / "pkg"


def test_foreign_counts_are_seeded_and_unlike_the_corpus(packaged):
    from scmm.data_pipeline.store import Corpus
    from scmm.eval.foreign import foreign_counts
    corpus = Corpus(packaged[0])
    a, b = foreign_counts(corpus, n_cells=50, seed=1), foreign_counts(corpus, n_cells=50, seed=1)
    assert a.shape == (50, corpus.n_genes) and (a != b).nnz == 0 and (a != foreign_counts(corpus, 50, seed=2)).nnz
    assert np.all(a.data == np.round(a.data)) and (np.asarray(a.sum(axis=1)).ravel() > 0).all()
    with pytest.raises(ValueError, match="at least one cell"):
        foreign_counts(corpus, n_cells=0)


def test_eval_reports_the_val_rate_and_the_foreign_cells(packaged):
    ann = packaged[2]["annotation"]
    assert ann["foreign"]["n_cells"] == 300 and ann["foreign"]["unknown_rate"] >= 0.9
    assert ann["foreign"]["novel_rate"] >= 0.9
    assert 0.0 <= ann["val_abstain_rate"] <= 1.0 and ann["unknown_rate"] == 0.05
    assert ann["calibration"]["novelty_calibration"]["left_out"] == "donor_id"


def _foreign_file(corpus_dir: Path, path: Path, n: int = 200) -> Path:
    from scmm.data_pipeline.store import Corpus
    from scmm.eval.foreign import foreign_counts
    corpus = Corpus(corpus_dir)
    counts = foreign_counts(corpus, n_cells=n, seed=7)
    symbols = [str(s) for s in corpus.gene_symbols]
    ad.AnnData(X=sp.csr_matrix(counts), obs=pd.DataFrame(index=[f"f{i}" for i in range(n)]),
               var=pd.DataFrame({"feature_name": symbols}, index=symbols)).write_h5ad(path)
    return path


def test_a_foreign_file_is_unknown_and_the_log_names_the_share(packaged, tmp_path: Path, caplog):
    """The acceptance: a file of foreign synthetic cells is at least 90% unknown; the log says so once with the
    share, and the output says it in uns['scmm']['novelty_summary']; a file like the training data is not
    flagged."""
    from scmm.api import annotate
    corpus_dir, inp, _, pkg = packaged
    path = _foreign_file(corpus_dir, tmp_path / "foreign.h5ad")
    with caplog.at_level("INFO", logger="scmm"):
        annotate(path, pkg, out=tmp_path / "out.h5ad")
    out = ad.read_h5ad(tmp_path / "out.h5ad")
    unknown = (out.obs["scmm_cell_type"].astype(str) == "unknown").to_numpy()
    assert unknown.mean() >= 0.9
    summary = out.uns["scmm"]["novelty_summary"]
    assert summary["n_cells"] == 200 and bool(summary["foreign"]) and summary["novel_share"] >= 0.9
    assert summary["n_novel"] == int((out.obs["scmm_novelty"] < summary["threshold"]).sum())
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "unlike every" in r.getMessage()]
    share = summary["n_novel"] / 200
    assert len(warned) == 1 and f"{summary['n_novel']} of 200 cells ({share:.1%})" in warned[0], warned
    assert "unlike the model's training data" in warned[0]
    # in memory, the same summary in the returned AnnData's uns
    again = annotate(ad.read_h5ad(path), pkg)
    assert again.uns["scmm"]["novelty_summary"]["n_novel"] == summary["n_novel"]
    # the training data's own file: no warning, a summary that says it is not foreign
    caplog.clear()
    with caplog.at_level("INFO", logger="scmm"):
        own = annotate(inp, pkg)
    assert not own.uns["scmm"]["novelty_summary"]["foreign"]
    assert not [r for r in caplog.records if r.levelname == "WARNING" and "unlike every" in r.getMessage()]
