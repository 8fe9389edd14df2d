"""Bounded-memory access to an h5ad file: var in memory, obs read when first asked for, the expression matrix in
row chunks.

Reads the file with h5py and anndata's on-disk element readers (the machinery behind anndata's
backed mode), so a matrix larger than RAM is never loaded whole.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import anndata
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from scmm.errors import ScmmError

FLOAT32_MAX = float(np.finfo(np.float32).max)


def check_values(values: np.ndarray, where: str) -> None:
    """Stop on stored expression values no model input can hold: NaN or infinite, negative, or beyond float32
    (scmm computes in float32: such a value would become infinite, then NaN)."""
    if values.size == 0:
        return
    if not np.isfinite(values).all():
        raise ScmmError(f"{where}: the expression matrix holds NaN or infinite values")
    if (values < 0).any():
        raise ScmmError(f"{where}: the expression matrix holds negative values; give raw counts or "
                        f"normalised or log-normalised values")
    if values.dtype.kind == "f" and values.dtype.itemsize > 4 and values.max() > FLOAT32_MAX:
        raise ScmmError(f"{where}: the expression matrix holds values too large for float32 (up to "
                        f"{values.max():.3g}); give raw counts or normalised values")


def as_csr(block) -> sp.csr_matrix:
    """A row block (dense or sparse) as CSR; float16, which scipy.sparse cannot hold, is widened to float32."""
    if getattr(block, "dtype", None) == np.float16:
        block = block.astype(np.float32)
    return sp.csr_matrix(block)


@dataclass
class H5adSource:
    """One input file: its var table, its obs table (read on first use: inference never needs it, and at atlas
    size it is the largest thing held per cell) and the chosen expression element."""

    path: Path
    var: pd.DataFrame
    element: str  # "X", "raw/X" or "layers/<name>"
    n_obs: int
    n_vars: int
    _obs: pd.DataFrame | None = field(default=None, repr=False)

    @property
    def obs(self) -> pd.DataFrame:
        if self._obs is None:
            with h5py.File(self.path, "r") as f:
                try:
                    obs = anndata.io.read_elem(f["obs"])
                except Exception as exc:
                    raise ScmmError(f"{self.path}: cannot read obs ({type(exc).__name__}: {exc})") from None
            if len(obs) != self.n_obs:
                raise ScmmError(f"{self.path}: {self.element} has {self.n_obs} rows but obs has {len(obs)}")
            self._obs = obs
        return self._obs

    def _open_matrix(self, f: h5py.File):
        node = f[self.element]
        if isinstance(node, h5py.Group):
            encoding = node.attrs.get("encoding-type", "")
            if encoding not in ("csr_matrix", "csc_matrix"):
                raise ScmmError(f"{self.path}: element {self.element} has unsupported encoding '{encoding}'")
            return anndata.io.sparse_dataset(node)
        return node

    def iter_chunks(self, chunk_size: int, begin: int = 0, end: int | None = None
                    ) -> Iterator[tuple[int, sp.csr_matrix]]:
        """Yield (start_row, CSR block) over the expression element's rows ``begin:end`` (default all)."""
        end = self.n_obs if end is None else min(end, self.n_obs)
        with h5py.File(self.path, "r") as f:
            matrix = self._open_matrix(f)
            for start in range(begin, end, chunk_size):
                block = as_csr(matrix[start:min(start + chunk_size, end)])
                check_values(block.data, f"{self.path} (rows from {start})")
                yield start, block.astype(np.float32)

    def read_rows(self, ranges: list[tuple[int, int]]) -> Iterator[sp.csr_matrix]:
        """The CSR blocks of the given (start, stop) row ranges, as stored (values not checked)."""
        with h5py.File(self.path, "r") as f:
            matrix = self._open_matrix(f)
            for start, stop in ranges:
                yield as_csr(matrix[start:stop])


def _shape_of(node: h5py.Group | h5py.Dataset) -> tuple[int, int]:
    if isinstance(node, h5py.Dataset):
        return tuple(node.shape)  # type: ignore[return-value]
    return tuple(int(x) for x in node.attrs["shape"])  # type: ignore[return-value]


def _n_rows(obs: h5py.Group | h5py.Dataset) -> int:
    """The number of rows of an on-disk obs table without reading it (its index's length)."""
    if isinstance(obs, h5py.Group) and "_index" in obs.attrs:
        return int(obs[obs.attrs["_index"]].shape[0])
    return len(anndata.io.read_elem(obs))  # an older or unusual encoding: read it


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
            n_rows = _n_rows(f["obs"])
            var = anndata.io.read_elem(f["raw/var"] if element == "raw/X" else f["var"])
        except Exception as exc:
            raise ScmmError(f"{path}: cannot read obs/var ({type(exc).__name__}: {exc})") from None
        n_obs, n_vars = _shape_of(f[element])
    if n_obs == 0 or n_vars == 0:
        raise ScmmError(f"{path}: the expression matrix is empty ({n_obs} cells x {n_vars} genes)")
    if n_rows != n_obs or len(var) != n_vars:
        raise ScmmError(f"{path}: {element} is {n_obs}x{n_vars} but obs/var have {n_rows}/{len(var)} rows")
    return H5adSource(path=path, var=var, element=element, n_obs=n_obs, n_vars=n_vars)
