"""A TileDB-SOMA experiment (the format of the CELLxGENE Census) as a chunked source for the corpus build.

:func:`open_soma` runs an axis query (``--obs-filter`` / ``--var-filter`` in SOMA's value-filter syntax, e.g.
``is_primary_data == True and tissue_general == 'blood'``) and returns a :class:`SomaSource` with the interface the
build uses of :class:`scmm.data_pipeline.h5ad.H5adSource`: ``var`` (the filtered var table, indexed by ``var_id``
or ``feature_id``), ``obs_columns`` / ``obs_column`` (one obs column of the selected cells, dictionary-encoded
columns as categoricals), ``obs_names`` (cell IDs of a row range: ``obs_id``, else the ``soma_joinid``),
``read_chunk`` / ``read_rows`` (CSR row blocks of the X layer over the selected genes). Rows are the selected
cells in ``soma_joinid`` order, columns the selected genes in ``soma_joinid`` order, so a build from an experiment
written by ``tiledbsoma.io.from_h5ad`` equals the build from the h5ad.

Held per cell: the selected obs ``soma_joinid`` (8 bytes; also sent once to each ``--jobs`` worker). obs columns
are read a million cells at a time into categoricals, X and cell IDs per chunk.
Needs the ``tiledbsoma`` package (``pip install tiledbsoma``); the Census form is
``cellxgene_census.open_soma()`` (its experiment URI, e.g. ``census["census_data"]["homo_sapiens"].uri``).
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp
from pandas.api.types import union_categoricals

from scmm.data_pipeline.h5ad import check_values
from scmm.errors import ScmmError

_ID_COLUMNS = ("soma_joinid", "obs_id")
_LAYERS = ("raw", "counts", "data")
OBS_CHUNK = 1 << 20  # cells per obs read  # X layers preferred when none is named (raw counts first)


class SomaLocation(str):
    """The experiment URI, with the ``name``/``stem`` a file path has (its last component)."""

    @property
    def name(self) -> str:
        return self.rstrip("/").rsplit("/", 1)[-1] or str(self)

    @property
    def stem(self) -> str:
        return self.name


def _tiledbsoma():
    try:
        import tiledbsoma  # noqa: PLC0415 - optional (only --soma needs it); imports in seconds
    except ImportError:
        raise ScmmError("--soma needs the tiledbsoma package: pip install tiledbsoma") from None
    return tiledbsoma


class SomaSource:
    """The cells and genes an axis query selects from one SOMA experiment (see the module docstring)."""

    def __init__(self, uri: str, measurement: str, layer: str, obs_filter: str | None, var_filter: str | None,
                 obs_joinids: np.ndarray, var_joinids: np.ndarray, var: pd.DataFrame, obs_keys: tuple[str, ...]):
        self.path = SomaLocation(uri)
        self.measurement, self.layer = measurement, layer
        self.obs_filter, self.var_filter = obs_filter, var_filter
        self.obs_joinids, self.var_joinids = obs_joinids, var_joinids
        self.var, self.obs_keys = var, obs_keys
        self.element = f"ms/{measurement}/X/{layer}"
        self.n_obs, self.n_vars = len(obs_joinids), len(var_joinids)
        self.obs = None
        self._exp = None

    def __getstate__(self) -> dict:  # to worker processes: no open handle
        return {**self.__dict__, "_exp": None}

    def _experiment(self):
        if self._exp is None:
            self._exp = _tiledbsoma().Experiment.open(str(self.path))
        return self._exp

    def for_worker(self) -> SomaSource:
        """A copy to send to a worker process (no var table, no handle)."""
        light = SomaSource.__new__(SomaSource)
        light.__dict__.update(self.__getstate__())
        light.var = self.var.iloc[:0]
        return light

    @property
    def obs_columns(self) -> list[str]:
        return list(self.obs_keys)

    def _read_obs_part(self, column: str, joinids: np.ndarray) -> pd.Categorical:
        table = self._experiment().obs.read(coords=(joinids,), column_names=["soma_joinid", column]).concat()
        frame = table.to_pandas()
        if len(frame) != len(joinids):
            raise ScmmError(f"{self.path}: obs holds {len(frame)} of {len(joinids)} selected cells")
        order = np.argsort(frame["soma_joinid"].to_numpy(), kind="stable")  # rows in joinid order
        values = frame[column].iloc[order]
        return values.array if isinstance(values.dtype, pd.CategoricalDtype) else pd.Categorical(values)

    def _read_obs(self, column: str, joinids: np.ndarray) -> pd.Series:
        """One obs column of ``joinids`` (sorted), read :data:`OBS_CHUNK` cells at a time and kept as a
        categorical (codes), so that no per-cell Python object outlives a chunk."""
        parts = [self._read_obs_part(column, joinids[a:a + OBS_CHUNK]) for a in range(0, len(joinids), OBS_CHUNK)]
        if len(parts) == 1:
            return pd.Series(parts[0], copy=False)
        try:
            return pd.Series(union_categoricals(parts), copy=False)
        except TypeError:  # categories of different kinds in different chunks
            return pd.Series(pd.Categorical(np.concatenate([np.asarray(p, dtype=object) for p in parts])),
                             copy=False)

    def obs_column(self, name: str) -> pd.Series:
        """One obs column of the selected cells (in soma_joinid order)."""
        if name not in self.obs_keys:
            raise ScmmError(f"{self.path}: no obs column '{name}'")
        return self._read_obs(name, self.obs_joinids)

    def obs_names(self, start: int, stop: int) -> np.ndarray:
        joinids = self.obs_joinids[start:stop]
        if "obs_id" in self._all_obs_columns():
            return np.asarray(self._read_obs_part("obs_id", joinids), dtype=object).astype(str).astype(object)
        return joinids.astype(str).astype(object)

    def _all_obs_columns(self) -> list[str]:
        if not hasattr(self, "_obs_schema_names"):
            self._obs_schema_names = list(self._experiment().obs.schema.names)
        return self._obs_schema_names

    def _read_block(self, start: int, stop: int) -> sp.csr_matrix:
        joinids = self.obs_joinids[start:stop]
        x = self._experiment().ms[self.measurement].X[self.layer]
        table = x.read(coords=(joinids, self.var_joinids)).tables().concat()
        rows = np.searchsorted(joinids, table.column("soma_dim_0").to_numpy())
        cols = np.searchsorted(self.var_joinids, table.column("soma_dim_1").to_numpy())
        data = table.column("soma_data").to_numpy()
        block = sp.csr_matrix((data, (rows, cols)), shape=(len(joinids), self.n_vars))
        block.sum_duplicates()
        return block

    def read_chunk(self, start: int, stop: int) -> sp.csr_matrix:
        """Selected cells [start, stop) as a float32 CSR block over the selected genes, values checked."""
        block = self._read_block(start, stop)
        check_values(block.data, f"{self.path} (rows from {start})")
        return block.astype(np.float32)

    def read_rows(self, ranges: list[tuple[int, int]]):
        """The CSR blocks of the given (start, stop) row ranges, as stored (values not checked)."""
        for start, stop in ranges:
            yield self._read_block(start, stop)

    def close(self) -> None:
        if self._exp is not None:
            self._exp.close()
            self._exp = None


def open_soma(uri: str, obs_filter: str | None = None, var_filter: str | None = None, layer: str | None = None,
              measurement: str = "RNA") -> SomaSource:
    """Open a SOMA experiment and select cells and genes with SOMA value filters; errors are one-line
    :class:`ScmmError` s naming the URI or the filter."""
    soma = _tiledbsoma()
    try:
        exp = soma.Experiment.open(uri)
    except Exception as exc:
        raise ScmmError(f"--soma {uri}: cannot open a SOMA experiment ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    try:
        if measurement not in exp.ms:
            raise ScmmError(f"--soma {uri}: no measurement '{measurement}' (has {', '.join(exp.ms.keys())})")
        ms = exp.ms[measurement]
        layers = list(ms.X.keys())
        if layer is None:
            layer = next((x for x in _LAYERS if x in layers), layers[0] if len(layers) == 1 else None)
            if layer is None:
                raise ScmmError(f"--soma {uri}: name the X layer with --layer (has {', '.join(layers)})")
        elif layer not in layers:
            raise ScmmError(f"--soma {uri}: no X layer '{layer}' (has {', '.join(layers)})")
        joinids = {}
        for axis, array, value_filter in (("obs", exp.obs, obs_filter), ("var", ms.var, var_filter)):
            try:
                table = array.read(column_names=["soma_joinid"], value_filter=value_filter).concat()
            except Exception as exc:
                option = "--obs-filter" if axis == "obs" else "--var-filter"
                raise ScmmError(f"{option} {value_filter!r}: {type(exc).__name__}: "
                                f"{str(exc).splitlines()[0] if str(exc) else 'invalid filter'}") from None
            joinids[axis] = np.sort(table.column("soma_joinid").to_numpy())
        if not len(joinids["obs"]) or not len(joinids["var"]):
            raise ScmmError(f"--soma {uri}: the query selects {len(joinids['obs'])} cells x "
                            f"{len(joinids['var'])} genes")
        var = ms.var.read(coords=(joinids["var"],)).concat().to_pandas()
        var = var.sort_values("soma_joinid").reset_index(drop=True)
        id_column = next((c for c in ("var_id", "feature_id") if c in var.columns), None)
        var.index = pd.Index(var[id_column].astype(str) if id_column else var["soma_joinid"].astype(str), dtype=object)
        var = var.drop(columns=[c for c in ("soma_joinid", id_column) if c], errors="ignore")
        obs_keys = tuple(c for c in exp.obs.schema.names if c not in _ID_COLUMNS)
    finally:
        exp.close()
    return SomaSource(uri, measurement, layer, obs_filter, var_filter, joinids["obs"], joinids["var"], var, obs_keys)
