"""Writing AnnData on disk for the inference commands: a copy of the input ``.h5ad`` (its expression matrices never
loaded) whose new ``obsm`` entry and ``obs`` columns are filled chunk by chunk, published atomically
(:mod:`scmm.atomic`); the pseudo-cells of ``generate`` written chunk by chunk; or, without an output file, an
AnnData in memory."""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import anndata as ad
import h5py
import numpy as np
import pandas as pd

from scmm.atomic import check_not_terminated, file_beside, publish_file, temp_file_beside
from scmm.errors import ScmmError
from scmm.output_names import EMBEDDING_KEY, UNS_KEY

__all__ = ["check_output", "ObsColumns", "add_obs_columns", "create_obsm", "Sink", "write_adata", "PseudocellWriter"]


def check_output(src: Path | None, out: Path, overwrite: bool) -> None:
    """Refuse to write over the input or, without ``overwrite``, over an existing file, or where nothing can be
    written (missing folders on the way are created when the result is written)."""
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ScmmError(f"cannot write --out {out}: {parent} is not a writable folder")
    if src is not None and out.exists() and src.exists() and out.resolve() == src.resolve():
        raise ScmmError(f"--out {out} is the input file; scmm never modifies its input")
    if out.exists() and not overwrite:
        raise ScmmError(f"output {out} already exists (pass --overwrite to replace it)")
    if out.exists() and out.is_dir():
        raise ScmmError(f"output {out} is a folder")
    if out.suffix != ".h5ad":
        raise ScmmError(f"--out must name a .h5ad file, not {out}")


class ObsColumns:
    """New obs columns gathered chunk by chunk in compact form: a categorical column as int32 codes into the
    categories seen so far (4 bytes per cell), a numeric one in its own dtype (4 bytes for the confidence, 2 for
    the level). :meth:`frame` gives what one call over all cells gives (categories: the sorted values present)."""

    def __init__(self, n: int):
        self.n = n
        self.numeric: dict[str, np.ndarray] = {}
        self.codes: dict[str, np.ndarray] = {}
        self.categories: dict[str, dict[str, int]] = {}
        self.order: list[str] = []

    def put(self, start: int, frame: pd.DataFrame) -> None:
        stop = start + len(frame)
        for col in frame.columns:
            values = frame[col]
            if isinstance(values.dtype, pd.CategoricalDtype):
                seen = self.categories.setdefault(col, {})
                local = np.array([seen.setdefault(str(c), len(seen)) for c in values.cat.categories] + [-1],
                                 dtype=np.int32)
                self.codes.setdefault(col, np.full(self.n, -1, dtype=np.int32))[start:stop] = \
                    local[values.cat.codes.to_numpy()]
            else:
                if col not in self.numeric:
                    self.numeric[col] = np.zeros(self.n, dtype=values.dtype)
                self.numeric[col][start:stop] = values.to_numpy()
        self.order = list(frame.columns)

    def frame(self) -> pd.DataFrame:
        out = pd.DataFrame(index=pd.RangeIndex(self.n))
        for col in self.order:
            if col in self.codes:
                names = np.array(list(self.categories[col]), dtype=object)
                order = np.argsort(names, kind="stable")
                remap = np.empty(len(names) + 1, dtype=np.int32)
                remap[order], remap[-1] = np.arange(len(names), dtype=np.int32), -1
                out[col] = pd.Categorical.from_codes(remap[self.codes[col]], categories=list(names[order]))
            else:
                out[col] = self.numeric[col]
        return out


def add_obs_columns(f: h5py.File, obs: pd.DataFrame) -> None:
    """Add (or replace) the columns of ``obs`` in the file's obs table, column by column: the table already there
    is not read (an obs in an older encoding, or a new column named like its index, is read and written back)."""
    group = f["obs"]
    index_name = group.attrs.get("_index") if isinstance(group, h5py.Group) else None
    if group.attrs.get("encoding-type") != "dataframe" or index_name is None or index_name in obs.columns:
        current = ad.io.read_elem(group)
        for col in obs.columns:
            current[col] = obs[col].values
        del f["obs"]
        ad.io.write_elem(f, "obs", current)
        return
    order = [str(c) for c in group.attrs.get("column-order", [])]
    for col in obs.columns:
        if col in group:
            del group[col]
        ad.io.write_elem(group, col, obs[col].values)
        if col not in order:
            order.append(col)
    group.attrs["column-order"] = order


