"""What ``scmm explore`` does for one h5ad and one model: the map, colours, text search, cells, questions, exports.

The h5ad is opened read-only and never loaded whole: obs columns and expression rows are read as needed
(:class:`scmm.data_pipeline.h5ad.H5adSource`), the cell embeddings chunk by chunk from ``obsm['X_scmm']``. The input
is never written to: an input without ``obsm['X_scmm']`` is embedded once with :func:`scmm.api.embed` into a cache
folder beside it (``.<name>.scmm-explore/``; when that folder cannot be written, under the user's cache), and the
UMAP of the embeddings (when the input has no ``obsm['X_umap']``) is cached there too. Cell annotations,
descriptions and answers come from :func:`scmm.api.annotate` and :func:`scmm.api.describe` on an in-memory subset of
the asked cells, with the input scale detected once on the whole file; a free question goes to the stage-2 LLM
(:meth:`scmm.model.stage2.Stage2Model.describe_cells` with the question as the prompt), and a question about the
cell type to the LLM's calibrated, backed-off answer scored over the model's labels (``scmm_llm_*`` columns).

Every argument from a request is checked here and refused with a :class:`RequestError` (an HTTP status and one
line), before any work.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import re
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from scmm import api
from scmm.atomic import write_file
from scmm.data_pipeline.collate import CP10K, log1p_normalize
from scmm.data_pipeline.h5ad import H5adSource, open_h5ad
from scmm.data_pipeline.reader import detect_scale, iter_batches, open_input, plan_genes
from scmm.data_pipeline.scale import to_linear
from scmm.errors import ScmmError

log = logging.getLogger("scmm.explore")

MAX_TEXT = 300  # characters of a search query or a question
MAX_TOP = 500  # top matches listed
MAX_CATEGORIES = 65_535  # a categorical colour travels as uint16 codes; 65535 marks a missing value
MISSING_CODE = 65_535
SAMPLE = 16  # cells of a selection that the LLM describes or answers about
MAX_H5AD_EXPORT = 200_000  # cells in an h5ad export (held in memory while written)
UMAP_FIT_MAX = 100_000  # above this many cells UMAP is fitted on a sample and the rest transformed
PROGRAM_PREFIXES = ("scmm_program_", "program_")  # numeric obs columns holding a program's activity
LABEL_COLUMNS = ("cell_type", "scmm_cell_type", "bulk_labels", "louvain", "leiden")
CELL_TYPE_QUESTION = re.compile(
    r"\b(cell[\s-]*type|what\s+(kind|sort|type)\s+of\s+cell|which\s+(kind|sort|type)\s+of\s+cell|"
    r"what\s+(is|are)\s+(this|these|it|they)\b(\s+cells?)?\s*\??$|identity|identify)", re.IGNORECASE)


class RequestError(Exception):
    """A request the session refuses: ``status`` is the HTTP status (4xx), the message one line for the page."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class Colour:
    """A colouring of every cell: ``meta`` (JSON: kind, categories with counts, or range) and the values
    (uint16 category codes with :data:`MISSING_CODE` for missing, or float32 with NaN for missing)."""

    meta: dict
    values: np.ndarray


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise RequestError(400, f"{what} must be a string")
    text = " ".join(value.split())
    if not text:
        raise RequestError(400, f"{what} is empty")
    if len(text) > MAX_TEXT:
        raise RequestError(400, f"{what} is longer than {MAX_TEXT} characters ({len(text)})")
    return text


def _cache_folder(path: Path) -> Path:
    """``.<name>.scmm-explore/`` beside the input, or (a read-only folder) one under the user's cache; created
    when first written to."""
    beside = path.parent / f".{path.name}.scmm-explore"
    if beside.is_dir() or os.access(path.parent, os.W_OK | os.X_OK):
        return beside
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "scmm" / "explore"
    return root / hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]


