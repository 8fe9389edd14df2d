"""`scmm plot umap`: a PNG from obsm['X_scmm'] and obs columns of an annotated h5ad; bad input is one error line."""
from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from conftest import run_cli


def _annotated(path, n=60):
    rng = np.random.default_rng(0)
    types = np.repeat(["B cell", "T cell", "monocyte"], n // 3)
    centres = {"B cell": 0.0, "T cell": 4.0, "monocyte": 8.0}
    x = np.stack([rng.normal(centres[t], 0.5, 8) for t in types]).astype(np.float32)
    adata = ad.AnnData(X=np.zeros((n, 3), dtype=np.float32),
                       obs=pd.DataFrame({"cell_type": types, "scmm_cell_type": types[::-1]},
                                        index=[f"c{i}" for i in range(n)]))
    adata.obsm["X_scmm"] = x
    adata.write_h5ad(path)
    return path


@pytest.mark.slow
def test_plot_umap_writes_png(tmp_path):
    src = _annotated(tmp_path / "a.h5ad")
    out = tmp_path / "fig" / "umap.png"
    r = run_cli("plot", "umap", str(src), "--color", "cell_type,scmm_cell_type", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in out.parent.iterdir()] == ["umap.png"]  # no temporary file left


def test_plot_umap_bad_input(tmp_path):
    src = _annotated(tmp_path / "a.h5ad")
    plain = tmp_path / "plain.h5ad"
    ad.AnnData(X=np.zeros((5, 2), dtype=np.float32)).write_h5ad(plain)
    cases = [
        (str(src), "nope", "obs columns"),
        (str(plain), "cell_type", "no obsm['X_scmm']"),
        (str(tmp_path / "missing.h5ad"), "cell_type", "not found"),
    ]
    for path, color, message in cases:
        out = tmp_path / "u.png"
        r = run_cli("plot", "umap", path, "--color", color, "--out", str(out))
        assert r.returncode == 2
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], r.stderr
        assert not out.exists()