def create_obsm(f: h5py.File, key: str, shape: tuple[int, int]) -> h5py.Dataset:
    """An empty float32 ``obsm[key]`` of ``shape`` in anndata's on-disk encoding (a plain 2-D array), to fill by
    rows."""
    if "obsm" not in f:
        ad.io.write_elem(f, "obsm", {})
    if key in f["obsm"]:
        del f["obsm"][key]
    ds = f["obsm"].create_dataset(key, shape=shape, dtype=np.float32)
    ds.attrs["encoding-type"], ds.attrs["encoding-version"] = "array", "0.2.0"
    return ds


class Sink:
    """Where a run's embeddings and new obs columns go. With ``out`` and an ``.h5ad`` input: a byte copy of the
    input (the expression matrices are never loaded) beside ``out``, whose ``obsm['X_scmm']`` is filled chunk by
    chunk and whose obs gets the new columns at the end, renamed into place when complete (bounded memory);
    else arrays in memory, and an AnnData copy of the input at the end."""

    def __init__(self, data: Any, out: Path | None, n: int, dim: int | None):
        self.data, self.out, self.n = data, out, n
        self.tmp: Path | None = None
        self.file: h5py.File | None = None
        self.emb: Any = None
        self.held: dict[str, np.ndarray] = {}  # text columns held until the end
        if out is not None and isinstance(data, (str, Path)):
            self.tmp = temp_file_beside(out, suffix=".h5ad")
            try:
                shutil.copyfile(data, self.tmp)
                self.file = h5py.File(self.tmp, "r+")
                if dim is not None:
                    self.emb = create_obsm(self.file, EMBEDDING_KEY, (n, dim))
            except BaseException:  # an error, Ctrl-C or SIGTERM before `with` holds it: __exit__ would not run
                self.__exit__()
                raise
        elif dim is not None:
            self.emb = np.zeros((n, dim), dtype=np.float32)

    def __enter__(self) -> Sink:
        return self

    def __exit__(self, *exc) -> None:
        if self.file is not None:
            self.file.close()
        if self.tmp is not None and self.tmp.exists():
            self.tmp.unlink()

    def put(self, start: int, emb: np.ndarray) -> None:
        check_not_terminated()
        self.emb[start:start + len(emb)] = emb

    def text_column(self, name: str) -> Any:
        """A new string obs column to fill by rows: in the output file itself when its obs table allows (anndata's
        string-array encoding), else an array held until :meth:`finish`."""
        group = self.file["obs"] if self.file is not None else None
        if group is not None and group.attrs.get("encoding-type") == "dataframe" and \
                name != group.attrs.get("_index"):
            if name in group:
                del group[name]
            column = group.create_dataset(name, shape=(self.n,), dtype=h5py.string_dtype())
            column.attrs["encoding-type"], column.attrs["encoding-version"] = "string-array", "0.2.0"
            order = [str(c) for c in group.attrs.get("column-order", [])]
            group.attrs["column-order"] = order + ([name] if name not in order else [])
            return column
        column = np.full(self.n, "", dtype=object)
        self.held[name] = column
        return column

    def embeddings(self) -> np.ndarray:
        return np.asarray(self.emb[...])

    def finish(self, obs: pd.DataFrame | None):
        """The result: the output file's path, or an AnnData (``obs.attrs[UNS_KEY]`` goes to ``uns['scmm']``)."""
        uns = obs.attrs.get(UNS_KEY) if obs is not None else None
        if self.held:
            obs = pd.DataFrame(self.held) if obs is None else obs.assign(**self.held)
        if self.file is not None:
            if obs is not None and len(obs.columns):
                add_obs_columns(self.file, obs)
            if uns:
                add_uns(self.file, uns)
            self.file.close()
            self.file = None
            return publish_file(self.tmp, self.out)
        data = self.data
        if isinstance(data, (str, Path)):
            adata = ad.read_h5ad(data)
        elif getattr(data, "isbacked", False):
            adata = data.to_memory()
        else:
            adata = data.copy()
        for col in (obs.columns if obs is not None else []):
            adata.obs[col] = obs[col].values
        if self.emb is not None:
            adata.obsm[EMBEDDING_KEY] = self.emb
        if uns:
            scmm_uns = adata.uns.get(UNS_KEY)
            adata.uns[UNS_KEY] = {**(dict(scmm_uns) if isinstance(scmm_uns, dict) else {}), **uns}
        return write_adata(adata, self.out) if self.out is not None else adata


