"""UMAP figures of cell embeddings, one panel per obs column, with colours shared across panels.

Used by `scmm eval` (true vs predicted type on the test split) and by `scmm plot umap` on an annotated h5ad.
"""
from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import anndata as ad
import matplotlib
import numpy as np
import pandas as pd
from matplotlib.colors import to_hex
from matplotlib.figure import Figure

__all__ = ["umap_png", "scatter_panels", "palette", "UMAP_MAX_CELLS"]

UMAP_MAX_CELLS = 20_000  # more points add nothing to a picture; a seeded subsample is drawn instead
UNKNOWN = "unknown"  # scmm's abstention label: always light grey, never a type's colour
UNKNOWN_COLOUR = "#c8c8c8"
PANEL_INCHES = 5.0  # each panel is square
LEGEND_FONT = 9  # points
LEGEND_ROWS = 24  # more labels than this: two legend columns
LEGEND_MAX_CHARS = 48  # longer labels are cut with an ellipsis


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


def _legend_width(labels: Sequence[str], ncol: int) -> float:
    """Inches a legend of ``labels`` in ``ncol`` columns needs at LEGEND_FONT points (about 0.5 em a character
    of DejaVu Sans), with room for the marker and the gap to the next panel."""
    longest = max((len(label) for label in labels), default=1)
    return ncol * (0.35 + 0.5 * LEGEND_FONT / 72 * longest) + 0.35


def scatter_panels(xy: np.ndarray, columns: Mapping[str, Sequence[str]], categories: list[str], path: str | Path,
                   title: str) -> Figure:
    """Square scatter panels side by side (points ``xy`` [N, 2], one panel per entry of ``columns``), each with
    its legend (labels and counts) to its right; a label has the same colour in every panel. Saved to ``path``
    and returned."""
    named = [c for c in categories if c != UNKNOWN]
    colour = {**dict(zip(named, palette(len(named)))), UNKNOWN: UNKNOWN_COLOUR}
    size = max(2.0, min(40.0, 8000.0 / len(xy)))
    legends = []
    for values in columns.values():
        counts = pd.Series(values).value_counts()
        present = [c for c in categories if c in counts.index]
        ncol = 1 if len(present) <= LEGEND_ROWS else 2
        texts = [f"{_short(c)} ({counts[c]})" for c in present]
        legends.append((present, texts, counts, ncol, _legend_width(texts, ncol)))
    widths = [w for *_, legend_width in legends for w in (PANEL_INCHES, legend_width)]
    fig = Figure(figsize=(sum(widths), PANEL_INCHES + 0.8))  # no pyplot: no global state, no backend change
    grid = fig.add_gridspec(1, len(widths), width_ratios=widths, left=0.02, right=0.99, top=0.86, bottom=0.03,
                            wspace=0.02)
    for i, (name, values) in enumerate(columns.items()):
        present, texts, counts, ncol, _ = legends[i]
        ax = fig.add_subplot(grid[0, 2 * i])
        labels = np.asarray(values)
        drawn = {}
        for c in sorted(present, key=lambda c: -counts[c]):  # the most common first: rare ones drawn on top
            at = labels == c
            drawn[c] = ax.scatter(xy[at, 0], xy[at, 1], s=size, c=colour[c], linewidths=0, rasterized=True)
        ax.set_box_aspect(1)  # a square panel, whatever the spread of the points
        ax.set_aspect("equal", adjustable="datalim")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel("UMAP 1", fontsize=9)
        ax.set_ylabel("UMAP 2", fontsize=9)
        ax.set_title(name, fontsize=11)
        slot = fig.add_subplot(grid[0, 2 * i + 1])
        slot.axis("off")
        slot.legend([drawn[c] for c in present], texts,
                    loc="center left", frameon=False, fontsize=LEGEND_FONT, ncol=ncol,
                    markerscale=max(1.0, 6.0 / np.sqrt(size)), handletextpad=0.3, borderaxespad=0.0)
    fig.suptitle(title, fontsize=12)
    fig.savefig(path, dpi=110)
    return fig


def _short(label: str) -> str:
    return label if len(label) <= LEGEND_MAX_CHARS else label[:LEGEND_MAX_CHARS - 1] + "…"


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
    scatter_panels(np.asarray(adata.obsm["X_umap"]), columns, categories, path, title)
    return True
