"""UMAP figures of cell embeddings, one panel per obs column, with colours shared across panels.

Used by `scmm eval` (true vs predicted type on the test split) and by `scmm plot umap` on an annotated h5ad.
"""
from __future__ import annotations

import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import anndata as ad
import matplotlib
import numpy as np
import pandas as pd
from matplotlib.colors import to_hex
from matplotlib.figure import Figure

__all__ = ["umap_png", "palette", "UMAP_MAX_CELLS"]

UMAP_MAX_CELLS = 20_000  # more points add nothing to a picture; a seeded subsample is drawn instead


def palette(n: int) -> list[str]:
    """n distinct colours: the tab20 family (60 colours), then evenly spaced colours of gist_ncar."""
    base = list(matplotlib.colormaps["tab20"].colors) + list(matplotlib.colormaps["tab20b"].colors) + \
        list(matplotlib.colormaps["tab20c"].colors)
    if n <= len(base):
        return [to_hex(c) for c in base[:n]]
    cmap = matplotlib.colormaps["gist_ncar"]
    return [to_hex(cmap(i / max(n - 1, 1))) for i in range(n)]


def _neighbours_and_umap(adata, n_neighbors: int, seed: int) -> None:
    """scanpy's neighbour graph and UMAP, leaving torch's thread count as it was.

    numba's OpenMP start-up inside `sc.pp.neighbors` resets torch's intra-op threads to every core, which
    changes the summation order of later matmuls (1e-7 differences between two evaluations in one process).
    A process that has not imported torch has no thread count to keep, so torch is not imported here (it
    would add a second or more to ``scmm plot umap``).
    """
    import scanpy as sc  # noqa: PLC0415 - scanpy takes seconds to import; only the UMAP needs it

    torch = sys.modules.get("torch")
    threads = torch.get_num_threads() if torch is not None else None
    try:
        sc.pp.neighbors(adata, use_rep="X_scmm", n_neighbors=n_neighbors, random_state=seed)
        sc.tl.umap(adata, random_state=seed)
    finally:
        if torch is not None:
            torch.set_num_threads(threads)


def umap_png(x: np.ndarray, panels: Mapping[str, Sequence[str]], path: str | Path, seed: int = 0,
             title: str = "scmm cell embeddings", notes: list[str] | None = None) -> bool:
    """Draw a UMAP of `x` [N, D] with one panel per entry of `panels` (title -> a label per cell).

    Returns False (with a note) when there are too few cells to draw. Above `UMAP_MAX_CELLS` cells a seeded
    subsample is drawn. The neighbour graph and layout are seeded, so the same input gives the same picture.
    """
    notes = notes if notes is not None else []
    n = len(x)
    if n < 4:
        notes.append(f"UMAP skipped: {n} cells (at least 4 needed)")
        return False
    import scanpy as sc  # noqa: PLC0415 - scanpy takes seconds to import; only plots need it

    idx = np.arange(n)
    if n > UMAP_MAX_CELLS:
        idx = np.sort(np.random.default_rng(seed).choice(n, UMAP_MAX_CELLS, replace=False))
        notes.append(f"UMAP drawn on a seeded subsample of {UMAP_MAX_CELLS} of {n} cells")
    columns = {name: [str(values[i]) for i in idx] for name, values in panels.items()}
    categories: list[str] = []
    for values in columns.values():  # the first panel's types first, so shared types keep their colour
        categories += sorted(set(values) - set(categories))
    adata = ad.AnnData(obs=pd.DataFrame({name: pd.Categorical(v, categories=categories)
                                         for name, v in columns.items()}, index=[str(i) for i in idx]))
    adata.obsm["X_scmm"] = np.ascontiguousarray(x[idx], dtype=np.float32)
    _neighbours_and_umap(adata, min(15, len(idx) - 1), seed)
    colours = palette(len(categories))
    for name in columns:
        adata.uns[f"{name}_colors"] = colours
    fig = Figure(figsize=(6.5 * len(columns), 5.5))  # no pyplot: no global state, no backend change
    axes = fig.subplots(1, len(columns), squeeze=False)
    size = max(4.0, min(60.0, 12000.0 / len(idx)))
    with warnings.catch_warnings():  # scanpy's own deprecation notices about matplotlib calls
        warnings.simplefilter("ignore", PendingDeprecationWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        for ax, name in zip(axes[0], columns):
            sc.pl.umap(adata, color=name, ax=ax, show=False, size=size, legend_fontsize=7, title=name)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True