class ExploreSession:
    """One input h5ad (read-only) and one model, answering the page's requests."""

    def __init__(self, data: str | os.PathLike, model: Any, *, cache_dir: str | os.PathLike | None = None,
                 chunk_size: int = 20_000, batch_size: int = 64, device: str = "cpu"):
        self.path = Path(data)
        if not self.path.is_file():
            raise ScmmError(f"input file {'is a folder' if self.path.is_dir() else 'not found'}: {self.path}")
        if self.path.suffix != ".h5ad":
            raise ScmmError(f"the input must be an .h5ad file, not {self.path}")
        self.source: H5adSource = open_h5ad(self.path, read_obs=False)
        self.model = api.load_model(model)
        self.n = self.source.n_obs
        self.chunk_size, self.batch_size, self.device = chunk_size, batch_size, device
        self.cache = Path(cache_dir) if cache_dir is not None else _cache_folder(self.path)
        self.columns = [c for c in self.source.obs_columns]
        self.dim = int(self.model.aligner.heads.cell_proj.out_features)
        self._scale = None
        self._genes: dict[str, int] | None = None
        self.label_column = next((c for c in LABEL_COLUMNS if c in self.columns), None)
        self.embedding_file, self.embedding_source = self._embeddings()
        self.coords, self.map_source = self._map()

    # --- the map and the embeddings -------------------------------------------------------------------
    def _stamp(self) -> dict:
        st = self.path.stat()
        return {"input": str(self.path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                "model": self.model.fingerprint}

    def _cached(self, name: str) -> Path | None:
        meta = self.cache / f"{name}.json"
        target = self.cache / name
        if target.exists() and meta.is_file():
            try:
                if json.loads(meta.read_text()) == self._stamp():
                    return target
            except (OSError, ValueError):
                pass
        return None

    def _mark(self, name: str) -> None:
        self.cache.mkdir(parents=True, exist_ok=True)
        write_file(self.cache / f"{name}.json", lambda tmp: tmp.write_text(json.dumps(self._stamp())))

    def _embeddings(self) -> tuple[Path, str]:
        """(file holding ``obsm['X_scmm']``, where it came from): the input's own, else a cached embedding."""
        with h5py.File(self.path, "r") as f:
            node = f.get(f"obsm/{api.EMBEDDING_KEY}")
            if isinstance(node, h5py.Dataset) and node.shape == (self.n, self.dim):
                return self.path, f"obsm['{api.EMBEDDING_KEY}'] of the input"
        cached = self._cached("embedded.h5ad")
        if cached is None:
            log.info("%s has no obsm['%s']: embedding its %d cells once (cached in %s)", self.path,
                     api.EMBEDDING_KEY, self.n, self.cache)
            self.cache.mkdir(parents=True, exist_ok=True)
            api.embed(self.path, self.model, out=self.cache / "embedded.h5ad", overwrite=True,
                      chunk_size=self.chunk_size, batch_size=self.batch_size, device=self.device)
            self._mark("embedded.h5ad")
            cached = self.cache / "embedded.h5ad"
        return cached, f"scmm embed, cached in {self.cache}"

    def iter_embeddings(self):
        """(first row, float32 embeddings) per chunk of ``chunk_size`` cells."""
        with h5py.File(self.embedding_file, "r") as f:
            ds = f[f"obsm/{api.EMBEDDING_KEY}"]
            for start in range(0, self.n, self.chunk_size):
                yield start, np.asarray(ds[start:start + self.chunk_size], dtype=np.float32)

    def _map(self) -> tuple[np.ndarray, str]:
        """float32 [n, 2]: ``obsm['X_umap']`` of the input, else a UMAP of the embeddings (cached)."""
        with h5py.File(self.path, "r") as f:
            node = f.get("obsm/X_umap")
            if isinstance(node, h5py.Dataset) and node.ndim == 2 and node.shape[0] == self.n and node.shape[1] >= 2:
                xy = np.asarray(node[:, :2], dtype=np.float32)
                if np.isfinite(xy).all():
                    return xy, "obsm['X_umap'] of the input"
        cached = self._cached("umap.npy")
        if cached is not None:
            return np.load(cached).astype(np.float32), f"UMAP of {api.EMBEDDING_KEY} (cached in {self.cache})"
        xy = self._umap()
        self.cache.mkdir(parents=True, exist_ok=True)
        write_file(self.cache / "umap.npy", lambda tmp: np.save(open(tmp, "wb"), xy))
        self._mark("umap.npy")
        return xy, f"UMAP of {api.EMBEDDING_KEY} (computed now, cached in {self.cache})"

    def _umap(self) -> np.ndarray:
        from umap import UMAP  # noqa: PLC0415 - umap-learn compiles with numba at import (seconds)
        rng = np.random.default_rng(0)
        fit_rows = np.arange(self.n) if self.n <= UMAP_FIT_MAX else np.sort(rng.choice(self.n, UMAP_FIT_MAX, False))
        with h5py.File(self.embedding_file, "r") as f:
            ds = f[f"obsm/{api.EMBEDDING_KEY}"]
            sample = np.asarray(ds[fit_rows] if self.n > UMAP_FIT_MAX else ds[...], dtype=np.float32)
        reducer = UMAP(n_neighbors=min(15, max(2, len(sample) - 1)), random_state=0, metric="cosine",
                       init="spectral" if len(sample) > 20 else "random")
        fitted = reducer.fit_transform(sample).astype(np.float32)
        if self.n <= UMAP_FIT_MAX:
            return fitted
        out = np.zeros((self.n, 2), dtype=np.float32)
        for start, emb in self.iter_embeddings():
            out[start:start + len(emb)] = reducer.transform(emb)
        out[fit_rows] = fitted
        return out

    # --- what the page lists ------------------------------------------------------------------------
    def info(self) -> dict:
        programs = [c for c in self.columns if c.startswith(PROGRAM_PREFIXES)]
        return {"n_cells": self.n, "n_genes": int(self.source.n_vars), "input": self.path.name,
                "obs_columns": [c for c in self.columns if c not in programs], "programs": programs,
                "label_column": self.label_column, "map_source": self.map_source,
                "embedding_source": self.embedding_source, "has_stage2": bool(self.model.has_stage2),
                "default_colour": self.label_column or (self.columns[0] if self.columns else None),
                "limits": {"text": MAX_TEXT, "top": MAX_TOP, "h5ad_export": MAX_H5AD_EXPORT}}

    def genes(self, prefix: str, limit: int = 20) -> list[str]:
        prefix = _text(prefix, "gene").upper()
        return sorted(name for name in self._gene_index() if name.upper().startswith(prefix))[:limit]

    def _gene_index(self) -> dict[str, int]:
        if self._genes is None:
            var = self.source.var
            names = var["feature_name"].astype(str) if "feature_name" in var.columns else var.index.astype(str)
            genes: dict[str, int] = {}
            for i, (sym, ident) in enumerate(zip(names, var.index.astype(str))):
                genes.setdefault(sym, i)
                genes.setdefault(ident, i)
            self._genes = genes
        return self._genes

    # --- colours ------------------------------------------------------------------------------------
    def colour_by_obs(self, column: str) -> Colour:
        if column not in self.columns:
            raise RequestError(404, f"obs has no column '{column}'")
        values = self.source.obs_column(column)
        if pd.api.types.is_bool_dtype(values.dtype) or not pd.api.types.is_numeric_dtype(values.dtype):
            return self._categorical(column, values)
        x = np.asarray(values, dtype=np.float32)
        kind = "program" if column.startswith(PROGRAM_PREFIXES) else "obs"
        return self._continuous({"source": kind, "name": column}, x)

    def colour_by_gene(self, gene: str) -> Colour:
        gene = _text(gene, "gene")
        index = self._gene_index()
        col = index.get(gene)
        if col is None:
            upper = {k.upper(): v for k, v in index.items()}
            col = upper.get(gene.upper())
        if col is None:
            raise RequestError(404, f"gene '{gene}' is not in the input's var")
        scale = self.scale()
        out = np.zeros(self.n, dtype=np.float32)
        for start, block in self.source.iter_chunks(self.chunk_size):
            linear = to_linear(block, scale, f"{self.path} (rows from {start})")
            out[start:start + block.shape[0]] = log1p_normalize(linear, "counts", CP10K)[:, col].toarray().ravel()
        return self._continuous({"source": "gene", "name": gene, "unit": "log1p(CP10k)"}, out)

    @staticmethod
    def _continuous(meta: dict, x: np.ndarray) -> Colour:
        finite = x[np.isfinite(x)]
        lo, hi = (float(finite.min()), float(finite.max())) if len(finite) else (0.0, 0.0)
        return Colour({**meta, "kind": "continuous", "min": lo, "max": hi, "missing": int(len(x) - len(finite))},
                      x.astype(np.float32))

    def _categorical(self, column: str, values: pd.Series) -> Colour:
        cat = values.astype("category") if not isinstance(values.dtype, pd.CategoricalDtype) else values
        categories = [str(c) for c in cat.cat.categories]
        if len(categories) >= MAX_CATEGORIES:
            raise RequestError(400, f"obs column '{column}' has {len(categories)} distinct values: too many to colour")
        codes = cat.cat.codes.to_numpy().astype(np.int64)
        counts = np.bincount(codes[codes >= 0], minlength=len(categories))
        out = np.where(codes >= 0, codes, MISSING_CODE).astype(np.uint16)
        return Colour({"source": "obs", "name": column, "kind": "categorical", "categories": categories,
                       "counts": [int(c) for c in counts], "missing": int((codes < 0).sum())}, out)

    def scale(self):
        """The input's value scale, detected once from a sample of the whole file."""
        if self._scale is None:
            self._scale = detect_scale(self.source, "auto")
        return self._scale

    # --- search -------------------------------------------------------------------------------------
    def search(self, query: Any, top: Any = 50) -> tuple[dict, np.ndarray]:
        """(the top matches, every cell's cosine similarity to the query's text embedding in the joint space)."""
        query = _text(query, "query")
        if not isinstance(top, int) or isinstance(top, bool) or not 1 <= top <= MAX_TOP:
            raise RequestError(400, f"top must be an integer between 1 and {MAX_TOP}")
        aligner = self.model.aligner.eval()
        with torch.inference_mode():
            q = torch.nn.functional.normalize(aligner.text_features([query]).float().cpu(), dim=-1)[0].numpy()
        sims = np.zeros(self.n, dtype=np.float32)
        for start, emb in self.iter_embeddings():
            sims[start:start + len(emb)] = emb @ q
        k = min(top, self.n)
        best = np.argpartition(-sims, k - 1)[:k]
        best = best[np.argsort(-sims[best], kind="stable")]
        ids = self.cell_ids(best)
        labels = self.column_values(self.label_column, best) if self.label_column else [None] * k
        matches = [{"index": int(i), "cell_id": c, "label": lab, "similarity": float(sims[i])}
                   for i, c, lab in zip(best, ids, labels)]
        return {"query": query, "label_column": self.label_column, "matches": matches,
                "min": float(sims.min()), "max": float(sims.max())}, sims

    # --- cells and selections -----------------------------------------------------------------------
    def check_cells(self, cells: Any, limit: int | None = None) -> np.ndarray:
        """Sorted unique int64 row numbers, each in range; refused when empty, out of range or too many."""
        try:
            rows = np.asarray(cells)
        except (TypeError, ValueError):
            raise RequestError(400, "cells must be a list of cell numbers") from None
        if rows.ndim == 1 and len(rows) == 0:
            raise RequestError(400, "no cells given")
        if rows.ndim != 1 or rows.dtype.kind not in "iu":
            raise RequestError(400, "cells must be a list of integer cell numbers")
        rows = rows.astype(np.int64)
        if rows.min() < 0 or rows.max() >= self.n:
            raise RequestError(404, f"cell numbers must be in [0, {self.n - 1}]")
        rows = np.unique(rows)
        if limit is not None and len(rows) > limit:
            raise RequestError(413, f"{len(rows)} cells: at most {limit} here")
        return rows

    def cell_ids(self, rows: np.ndarray) -> list[str]:
        with h5py.File(self.path, "r") as f:
            node = f["obs"][self.source.index_key]
            values = node.asstr()[np.sort(rows)] if node.dtype.kind in "OS" else node[np.sort(rows)].astype(str)
        order = np.argsort(np.argsort(rows))
        return [str(v) for v in np.asarray(values, dtype=object)[order]]

    def column_values(self, column: str, rows: np.ndarray) -> list:
        """The values of obs ``column`` at ``rows`` (str, float or None), read without loading the column whole
        when it is stored as a categorical, a numeric or a string array."""
        sorted_rows = np.sort(rows)
        order = np.argsort(np.argsort(rows))
        with h5py.File(self.path, "r") as f:
            node = f["obs"][column]
            enc = node.attrs.get("encoding-type", "")
            if enc == "categorical":
                cats = np.asarray(ad.io.read_elem(node["categories"]), dtype=object)
                codes = node["codes"][sorted_rows] if len(rows) < self.n else node["codes"][...][sorted_rows]
                vals = [str(cats[c]) if c >= 0 else None for c in codes]
            elif isinstance(node, h5py.Dataset) and node.dtype.kind in "OS":
                vals = [str(v) for v in node.asstr()[sorted_rows]]
            elif isinstance(node, h5py.Dataset) and node.dtype.kind in "iufb":
                vals = [v.item() for v in node[sorted_rows]]
            else:
                series = self.source.obs_column(column)
                vals = [None if pd.isna(v) else (v.item() if hasattr(v, "item") else str(v))
                        for v in series.iloc[sorted_rows]]
        vals = [None if isinstance(v, float) and not np.isfinite(v) else v for v in vals]
        return [vals[i] for i in order]

    def cell(self, row: Any) -> dict:
        """One cell: its obs values, scmm's annotation (stored, else computed now) and its stored description."""
        if isinstance(row, bool) or not isinstance(row, int):
            raise RequestError(400, "a cell number must be an integer")
        rows = self.check_cells([row])
        obs = {c: self.column_values(c, rows)[0] for c in self.columns}
        stored = api.CELL_TYPE in self.columns and api.CONFIDENCE in self.columns
        if stored:
            annotation = {k: obs.get(v) for k, v in _ANNOTATION.items()}
            annotation["source"] = "stored in the input"
        else:
            frame = api.annotate(self.subset(rows), self.model, **self._opts()).obs
            annotation = {k: (frame[v].iloc[0].item() if hasattr(frame[v].iloc[0], "item") else str(frame[v].iloc[0]))
                          for k, v in _ANNOTATION.items() if v in frame.columns}
            annotation["source"] = "computed now with scmm annotate"
        description = obs.get(api.DESCRIPTION) or None
        return {"index": int(row), "cell_id": self.cell_ids(rows)[0], "obs": obs, "annotation": annotation,
                "description": description, "can_describe": bool(self.model.has_stage2)}

    def selection(self, rows: np.ndarray) -> dict:
        """A summary of a selection: per categorical obs column the counts of its 10 commonest values, the
        means of numeric scmm columns."""
        summary: dict[str, Any] = {"n_cells": int(len(rows)), "columns": {}, "means": {}}
        for column in self.columns:
            if column == api.DESCRIPTION:
                continue
            with h5py.File(self.path, "r") as f:
                node = f["obs"][column]
                enc = node.attrs.get("encoding-type", "")
                numeric = isinstance(node, h5py.Dataset) and node.dtype.kind in "iuf"
            if enc == "categorical" or (isinstance(node, h5py.Dataset) and not numeric):
                counts = Counter(self.column_values(column, rows))
                summary["columns"][column] = [[k, v] for k, v in counts.most_common(10)]
            elif numeric and column.startswith(("scmm_",) + PROGRAM_PREFIXES):
                vals = np.asarray(self.column_values(column, rows), dtype=np.float64)
                summary["means"][column] = float(np.nanmean(vals)) if np.isfinite(vals).any() else None
        return summary

    def subset(self, rows: np.ndarray) -> ad.AnnData:
        """The cells ``rows`` (sorted) in memory: the model's input element as X, obs and var."""
        blocks = list(self.source.read_rows([(int(r), int(r) + 1) for r in rows]))
        x = sp.vstack(blocks).tocsr().astype(np.float32)
        obs = pd.DataFrame({c: self.column_values(c, rows) for c in self.columns if c != api.DESCRIPTION},
                           index=pd.Index(self.cell_ids(rows)))
        return ad.AnnData(X=x, obs=obs, var=self.source.var.copy())

    def _opts(self) -> dict:
        return {"input_scale": self.scale().scale, "layer": "X", "chunk_size": self.chunk_size,
                "batch_size": self.batch_size, "device": self.device}

    def _sample(self, rows: np.ndarray) -> np.ndarray:
        if len(rows) <= SAMPLE:
            return rows
        return rows[np.linspace(0, len(rows) - 1, SAMPLE).round().astype(int)]

    def _stage2(self) -> None:
        if not self.model.has_stage2:
            raise RequestError(409, "this model has no stage 2 (LLM): it cannot describe cells or answer questions")

    def describe(self, rows: np.ndarray) -> dict:
        """Descriptions of the cells (of a sample of 16 for a larger selection) generated now by stage 2."""
        self._stage2()
        sample = self._sample(rows)
        out = api.describe(self.subset(sample), self.model, **self._opts())
        texts = [str(t) for t in out.obs[api.DESCRIPTION]]
        return {"n_cells": int(len(rows)), "n_described": int(len(sample)),
                "descriptions": [{"index": int(r), "text": t} for r, t in zip(sample, texts)]}

    def ask(self, rows: np.ndarray, question: Any) -> dict:
        """The LLM's answer about the cells. A cell-type question: the calibrated, backed-off answer scored over
        the model's labels, with its confidence ("unknown" when it abstains); for a selection, the commonest
        answer over a sample of 16 cells and its share. Any other question: the LLM's generated text."""
        question = _text(question, "question")
        self._stage2()
        sample = self._sample(rows)
        if CELL_TYPE_QUESTION.search(question):
            obs = api.describe(self.subset(sample), self.model, cell_type=True, **self._opts()).obs
            names = [str(v) for v in obs[api.LLM_COLUMNS[api.CELL_TYPE]]]
            conf = obs[api.LLM_COLUMNS[api.CONFIDENCE]].to_numpy(dtype=np.float64)
            levels = obs[api.LLM_COLUMNS[api.LEVEL]].to_numpy()
            answer, count = Counter(names).most_common(1)[0]
            mine = np.array([n == answer for n in names])
            return {"kind": "cell_type", "question": question, "answer": answer,
                    "unknown": answer == api.UNKNOWN, "confidence": float(conf[mine].mean()),
                    "level": int(np.round(levels[mine].mean())), "share": count / len(names),
                    "n_asked": int(len(sample)), "n_cells": int(len(rows))}
        texts = self._generate(self.subset(sample), question)
        answer, count = Counter(texts).most_common(1)[0]
        return {"kind": "free", "question": question, "answer": answer, "share": count / len(texts),
                "n_asked": int(len(sample)), "n_cells": int(len(rows)),
                "answers": [{"index": int(r), "text": t} for r, t in zip(sample, texts)]}

    def _generate(self, adata: ad.AnnData, prompt: str) -> list[str]:
        """The stage-2 LLM's greedy answer to ``prompt`` for each cell of ``adata`` (in row order)."""
        model = self.model
        source = open_input(adata, "X")
        plan = plan_genes(source.var, model.vocab, model.panel_vocab_ids, None, 0.0, where="the selection")
        scale = detect_scale(source, self.scale().scale)
        stage2 = model.stage2.to(torch.device(self.device))
        out = [""] * adata.n_obs
        with torch.inference_mode():
            for rows, batch in iter_batches(source, plan, scale, model.encoding, model.vocab, self.chunk_size,
                                            self.batch_size):
                batch = {k: v.to(stage2.device) for k, v in batch.items()}
                for r, t in zip(rows, stage2.describe_cells(batch, prompt=prompt, max_new_tokens=48)):
                    out[int(r)] = str(t)
        return out

    # --- export -------------------------------------------------------------------------------------
    def export_csv(self, rows: np.ndarray) -> str:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["cell_id"])
        for start in range(0, len(rows), 100_000):
            for cid in self.cell_ids(rows[start:start + 100_000]):
                writer.writerow([cid])
        return buf.getvalue()

    def export_h5ad(self, rows: np.ndarray) -> Path:
        """The selected cells as an h5ad in a new temporary folder (the caller removes it once sent): X, layers,
        raw, obs, obsm and obsp read for those rows only (anndata's element reader and sparse datasets on the
        read-only file), var and uns whole."""
        if len(rows) > MAX_H5AD_EXPORT:
            raise RequestError(413, f"{len(rows)} cells: an h5ad export holds at most {MAX_H5AD_EXPORT} "
                                    "(export the cell IDs as CSV and subset with anndata)")
        with h5py.File(self.path, "r") as f:
            obs = pd.DataFrame({c: self._column_rows(f["obs"][c], rows) for c in self.columns},
                               index=pd.Index(self.cell_ids(rows)))
            adata = ad.AnnData(X=self._rows_of(f["X"], rows), obs=obs, var=ad.io.read_elem(f["var"]),
                               uns=ad.io.read_elem(f["uns"]) if "uns" in f else None)
            for key in f.get("layers", {}):
                adata.layers[key] = self._rows_of(f["layers"][key], rows)
            for key in f.get("obsm", {}):
                adata.obsm[key] = self._rows_of(f["obsm"][key], rows)
            for key in f.get("obsp", {}):
                adata.obsp[key] = sp.csr_matrix(self._rows_of(f["obsp"][key], rows))[:, rows]
            if "raw" in f and "X" in f["raw"]:
                adata.raw = ad.AnnData(X=self._rows_of(f["raw/X"], rows), obs=obs, var=ad.io.read_elem(f["raw/var"]))
        folder = Path(tempfile.mkdtemp(prefix="scmm-explore-export-"))
        out = folder / f"{self.path.stem}_selection.h5ad"
        adata.write_h5ad(out)
        return out

    def _rows_of(self, node: Any, rows: np.ndarray) -> Any:
        """Rows ``rows`` (sorted, unique) of a matrix element, read without the rest."""
        if isinstance(node, h5py.Group) and node.attrs.get("encoding-type") in ("csr_matrix", "csc_matrix"):
            return ad.io.sparse_dataset(node)[rows]
        if isinstance(node, h5py.Dataset):
            return node[rows]
        return ad.io.read_elem(node).iloc[rows]  # a data frame in obsm

    def _column_rows(self, node: Any, rows: np.ndarray) -> Any:
        """Rows ``rows`` of one obs column, its type kept (a categorical stays categorical)."""
        if node.attrs.get("encoding-type", "") == "categorical":
            categories = ad.io.read_elem(node["categories"])
            return pd.Categorical.from_codes(node["codes"][rows], categories=categories,
                                             ordered=bool(node.attrs.get("ordered", False)))
        if isinstance(node, h5py.Dataset) and node.dtype.kind in "OS":
            return np.asarray(node.asstr()[rows], dtype=object)
        if isinstance(node, h5py.Dataset):
            return node[rows]
        return np.asarray(ad.io.read_elem(node))[rows]  # nullable arrays and other encodings

_ANNOTATION = {"cell_type": api.CELL_TYPE, "cell_type_ontology_term_id": api.CELL_TYPE_ID,
               "confidence": api.CONFIDENCE, "level": api.LEVEL, "novelty": api.NOVELTY, "qc": api.QC}
