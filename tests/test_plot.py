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


def test_panels_are_square_with_legends_and_shared_colours(tmp_path):
    from matplotlib.colors import to_hex

    from scmm.eval.plots import scatter_panels
    rng = np.random.default_rng(0)
    xy = rng.normal(size=(30, 2)) * [10.0, 1.0]  # a wide cloud: the panel must still be square
    truth = ["B cell"] * 10 + ["T cell"] * 20
    pred = ["T cell"] * 25 + ["B cell"] * 5
    fig = scatter_panels(xy, {"cell_type": truth, "scmm_cell_type": pred}, ["B cell", "T cell"],
                         tmp_path / "p.png", "t")
    panels = [ax for ax in fig.axes if ax.axison]
    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    assert len(panels) == 2 and len(legends) == 2
    fig.canvas.draw()
    for ax in panels:  # equal aspect in a square box
        box = ax.get_window_extent()
        assert abs(box.width - box.height) / box.width < 0.05
    assert [t.get_text() for t in legends[0].get_texts()] == ["B cell (10)", "T cell (20)"]
    assert [t.get_text() for t in legends[1].get_texts()] == ["B cell (5)", "T cell (25)"]
    colours = [{t.get_text().split(" (")[0]: to_hex(h.get_facecolor()[0]) for t, h in
                zip(leg.get_texts(), leg.legend_handles)} for leg in legends]
    assert colours[0] == colours[1] and len(set(colours[0].values())) == 2
