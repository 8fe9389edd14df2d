"""The corpus store: a zarr v3 group of CSR shards, obs columns and texts, plus a manifest.

Layout of a corpus folder::

    manifest.json            schema version, vocab hash, counts, splits, cell types, per-array checksums
    vocab.json               the gene vocabulary the corpus was built against
    zarr.json                root group
    genes/vocab_id           int32 [n_genes]  vocabulary id of each panel gene
    genes/symbol             str   [n_genes]
    shards/<split>-<k>/      one group per shard, cells of a single split
        indptr int64 [n+1], indices int32 (panel gene index), data float32
        cell_id, text, and the obs columns in OBS_COLUMNS (str [n])
        program_scores float32 [n * P], markers int32 [n * K]   per-cell facts, row-major (when built with facts)
    facts/                   gene_mean, gene_sd, gene_detected (float64 [n_genes]), program_mean, program_sd,
                             program_indptr, program_genes: how the facts were computed (manifest "facts")

`manifest.json` is written last and the folder is renamed into place only when complete, so a
folder without a manifest (or with `complete` false) never opens as a corpus.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import zarr

from scmm.errors import ScmmError

SCHEMA_VERSION = 2
OBS_COLUMNS = ("cell_type_ontology_term_id", "cell_type", "tissue_ontology_term_id", "tissue",
               "disease_ontology_term_id", "disease", "donor_id", "dataset_id")
NUMERIC_ARRAYS = ("indptr", "indices", "data")


def column_checksum(name: str, values: np.ndarray) -> str:
    """sha256 of one shard array (numbers as little-endian bytes, strings as UTF-8 joined by \\x1f)."""
    h = hashlib.sha256(name.encode())
    a = np.asarray(values)
    if a.dtype.kind in "iuf":
        h.update(np.ascontiguousarray(a.astype(a.dtype.newbyteorder("<"), copy=False)).tobytes())
    else:
        h.update("\x1f".join(map(str, a.tolist())).encode())
    return h.hexdigest()


def shard_checksums(arrays: dict[str, np.ndarray]) -> dict[str, str]:
    """Per-array checksums of a shard, so that a read of some columns verifies just those."""
    return {name: column_checksum(name, arrays[name]) for name in sorted(arrays)}


def label_keys(term_ids, labels) -> list[str]:
    """The corpus's key of each cell's type: its CL ID, or `unmatched:<label>` for kept free-text labels."""
    return [t if t else f"unmatched:{label}" for t, label in zip(term_ids, labels)]


@dataclass
class Shard:
    """One shard in memory: CSR expression over the corpus gene panel, plus per-cell strings."""

    name: str
    matrix: sp.csr_matrix
    obs: dict[str, np.ndarray]  # cell_id, text and OBS_COLUMNS

    @property
    def n_cells(self) -> int:
        return self.matrix.shape[0]


class Corpus:
    """Read access to a built corpus; every read of a shard is checked against its checksum."""

    def __init__(self, path: str | Path, verify: bool = True):
        self.path = Path(path)
        self.verify = verify
        manifest = self.path / "manifest.json"
        if not self.path.is_dir():
            raise ScmmError(f"corpus not found: {self.path}")
        if not manifest.is_file():
            raise ScmmError(f"{self.path} is not a complete scmm corpus (no manifest.json; an interrupted build?)")
        try:
            self.manifest = json.loads(manifest.read_text())
        except json.JSONDecodeError as exc:
            raise ScmmError(f"corpus manifest {manifest} is corrupted: {exc}") from None
        if not self.manifest.get("complete"):
            raise ScmmError(f"{self.path} is not a complete scmm corpus")
        if self.manifest.get("schema_version") != SCHEMA_VERSION:
            raise ScmmError(f"corpus {self.path} has schema version {self.manifest.get('schema_version')}, "
                            f"this scmm reads version {SCHEMA_VERSION}; rebuild it with `scmm data build`")
        self._root = zarr.open_group(str(self.path), mode="r", zarr_format=3)

    # --- metadata ---------------------------------------------------------------------------------
    @property
    def n_cells(self) -> int:
        return int(self.manifest["n_cells"])

    @property
    def n_genes(self) -> int:
        return int(self.manifest["n_genes"])

    @cached_property
    def gene_vocab_ids(self) -> np.ndarray:
        return np.asarray(self._root["genes/vocab_id"][:], dtype=np.int64)

    @cached_property
    def gene_symbols(self) -> np.ndarray:
        return np.asarray(self._root["genes/symbol"][:]).astype(object)

    @cached_property
    def cell_types(self) -> list[str]:
        """Sorted CL IDs of the corpus: the label index used by the loader and the losses."""
        return sorted(self.manifest["cell_types"])

    @cached_property
    def holdout_types(self) -> list[str]:
        """CL IDs held out of train and val when the corpus was built (their cells are all in test); [] for a
        corpus built without ``--holdout-types`` or before the option existed."""
        return sorted(self.manifest.get("holdout_types") or [])

    def shards(self, split: str | None = None) -> list[dict]:
        """Manifest entries of the shards, in build order, optionally of one split."""
        entries = self.manifest["shards"]
        if split is not None:
            if split not in self.manifest["splits"]:
                raise ScmmError(f"unknown split '{split}' (corpus has {', '.join(self.manifest['splits'])})")
            entries = [s for s in entries if s["split"] == split]
        return entries

    def shard_entry(self, name: str) -> dict:
        for s in self.manifest["shards"]:
            if s["name"] == name:
                return s
        raise ScmmError(f"corpus {self.path} has no shard '{name}'")

    # --- data -------------------------------------------------------------------------------------
    def read_shard(self, name: str, columns: tuple[str, ...] | None = None) -> Shard:
        """Load one shard (the expression and `columns`, default all); what is read is checked against its
        checksums, and a shard that fails to decode or to match is an error naming it."""
        entry = self.shard_entry(name)
        want = tuple(entry["columns"]) if columns is None else tuple(columns)
        try:
            group = self._root[f"shards/{name}"]
            arrays = {key: group[key][:] for key in NUMERIC_ARRAYS + want}
        except Exception as exc:  # zarr/codec errors on damaged chunk files
            raise ScmmError(f"corpus shard '{name}' in {self.path} is corrupted "
                            f"({type(exc).__name__}: {exc})") from None
        if self.verify:
            for key, value in arrays.items():
                if column_checksum(key, value) != entry["checksums"][key]:
                    raise ScmmError(f"corpus shard '{name}' in {self.path} is corrupted (checksum mismatch in '{key}')")
        n = entry["n_cells"]
        try:
            matrix = sp.csr_matrix((arrays["data"], arrays["indices"], arrays["indptr"]), shape=(n, self.n_genes))
        except ValueError as exc:
            raise ScmmError(f"corpus shard '{name}' in {self.path} is corrupted ({exc})") from None
        obs = {k: np.asarray(arrays[k]).astype(object) for k in want}
        return Shard(name=name, matrix=matrix, obs=obs)

    def cell_lengths(self, name: str) -> np.ndarray:
        """Stored (expressed) genes per cell of one shard, from its ``indptr`` alone (checked against its checksum)."""
        entry = self.shard_entry(name)
        try:
            indptr = self._root[f"shards/{name}/indptr"][:]
        except Exception as exc:  # zarr/codec errors on damaged chunk files
            raise ScmmError(f"corpus shard '{name}' in {self.path} is corrupted "
                            f"({type(exc).__name__}: {exc})") from None
        if self.verify and column_checksum("indptr", indptr) != entry["checksums"]["indptr"]:
            raise ScmmError(f"corpus shard '{name}' in {self.path} is corrupted (checksum mismatch in 'indptr')")
        return np.diff(indptr)

    # --- per-cell facts (scmm.data_pipeline.facts) ---------------------------------------------------------------
    @property
    def facts(self) -> dict | None:
        """The manifest's ``facts`` entry (programs, markers, sources), or None for a corpus built without facts
        (``--no-facts``, or before they existed)."""
        return self.manifest.get("facts") or None

    def _read_checked(self, path: str, key: str, expected: str | None) -> np.ndarray:
        try:
            value = self._root[path][:]
        except Exception as exc:  # zarr/codec errors on damaged chunk files
            raise ScmmError(f"corpus array '{path}' in {self.path} is corrupted "
                            f"({type(exc).__name__}: {exc})") from None
        if self.verify and (expected is None or column_checksum(key, value) != expected):
            raise ScmmError(f"corpus array '{path}' in {self.path} is corrupted (checksum mismatch)")
        return np.asarray(value)

    def fact_arrays(self) -> dict[str, np.ndarray]:
        """The corpus-level fact arrays (``facts/``: gene mean/sd/detected share, program standardisation and
        gene lists), checked against their checksums."""
        facts = self.facts
        if facts is None:
            raise ScmmError(f"corpus {self.path} has no per-cell facts (rebuild it with `scmm data build`)")
        return {key: self._read_checked(f"facts/{key}", key, digest) for key, digest in facts["checksums"].items()}

    def read_facts(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(program scores [n, P] float32, marker panel indices [n, K] int32 with -1 padding) of one shard."""
        facts = self.facts
        if facts is None:
            raise ScmmError(f"corpus {self.path} has no per-cell facts (rebuild it with `scmm data build`)")
        entry = self.shard_entry(name)
        n, p, k = entry["n_cells"], len(facts["programs"]["names"]), int(facts["markers"]["n_stored"])
        scores = self._read_checked(f"shards/{name}/program_scores", "program_scores",
                                    entry["checksums"].get("program_scores"))
        markers = self._read_checked(f"shards/{name}/markers", "markers", entry["checksums"].get("markers"))
        if scores.size != n * p or markers.size != n * k:
            raise ScmmError(f"corpus shard '{name}' in {self.path} is corrupted (fact arrays of the wrong size)")
        return scores.reshape(n, p), markers.reshape(n, k)

    def iter_shards(self, split: str | None = None, columns: tuple[str, ...] | None = None):
        for entry in self.shards(split):
            yield self.read_shard(entry["name"], columns)