def add_uns(file: h5py.File, uns: dict) -> None:
    """``uns['scmm'][key] = value`` for each item of ``uns`` in an open h5ad (other ``uns`` entries are kept)."""
    group = file.require_group("uns")
    if UNS_KEY in group and not isinstance(group[UNS_KEY], h5py.Group):
        del group[UNS_KEY]
    scmm_group = group.require_group(UNS_KEY)
    for g in (group, scmm_group):
        if "encoding-type" not in g.attrs:
            g.attrs["encoding-type"], g.attrs["encoding-version"] = "dict", "0.1.0"
    for key, value in uns.items():
        if key in scmm_group:
            del scmm_group[key]
        ad.io.write_elem(scmm_group, key, {k: v for k, v in value.items() if v is not None})


def write_adata(adata: ad.AnnData, out: Path) -> Path:
    """``adata`` written to ``out`` atomically."""
    with file_beside(out, suffix=".h5ad") as tmp:
        adata.write_h5ad(tmp)
    return out


def _encoded(node: h5py.Dataset | h5py.Group, encoding: str) -> None:
    node.attrs["encoding-type"], node.attrs["encoding-version"] = encoding, "0.2.0"


class PseudocellWriter:
    """``generate``'s ``.h5ad`` written chunk by chunk beside ``out`` and renamed into place when complete: ``X``
    (dense float32), ``obs`` (``prompt``, categorical over the texts; ``pseudocell``, the draw's number within its
    text; index ``pseudocell_<row>``) in anndata's on-disk encoding, so memory is set by the chunk, not by the
    number of pseudo-cells. Rows are text-major (``n`` per text)."""

    def __init__(self, out: Path, texts: list[str], n: int, var: pd.DataFrame, uns: dict):
        self.out, self.n, self.total = out, n, len(texts) * n
        categories = sorted(set(texts))  # as pandas orders a categorical of the prompts
        self.text_codes = np.array([categories.index(t) for t in texts], dtype=np.int32)
        self.tmp: Path | None = temp_file_beside(out, suffix=".h5ad")
        self.file: h5py.File | None = None
        try:
            self._layout(categories, var, uns)
        except BaseException:  # an error, Ctrl-C or SIGTERM before `with` holds it: __exit__ would not run
            self.__exit__()
            raise

    def _layout(self, categories: list[str], var: pd.DataFrame, uns: dict) -> None:
        """The file's groups and empty datasets, in anndata's on-disk encoding."""
        self.file = f = h5py.File(self.tmp, "w")
        f.attrs["encoding-type"], f.attrs["encoding-version"] = "anndata", "0.1.0"
        ad.io.write_elem(f, "var", var)
        ad.io.write_elem(f, "uns", uns)
        for key in ("obsm", "varm", "obsp", "varp", "layers"):
            ad.io.write_elem(f, key, {})
        self.x = f.create_dataset("X", shape=(self.total, len(var)), dtype=np.float32)
        _encoded(self.x, "array")
        obs = f.create_group("obs")
        _encoded(obs, "dataframe")
        obs.attrs["_index"], obs.attrs["column-order"] = "_index", ["prompt", "pseudocell"]
        self.names = obs.create_dataset("_index", shape=(self.total,), dtype=h5py.string_dtype())
        _encoded(self.names, "string-array")
        prompt = obs.create_group("prompt")
        _encoded(prompt, "categorical")
        prompt.attrs["ordered"] = False
        self.codes = prompt.create_dataset("codes", shape=(self.total,), dtype=np.int32)
        _encoded(self.codes, "array")
        ad.io.write_elem(prompt, "categories", np.array(categories, dtype=object))
        self.draw = obs.create_dataset("pseudocell", shape=(self.total,), dtype=np.int64)
        _encoded(self.draw, "array")

    def __enter__(self) -> PseudocellWriter:
        return self

    def __exit__(self, *exc) -> None:
        if self.file is not None:
            self.file.close()
        if self.tmp is not None:
            self.tmp.unlink(missing_ok=True)

    def put(self, start: int, x: np.ndarray) -> None:
        """Rows ``start:start + len(x)`` of ``X`` and their obs."""
        check_not_terminated()
        rows = np.arange(start, start + len(x))
        self.x[start:start + len(x)] = x.astype(np.float32, copy=False)
        self.names[start:start + len(x)] = np.array([f"pseudocell_{i}" for i in rows], dtype=object)
        self.codes[start:start + len(x)] = self.text_codes[rows // self.n]
        self.draw[start:start + len(x)] = rows % self.n

    def finish(self) -> Path:
        """Publish the complete file as ``out``."""
        self.file.close()
        self.file = None
        out = publish_file(self.tmp, self.out)
        self.tmp = None
        return out
