"""A FAISS reference index of scmm cell embeddings, for label transfer by k-NN vote.

    scmm index build REF.h5ad --model DIR --label-column COL --out INDEX
    scmm index query INDEX IN.h5ad --model DIR --out OUT.h5ad [--k 15] [--unknown-threshold X]

Index kind: embeddings are L2-normalised, so inner product = cosine similarity. Below
``scmm.eval.knn.FLAT_MAX_CELLS`` (200,000) reference cells the index is exact (``IndexFlatIP``: a query costs
N x D multiply-adds, ~26 MFLOP at 200k x 128, cheap enough); from there on it is an inverted-file index
(:func:`scmm.eval.knn.build_index`, which also puts it on a GPU when faiss can use one; it is moved to the CPU
to be written).

Folder written atomically (temporary folder beside it, renamed into place; an existing index is replaced
only with ``overwrite``)::

    index.json    format "scmm-index", format_version, model fingerprint, kind, n, dim, nlist/nprobe,
                  label column, classes [{key, cell_type_ontology_term_id, label, count}]
    index.faiss   the FAISS index (row i = i-th labelled reference cell)
    codes.npy     int32 class code of each indexed cell (into `classes`)

A query embeds the input with the same model (its fingerprint must equal the index's: another model's
embeddings live in another space) and takes the majority label of the ``k`` nearest reference cells
(ties: nearest tied neighbour, :func:`scmm.eval.knn.knn_vote`); ``scmm_confidence`` is the winner's vote share.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from scmm.atomic import write_folder
from scmm.data_pipeline.ontology import get_ontology
from scmm.data_pipeline.terms import CELL_TYPE, check_term, looks_like_term_id
from scmm.errors import ScmmError
from scmm.eval import knn
from scmm.model.pretrained import FORMATS, read_marker, write_marker

log = logging.getLogger("scmm.index")

INDEX_FORMAT = "scmm-index"  # name and version: scmm.model.pretrained.FORMATS
_MISSING = {"", "nan", "none", "na", "unknown"}


# --- labels -----------------------------------------------------------------------------------------
def reference_labels(values, column: str) -> tuple[np.ndarray, list[dict]]:
    """(code per cell, -1 when unlabelled; classes) from a label column of CL IDs or free text."""
    ontology = get_ontology()
    raw = np.asarray([str(v).strip() for v in values], dtype=object)
    missing = np.isin(np.char.lower(raw.astype(str)), list(_MISSING))
    uniq = sorted(set(raw[~missing].tolist()))
    classes, lookup = [], {}
    for value in uniq:
        if looks_like_term_id(value, ontology):  # an ontology ID: must be a known CL term
            term = check_term(value, CELL_TYPE, ontology, f"label column '{column}'")
            label = ontology.label(term)
        else:
            term, label = ontology.match_cell_type(value), value
        lookup[value] = len(classes)
        classes.append({"key": value, "cell_type_ontology_term_id": term or "", "label": label, "count": 0})
    codes = np.full(len(raw), -1, dtype=np.int32)
    for i, v in enumerate(raw):
        if not missing[i]:
            codes[i] = lookup[v]
    for c, n in zip(*np.unique(codes[codes >= 0], return_counts=True)):
        classes[int(c)]["count"] = int(n)
    return codes, classes


# --- the index folder -------------------------------------------------------------------------------
@dataclass
class ReferenceIndex:
    path: Path
    meta: dict
    index: object
    codes: np.ndarray

    @property
    def classes(self) -> list[dict]:
        return self.meta["classes"]

    @classmethod
    def load(cls, path: str | os.PathLike) -> ReferenceIndex:
        path = Path(path)
        if not path.is_dir():
            raise ScmmError(f"index not found: {path}")
        meta, _ = read_marker(path, INDEX_FORMAT)
        try:
            index = faiss.read_index(str(path / "index.faiss"))
            codes = np.load(path / "codes.npy")
        except Exception as exc:
            raise ScmmError(f"index {path} is corrupted ({type(exc).__name__}: {exc})") from None
        if index.ntotal != len(codes) or index.ntotal != meta.get("n"):
            raise ScmmError(f"index {path} is corrupted ({index.ntotal} vectors, {len(codes)} labels)")
        index = knn.to_gpu(index)
        if "nprobe" in meta:
            knn.set_nprobe(index, meta["nprobe"])
        return cls(path, meta, index, codes)

    def check_model(self, fingerprint: str) -> None:
        if self.meta.get("model_fingerprint") != fingerprint:
            raise ScmmError(f"index {self.path} was built with another model (fingerprint "
                            f"{str(self.meta.get('model_fingerprint'))[:12]}…, this model {fingerprint[:12]}…); "
                            f"rebuild the index with this model or query with the index's model")

    def vote(self, emb: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(class code per query, -1 if none; vote share) by majority of the k nearest reference cells."""
        if k < 1:
            raise ScmmError("--k must be at least 1")
        k = min(k, len(self.codes))
        _, ids = knn.knn_search(self.index, emb, k)
        neighbour = np.where(ids >= 0, self.codes[np.maximum(ids, 0)], -1).astype(np.int64)
        return knn.knn_vote(neighbour)


def write_index(out: str | os.PathLike, emb: np.ndarray, codes: np.ndarray, classes: list[dict],
                fingerprint: str, label_column: str, overwrite: bool = False, extra: dict | None = None) -> Path:
    """Write the index folder of the labelled rows of ``emb`` (codes >= 0) atomically."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise ScmmError(f"output {out} already exists (pass --overwrite to replace it)")
    keep = codes >= 0
    if not keep.any():
        raise ScmmError(f"no reference cell has a label in column '{label_column}'")
    x, kept_codes = emb[keep], codes[keep].astype(np.int32)
    t0 = time.perf_counter()
    index = knn.build_index(x, "ip", approximate_above=knn.FLAT_MAX_CELLS)
    desc = knn.index_kind(index)
    meta = {"model_fingerprint": fingerprint,
            "n": int(len(x)), "dim": int(x.shape[1]), "metric": "inner_product", **desc,
            "label_column": label_column, "classes": classes,
            "n_unlabelled_skipped": int((~keep).sum()),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **(extra or {})}

    def write(tmp: Path) -> None:
        faiss.write_index(knn.to_cpu(index), str(tmp / "index.faiss"))
        np.save(tmp / "codes.npy", kept_codes)
        write_marker(tmp, INDEX_FORMAT, meta)

    write_folder(out, write, marker=FORMATS[INDEX_FORMAT].marker)
    log.info("wrote index %s: %d cells, %d classes, %s (%.1f s)", out, len(x), len(classes), desc["kind"],
             time.perf_counter() - t0)
    return out
