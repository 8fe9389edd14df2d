"""Bounded-memory access to an h5ad file: var in memory, obs read whole only when asked for (else one column at a
time), the expression matrix in row chunks.

Reads the file with h5py and anndata's on-disk element readers (the machinery behind anndata's
backed mode), so a matrix larger than RAM is never loaded whole. ``open_h5ad(..., read_obs=False)`` (the corpus
build, inference) leaves obs on disk: :meth:`H5adSource.obs_column` reads one column (categoricals stay codes plus
categories) and :meth:`H5adSource.obs_names` a row range of the cell IDs, so no per-cell Python string is held;
the whole table (:attr:`H5adSource.obs`) is read on first use only (inference never needs it: at atlas size it
is the largest thing held per cell).
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
    """One input file: its var table, its obs table (read whole on first use, or given at open) and the chosen
    expression element."""

    path: Path
    var: pd.DataFrame
    element: str  # "X", "raw/X" or "layers/<name>"
    n_obs: int
    n_vars: int
    obs_keys: tuple[str, ...] = ()  # obs column names (of the file; also when obs is not loaded)
    index_key: str = "_index"  # the obs element holding the cell IDs
    _obs: pd.DataFrame | None = field(default=None, repr=False)

    @property
    def obs(self) -> pd.DataFrame:
        """The whole obs table, read on first use."""
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

    def for_worker(self) -> H5adSource:
        """A light copy to send to a worker process (no var; obs, when loaded, keeps only its cell IDs)."""
        obs = None if self._obs is None else self._obs.iloc[:, :0]
        return H5adSource(path=self.path, var=self.var.iloc[:0], element=self.element, n_obs=self.n_obs,
                          n_vars=self.n_vars, obs_keys=self.obs_keys, index_key=self.index_key, _obs=obs)

    @property
    def obs_columns(self) -> list[str]:
        return list(map(str, self._obs.columns)) if self._obs is not None else list(self.obs_keys)

    def obs_column(self, name: str) -> pd.Series:
        """One obs column (a categorical stays categorical)."""
        if self._obs is not None:
            return self._obs[name]
        with h5py.File(self.path, "r") as f:
            try:
                values = anndata.io.read_elem(f["obs"][name])
            except Exception as exc:
                raise ScmmError(f"{self.path}: cannot read obs column '{name}' ({type(exc).__name__}: {exc})") \
                    from None
        return pd.Series(values, copy=False)

    def obs_names(self, start: int, stop: int) -> np.ndarray:
        """The cell IDs (obs names) of rows [start, stop), as str objects."""
        if self._obs is not None:
            return self._obs.index[start:stop].astype(str).to_numpy(dtype=object)
        with h5py.File(self.path, "r") as f:
            node = f["obs"][self.index_key]
            if node.dtype.kind in "OS":
                return np.asarray(node.asstr()[start:stop], dtype=object)
            return node[start:stop].astype(str).astype(object)

    def _open_matrix(self, f: h5py.File):
        node = f[self.element]
        if isinstance(node, h5py.Group):
            encoding = node.attrs.get("encoding-type", "")
            if encoding not in ("csr_matrix", "csc_matrix"):
                raise ScmmError(f"{self.path}: element {self.element} has unsupported encoding '{encoding}'")
            return anndata.io.sparse_dataset(node)
        return node

    def read_chunk(self, start: int, stop: int) -> sp.csr_matrix:
        """Rows [start, stop) as a float32 CSR block, values checked (:func:`check_values`). A CSR element is
        sliced directly (its indptr rows only: anndata's reader loads the whole indptr, 8 bytes per cell of the
        file, each time it is opened)."""
        with h5py.File(self.path, "r") as f:
            node = f[self.element]
            if isinstance(node, h5py.Group) and node.attrs.get("encoding-type", "") == "csr_matrix":
                indptr = node["indptr"][start:stop + 1].astype(np.int64)
                a, b = int(indptr[0]), int(indptr[-1])
                data = node["data"][a:b]
                if data.dtype == np.float16:  # scipy.sparse cannot hold float16
                    data = data.astype(np.float32)
                block = sp.csr_matrix((data, node["indices"][a:b], indptr - a), shape=(stop - start, self.n_vars))
            else:
                block = as_csr(self._open_matrix(f)[start:stop])
        check_values(block.data, f"{self.path} (rows from {start})")
        return block.astype(np.float32)

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


def _lazy_obs(f: h5py.File) -> tuple[tuple[str, ...], str, int] | None:
    """(column names, index key, rows) of an obs group that can be read column by column; None when it cannot
    (an old layout: the caller then reads obs whole)."""
    group = f["obs"]
    attrs = group.attrs
    if not isinstance(group, h5py.Group) or attrs.get("encoding-type") != "dataframe" or "_index" not in attrs:
        return None
    index_key = str(attrs["_index"])
    if index_key not in group or not isinstance(group[index_key], h5py.Dataset):
        return None
    columns = tuple(str(c) for c in np.atleast_1d(attrs.get("column-order", [])))
    if any(c not in group for c in columns):
        return None
    return columns, index_key, int(group[index_key].shape[0])


def open_h5ad(path: str | Path, element: str | None = None, read_obs: bool = True) -> H5adSource:
    """Open an h5ad for streaming; `element` picks the matrix ("X", "raw", or a layer name).

    Without `element`, raw counts are preferred: `layers['counts']`, then `.raw.X`, then `.X`. With ``read_obs``
    False obs stays on disk (read by column with :meth:`H5adSource.obs_column`) when its layout allows.
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
        lazy = None if read_obs else _lazy_obs(f)
        try:
            obs = anndata.io.read_elem(f["obs"]) if lazy is None else None
            var = anndata.io.read_elem(f["raw/var"] if element == "raw/X" else f["var"])
        except Exception as exc:
            raise ScmmError(f"{path}: cannot read obs/var ({type(exc).__name__}: {exc})") from None
        n_obs, n_vars = _shape_of(f[element])
    if n_obs == 0 or n_vars == 0:
        raise ScmmError(f"{path}: the expression matrix is empty ({n_obs} cells x {n_vars} genes)")
    n_obs_rows = len(obs) if obs is not None else lazy[2]
    if n_obs_rows != n_obs or len(var) != n_vars:
        raise ScmmError(f"{path}: {element} is {n_obs}x{n_vars} but obs/var have {n_obs_rows}/{len(var)} rows")
    if lazy is not None:
        return H5adSource(path=path, var=var, element=element, n_obs=n_obs, n_vars=n_vars, obs_keys=lazy[0],
                          index_key=lazy[1])
    return H5adSource(path=path, var=var, element=element, n_obs=n_obs, n_vars=n_vars,
                      obs_keys=tuple(map(str, obs.columns)), _obs=obs)
