"""Bounded-memory access to an h5ad file: obs/var in memory, the expression matrix in row chunks.

Reads the file with h5py and anndata's on-disk element readers (the machinery behind anndata's
backed mode), so a matrix larger than RAM is never loaded whole.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import anndata
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from scmm.errors import ScmmError


@dataclass
class H5adSource:
    """One input file: its obs and var tables and the chosen expression element."""

    path: Path
    obs: pd.DataFrame
    var: pd.DataFrame
    element: str  # "X", "raw/X" or "layers/<name>"
    n_obs: int
    n_vars: int

    def iter_chunks(self, chunk_size: int) -> Iterator[tuple[int, sp.csr_matrix]]:
        """Yield (start_row, CSR block) over the expression element."""
        with h5py.File(self.path, "r") as f:
            node = f[self.element]
            if isinstance(node, h5py.Group):
                encoding = node.attrs.get("encoding-type", "")
                if encoding not in ("csr_matrix", "csc_matrix"):
                    raise ScmmError(f"{self.path}: element {self.element} has unsupported encoding '{encoding}'")
                matrix = anndata.io.sparse_dataset(node)
            else:
                matrix = node
            for start in range(0, self.n_obs, chunk_size):
                block = matrix[start:min(start + chunk_size, self.n_obs)]
                yield start, sp.csr_matrix(block, dtype=np.float32)


def _shape_of(node: h5py.Group | h5py.Dataset) -> tuple[int, int]:
    if isinstance(node, h5py.Dataset):
        return tuple(node.shape)  # type: ignore[return-value]
    return tuple(int(x) for x in node.attrs["shape"])  # type: ignore[return-value]


def open_h5ad(path: str | Path, element: str | None = None) -> H5adSource:
    """Open an h5ad for streaming; `element` picks the matrix ("X", "raw", or a layer name).

    Without `element`, raw counts are preferred: `layers['counts']`, then `.raw.X`, then `.X`.
    """
    path = Path(path)
    if not path.is_file():
        raise ScmmError(f"input file not found: {path}")
    try:
        f = h5py.File(path, "r")
    except OSError:
        raise ScmmError(f"{path} is not an h5ad file (cannot be opened as HDF5)") from None
    with f:
        if "obs" not in f or "var" not in f or "X" not in f:
            raise ScmmError(f"{path} is not an h5ad file (no obs/var/X)")
        if element is None:
            element = "layers/counts" if "layers/counts" in f else ("raw/X" if "raw/X" in f else "X")
        elif element == "raw":
            element = "raw/X"
        elif element != "X":
            element = f"layers/{element}"
        if element not in f:
            raise ScmmError(f"{path} has no expression element '{element}'")
        try:
            obs = anndata.io.read_elem(f["obs"])
            var = anndata.io.read_elem(f["raw/var"] if element == "raw/X" else f["var"])
        except Exception as exc:
            raise ScmmError(f"{path}: cannot read obs/var ({type(exc).__name__}: {exc})") from None
        n_obs, n_vars = _shape_of(f[element])
    if n_obs == 0 or n_vars == 0:
        raise ScmmError(f"{path}: the expression matrix is empty ({n_obs} cells x {n_vars} genes)")
    if len(obs) != n_obs or len(var) != n_vars:
        raise ScmmError(f"{path}: {element} is {n_obs}x{n_vars} but obs/var have {len(obs)}/{len(var)} rows")
    return H5adSource(path=path, obs=obs, var=var, element=element, n_obs=n_obs, n_vars=n_vars)
