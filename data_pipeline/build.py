"""h5ad -> ontology-grounded, sharded zarr cell–text corpus.

Two passes over each input: the first reads obs and var (labels, ontology checks, gene mapping, splits) and
decides the scale of the values from a bounded sample of cells (:mod:`scmm.data_pipeline.scale`: counts,
linear-normalised, log1p or log2(x+1); ``input_scale`` overrides); the second streams the expression matrix in
row chunks, validates it, converts it to linear values (logs undone), remaps genes onto the corpus gene panel
and routes each cell into a shard of its split. The manifest's ``"normalization"`` says what the stored values
are: ``"counts"`` when every input was raw counts, else ``"normalized"`` (linear values, renormalised per cell by
the encoding like counts); each file's report holds its ``input_scale`` decision with the evidence. The corpus is
written into a temporary folder beside the destination and renamed into place only when complete.

Per-cell facts (``facts``, default on; :mod:`scmm.data_pipeline.facts`): before the shards are written, two
statistics passes stream the training cells in the same chunks (gene moments of log1p CP10k, then the raw
hallmark-program score moments), summed in chunk order so that ``--jobs`` does not change them; pass 2 then scores
every cell's programs and marker genes chunk by chunk, stores them with its shard (``program_scores``,
``markers``), writes the statistics to ``facts/`` and the manifest's ``facts`` entry, and adds the cell-specific
sentence to each caption (:mod:`scmm.data_pipeline.fact_text`). Memory stays bounded by the chunk and the shard.
"""
from __future__ import annotations

import json
import logging
import multiprocessing
import shutil
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
import zarr
from pandas.api.types import union_categoricals
from tqdm.auto import tqdm

from scmm.atomic import publish_dir, temp_dir_beside
from scmm.data_pipeline.fact_text import N_CAPTION_MARKERS, N_CAPTION_PROGRAMS, fact_sentence, fact_template_index
from scmm.data_pipeline.facts import FactModel, GeneStats, ProgramMoments, gene_names
from scmm.data_pipeline.h5ad import H5adSource, open_h5ad
from scmm.data_pipeline.ontology import Ontology, get_ontology
from scmm.data_pipeline.scale import ScaleDecision, check_scale_option, detect_scale, to_linear
from scmm.data_pipeline.soma import open_soma
from scmm.data_pipeline.splits import SPLITS, SplitPlan, plan_splits
from scmm.data_pipeline.store import OBS_COLUMNS, SCHEMA_VERSION, label_keys, shard_checksums
from scmm.data_pipeline.terms import CELL_TYPE, DISEASE, TISSUE, TermKind, check_term, check_terms, looks_like_term_id
from scmm.data_pipeline.text import describe, metadata_from_obs
from scmm.data_pipeline.vocab import GeneMapping, GeneVocab, check_coverage, map_genes
from scmm.errors import ScmmError

log = logging.getLogger(__name__)
_MISSING = {"", "nan", "none", "na", "unknown"}
# columns carried into the text when present (CELLxGENE schema), besides the ones in OBS_COLUMNS
_TEXT_EXTRAS = ("sex", "sex_ontology_term_id", "development_stage", "development_stage_ontology_term_id",
                "assay", "assay_ontology_term_id", "organism")


@dataclass
class BuildConfig:
    """Options of `scmm data build`; the defaults read a CELLxGENE-schema file."""

    inputs: list[Path]  # h5ad files; empty with `soma`
    out: Path
    soma: str | None = None  # a TileDB-SOMA experiment URI read instead of files (--soma)
    obs_filter: str | None = None  # SOMA value filter on obs (--obs-filter)
    var_filter: str | None = None  # SOMA value filter on var (--var-filter)
    measurement: str = "RNA"  # the SOMA measurement
    cell_type_column: str | None = None  # default: cell_type_ontology_term_id
    tissue_column: str | None = None  # default: tissue_ontology_term_id when present
    disease_column: str | None = None  # default: disease_ontology_term_id when present
    donor_column: str = "donor_id"
    dataset_column: str = "dataset_id"
    gene_column: str | None = None
    layer: str | None = None  # "X", "raw" or a layer name; default prefers raw counts
    input_scale: str = "auto"  # auto (detected per file) or counts | normalized | log1p | log2p1 (every file)
    vocab: str | None = None  # vocab.json or checkpoint folder; default scGPT census vocab
    min_gene_coverage: float = 0.5
    label_map: dict[str, str] = field(default_factory=dict)  # free-text label -> CL ID
    unmatched_labels: str = "error"  # error | drop | keep
    shard_size: int = 10_000
    chunk_size: int = 10_000
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    holdout_types: tuple[str, ...] = ()  # CL IDs kept out of train and val (all their cells go to test)
    seed: int = 0
    jobs: int = 1  # worker processes encoding chunks (the corpus is the same for every value)
    facts: bool = True  # per-cell program activity and marker genes (scmm.data_pipeline.facts) and captions naming them
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if self.unmatched_labels not in ("error", "drop", "keep"):
            raise ScmmError(f"--unmatched-labels must be error, drop or keep, not '{self.unmatched_labels}'")
        if self.jobs < 1:
            raise ScmmError("--jobs must be at least 1")
        if self.shard_size < 1 or self.chunk_size < 1:
            raise ScmmError("--shard-size and --chunk-size must be positive")
        if not 0.0 <= self.min_gene_coverage <= 1.0:
            raise ScmmError("--min-gene-coverage must be between 0 and 1")
        self.input_scale = check_scale_option(self.input_scale)
        if self.soma is None and (self.obs_filter or self.var_filter):
            raise ScmmError("--obs-filter and --var-filter apply to --soma input only")
        if self.soma is not None and self.inputs:
            raise ScmmError("give h5ad files or --soma URI, not both")


def _clean(values: pd.Series) -> np.ndarray:
    out = values.astype(str).str.strip().to_numpy(dtype=object)
    out[np.isin(np.char.lower(out.astype(str)), list(_MISSING))] = ""
    return out


# --- compact obs: every per-cell column a categorical (codes plus a few distinct strings) ------------------------
def _small_int(n: int) -> type:
    """The smallest signed integer type that holds 0..n."""
    return next(t for t in (np.int8, np.int16, np.int32, np.int64) if n <= np.iinfo(t).max)


def _recode(cat: pd.Categorical, values: np.ndarray) -> pd.Categorical:
    """``cat`` with category i replaced by ``values[i]`` (equal results merged; categories sorted)."""
    names, inverse = np.unique(np.asarray(values, dtype=object).astype(str), return_inverse=True)
    inverse = inverse.astype(_small_int(len(names)))  # per-cell codes in the small type: no int64 per cell
    return pd.Categorical.from_codes(inverse[cat.codes], categories=pd.Index(names.astype(object)))


def _constant(value: str, n: int) -> pd.Categorical:
    return pd.Categorical.from_codes(np.zeros(n, dtype=np.int8), categories=pd.Index([value], dtype=object))


def _clean_column(series: pd.Series) -> pd.Categorical:
    """A column as a categorical of cleaned strings (missing and placeholder values ''), computed on its distinct
    values: the same strings as ``_clean`` of the column, without a string per cell."""
    cat = series.array if isinstance(series.dtype, pd.CategoricalDtype) else pd.Categorical(series)
    cats = _clean(pd.Series(np.asarray(cat.categories, dtype=object), dtype=object)) if len(cat.categories) \
        else np.empty(0, dtype=object)
    codes = np.asarray(cat.codes)
    if (codes < 0).any():  # NaN: '' like _clean of 'nan'
        codes = codes.astype(_small_int(len(cats)))
        codes[codes < 0] = len(cats)
        cats = np.append(cats, "")
    return _recode(pd.Categorical.from_codes(codes, categories=pd.RangeIndex(len(cats))), cats)


def _present(cat: pd.Categorical) -> np.ndarray:
    """Per category: some cell has it."""
    used = np.zeros(len(cat.categories), dtype=bool)
    used[np.unique(cat.codes)] = True
    return used


def _combine(a: pd.Categorical, b: pd.Categorical, fn) -> pd.Categorical:
    """Per cell ``fn(a, b)``, evaluated once per distinct (a, b) pair (found with a table over the pairs, so the
    per-cell arrays are small integers)."""
    nb = len(b.categories)
    dtype = _small_int(len(a.categories) * nb)
    pair = a.codes.astype(dtype) * dtype(nb) + b.codes.astype(dtype)
    if len(a.categories) * nb <= 1 << 24:
        present = np.zeros(len(a.categories) * nb, dtype=bool)
        present[pair] = True
        pairs = np.flatnonzero(present)
        table = np.zeros(len(present), dtype=_small_int(len(pairs)))
        table[pairs] = np.arange(len(pairs))
        inverse = table[pair]
    else:
        pairs, inverse = np.unique(pair, return_inverse=True)
    del pair
    ca, cb = np.asarray(a.categories, dtype=object), np.asarray(b.categories, dtype=object)
    values = np.array([fn(ca[p // len(cb)], cb[p % len(cb)]) for p in pairs], dtype=object)
    return _recode(pd.Categorical.from_codes(inverse, categories=pd.RangeIndex(len(pairs))), values)


def _pick_column(columns: list[str], path: Path, given: str | None, default: str, option: str,
                 required: bool) -> str | None:
    if given is not None:
        if given not in columns:
            raise ScmmError(f"{path}: obs column '{given}' (from {option}) not found; columns: "
                            f"{', '.join(map(str, columns))}")
        return given
    if default in columns:
        return default
    if required:
        raise ScmmError(f"{path}: obs column '{default}' not found; name the cell-type column with {option} "
                        f"(columns: {', '.join(map(str, columns))})")
    return None


def _label_or_term(values: np.ndarray, ontology: Ontology, kind: TermKind, column: str,
                   path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A tissue/disease column holds ontology IDs or free text. An ID (each part of ``A || B``) must be a known term
    of the kind's ontology (:func:`check_term`) and is labelled by the ontology; free text is kept as the label."""
    ids = np.full(len(values), "", dtype=object)
    labels = values.copy()
    for i, value in enumerate(values):
        parts = [p.strip() for p in value.split("||")]
        if any(looks_like_term_id(p, ontology) for p in parts):
            terms = [check_term(p, kind, ontology, f"{path}: obs column '{column}'") for p in parts]
            ids[i] = " || ".join(terms)
            labels[i] = " || ".join(ontology.label(t) for t in terms)
    return ids, labels


def _cell_types(source: H5adSource, cfg: BuildConfig,
                ontology: Ontology) -> tuple[pd.Categorical, pd.Categorical, np.ndarray]:
    """Per cell: CL ID ('' when kept unmatched), label, keep mask."""
    column = _pick_column(source.obs_columns, source.path, cfg.cell_type_column, "cell_type_ontology_term_id",
                          "--cell-type-column", required=True)
    raw = _clean_column(source.obs_column(column))
    cats = np.asarray(raw.categories, dtype=object)
    ids = np.full(len(cats), "", dtype=object)
    labels = cats.copy()
    keep = (cats != "") & _present(raw)  # per category
    for i in np.flatnonzero(keep):
        value = cats[i]
        if looks_like_term_id(value, ontology):  # an ID must be a CL term, whatever --unmatched-labels says
            term = check_term(value, CELL_TYPE, ontology, f"{source.path}: obs column '{column}'")
        else:  # free text: the label map first (its IDs checked when the build starts), then the CL labels
            term = cfg.label_map.get(value) or ontology.match_cell_type(value)
        if term is not None:  # the corpus labels a term as the ontology does, whatever the source called it
            ids[i], labels[i] = term, ontology.label(term)
    unmatched = sorted(set(cats[keep & (ids == "")]))
    if unmatched:
        shown = ", ".join(f"'{u}'" for u in unmatched[:8]) + (" ..." if len(unmatched) > 8 else "")
        if cfg.unmatched_labels == "error":
            raise ScmmError(f"{source.path}: {len(unmatched)} cell-type label(s) in obs column '{column}' match no "
                            f"Cell Ontology term: {shown}; map them with --label-map FILE (label -> CL ID) or "
                            f"pass --unmatched-labels drop|keep")
        log.warning("%s: %d label(s) match no Cell Ontology term (%s): %s", source.path, len(unmatched),
                    cfg.unmatched_labels, shown)
        if cfg.unmatched_labels == "drop":
            keep &= ids != ""
    return _recode(raw, ids), _recode(raw, labels), keep[raw.codes]


def _standard_obs(source: H5adSource, cfg: BuildConfig, ontology: Ontology) -> tuple[pd.DataFrame, np.ndarray]:
    """The corpus obs columns of one file (CELLxGENE names) as categoricals, plus the mask of cells to keep."""
    columns = source.obs_columns
    ct_id, ct_label, keep = _cell_types(source, cfg, ontology)
    out: dict[str, pd.Categorical] = {"cell_type_ontology_term_id": ct_id, "cell_type": ct_label}
    n = source.n_obs
    for kind, given, term_kind in (("tissue", cfg.tissue_column, TISSUE), ("disease", cfg.disease_column, DISEASE)):
        column = _pick_column(columns, source.path, given, f"{kind}_ontology_term_id", f"--{kind}-column", False)
        if column is None:
            out[f"{kind}_ontology_term_id"], out[kind] = _constant("", n), _constant("", n)
            continue
        raw = _clean_column(source.obs_column(column))
        used = _present(raw)
        cats = np.asarray(raw.categories, dtype=object)
        ids, labels = np.full(len(cats), "", dtype=object), cats.copy()
        ids[used], labels[used] = _label_or_term(cats[used], ontology, term_kind, column, source.path)
        ids_cat, labels_cat = _recode(raw, ids), _recode(raw, labels)
        if column == f"{kind}_ontology_term_id" and kind in columns:  # keep the file's own labels
            own = _clean_column(source.obs_column(kind))
            labels_cat = _combine(own, labels_cat, lambda o, lab: o if o != "" else lab)
        out[f"{kind}_ontology_term_id"], out[kind] = ids_cat, labels_cat
    donor = _pick_column(columns, source.path, None, cfg.donor_column, "--donor-column", False)
    out["donor_id"] = _clean_column(source.obs_column(donor)) if donor else _constant("", n)
    dataset = _pick_column(columns, source.path, None, cfg.dataset_column, "--dataset-column", False)
    out["dataset_id"] = _clean_column(source.obs_column(dataset)) if dataset else _constant(source.path.stem, n)
    for extra in _TEXT_EXTRAS:
        if extra in columns:
            out[extra] = _clean_column(source.obs_column(extra))
    return pd.DataFrame(out), keep


def _describe_rows(frame: pd.DataFrame, ontology: Ontology, facts: list[str] | None = None) -> list[str]:
    texts = []
    for i, (cell_id, row) in enumerate(zip(frame.index, frame.to_dict("records"))):
        row = {k: v for k, v in row.items() if v != ""}
        texts.append(describe(metadata_from_obs(row, ontology), cell_id, ontology, facts[i] if facts else None))
    return texts


class _ShardWriter:
    """Buffers cells per split and writes a zarr group each time a split's buffer fills a shard."""

    def __init__(self, root: zarr.Group, shard_size: int, columns: tuple[str, ...]):
        self.root, self.shard_size, self.columns = root, shard_size, columns
        self.buffers: dict[str, list[tuple[sp.csr_matrix, pd.DataFrame]]] = {s: [] for s in SPLITS}
        self.sizes = {s: 0 for s in SPLITS}
        self.next_index = {s: 0 for s in SPLITS}
        self.entries: list[dict] = []
        self.cell_types: dict[str, dict] = {}  # corpus label key -> label, count, count per split

    def add(self, split: str, matrix: sp.csr_matrix, obs: pd.DataFrame,
            facts: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        self.buffers[split].append((matrix, obs, facts))
        self.sizes[split] += matrix.shape[0]
        while self.sizes[split] >= self.shard_size:
            self._flush(split, self.shard_size)

    def close(self) -> None:
        for split in SPLITS:
            if self.sizes[split]:
                self._flush(split, self.sizes[split])

    def _flush(self, split: str, n: int) -> None:
        matrix = sp.vstack([m for m, _, _ in self.buffers[split]], format="csr")
        obs = pd.concat([o for _, o, _ in self.buffers[split]])
        with_facts = self.buffers[split][0][2] is not None
        scores = np.concatenate([f[0] for _, _, f in self.buffers[split]]) if with_facts else None
        markers = np.concatenate([f[1] for _, _, f in self.buffers[split]]) if with_facts else None
        head_m, head_o = matrix[:n], obs.iloc[:n]
        rest_m, rest_o = matrix[n:], obs.iloc[n:]
        rest_f = (scores[n:], markers[n:]) if with_facts else None
        self.buffers[split] = [(rest_m, rest_o, rest_f)] if rest_m.shape[0] else []
        self.sizes[split] = rest_m.shape[0]
        name = f"{split}-{self.next_index[split]:05d}"
        self.next_index[split] += 1
        arrays: dict[str, np.ndarray] = {
            "indptr": head_m.indptr.astype(np.int64), "indices": head_m.indices.astype(np.int32),
            "data": head_m.data.astype(np.float32), "cell_id": head_o.index.to_numpy().astype(str)}
        for column in self.columns:
            if column != "cell_id":
                arrays[column] = head_o[column].to_numpy().astype(str)
        if with_facts:  # [n, P] and [n, N_MARKERS], stored flat (row-major); not in "columns" (numbers)
            arrays["program_scores"] = np.ascontiguousarray(scores[:n], dtype=np.float32).ravel()
            arrays["markers"] = np.ascontiguousarray(markers[:n], dtype=np.int32).ravel()
        group = self.root.create_group(f"shards/{name}")
        for key, value in arrays.items():
            write_array(group, key, value)
        keys = label_keys(head_o["cell_type_ontology_term_id"], head_o["cell_type"])
        for key, label in zip(keys, head_o["cell_type"]):
            rec = self.cell_types.setdefault(key, {"label": label, "count": 0, "splits": {s: 0 for s in SPLITS}})
            rec["count"] += 1
            rec["splits"][split] += 1
        self.entries.append({"name": name, "split": split, "n_cells": int(n), "nnz": int(head_m.nnz),
                             "columns": list(self.columns), "checksums": shard_checksums(arrays)})


def write_array(group: zarr.Group, key: str, value: np.ndarray) -> None:
    """Write one 1-D array (numbers or strings) as a zarr array of at most 4M-element chunks."""
    chunks = (max(1, min(len(value), 1 << 22)),)
    if value.dtype.kind in "iuf":
        group.create_array(key, data=value, chunks=chunks)
    else:
        group.create_array(key, shape=value.shape, dtype=str, chunks=chunks)[:] = value


@dataclass
class _Plan:
    """Pass-1 result: the opened inputs, their gene mappings, the corpus obs and where each cell goes.

    Held per cell until the end of the build (nothing else is): one categorical code per obs column of
    ``obs`` (int8 for up to 127 distinct values, int16 up to 32,767: the 8 corpus columns, the text extras
    present, ``source_file``), ``keep`` (1 byte) and the split (1 byte): about 20 bytes per cell for a
    CELLxGENE-schema input (540 MB at 27 million cells). Cell IDs and texts are never gathered: the IDs are read
    again from the input chunk by chunk, the texts made per chunk and written with their shard."""

    sources: list[H5adSource]
    mappings: list[GeneMapping]
    scales: list[ScaleDecision]  # per input: what its values are
    obs: pd.DataFrame  # corpus obs columns of all files, in input order, as categoricals (no cell IDs)
    keep: np.ndarray  # per cell: False when dropped for its label
    splits: SplitPlan
    panel_ids: np.ndarray  # sorted vocabulary IDs of the corpus gene panel
    columns: tuple[str, ...]  # shard columns
    qualify_ids: bool = False  # the same cell ID in two inputs: IDs are written as "<file name>:<ID>"


def _open_inputs(cfg: BuildConfig) -> Iterator[H5adSource]:
    """The inputs: each h5ad file (obs left on disk), or the cells and genes the SOMA query selects."""
    if cfg.soma is not None:
        yield open_soma(cfg.soma, cfg.obs_filter, cfg.var_filter, cfg.layer, cfg.measurement)
        return
    for path in cfg.inputs:
        yield open_h5ad(path, cfg.layer, read_obs=False)


def _read_metadata(source: H5adSource, cfg: BuildConfig, vocab: GeneVocab,
                   ontology: Ontology) -> tuple[H5adSource, GeneMapping, pd.DataFrame, np.ndarray, ScaleDecision]:
    """Check the genes and obs of one opened input and decide its values' scale; return (source, gene mapping,
    corpus obs, keep mask, scale)."""
    path = source.path
    mapping = map_genes(source.var, vocab, cfg.gene_column)
    dup = pd.Index(mapping.names).duplicated()
    if dup.any():
        raise ScmmError(f"{path}: duplicated gene names in var column '{mapping.column}': "
                        f"{', '.join(sorted(set(mapping.names[dup]))[:5])}")
    # two identifiers that reach one vocabulary id (e.g. case variants): keep the first only
    seen = pd.Index(mapping.gene_ids).duplicated() & (mapping.gene_ids >= 0)
    mapping.gene_ids[seen] = -1
    check_coverage(mapping, cfg.min_gene_coverage)
    if mapping.id_table is not None:
        log.info("%s: %d genes given as Ensembl IDs mapped through %s %s (%s)", path, mapping.via_table,
                 mapping.id_table["package"], mapping.id_table["version"], mapping.id_table["file"])
    frame, keep = _standard_obs(source, cfg, ontology)
    frame["source_file"] = _constant(source.path.name, source.n_obs)
    scale = detect_scale(source, cfg.input_scale)
    log.info("%s: %s", path, scale.describe())
    return source, mapping, frame, keep, scale


_ID_CHUNK = 1 << 16  # cell IDs read (as Python strings) at a time


def _id_hashes(source: H5adSource) -> np.ndarray:
    """64-bit hashes of the cell IDs of one input, in row order, read in chunks (8 bytes per cell)."""
    out = np.empty(source.n_obs, dtype=np.uint64)
    for a in range(0, source.n_obs, _ID_CHUNK):
        b = min(a + _ID_CHUNK, source.n_obs)
        out[a:b] = pd.util.hash_array(source.obs_names(a, b))
    return out


def _ids_with_hash(source: H5adSource, wanted: np.ndarray) -> list[str]:
    """The cell IDs of one input whose hash is in ``wanted`` (read again, chunk by chunk)."""
    found = []
    for a in range(0, source.n_obs, _ID_CHUNK):
        names = source.obs_names(a, min(a + _ID_CHUNK, source.n_obs))
        found.extend(names[np.isin(pd.util.hash_array(names), wanted)])
    return found


def _sorted_ids(source: H5adSource) -> np.ndarray:
    """Sorted hashes of one input's cell IDs; a cell ID twice in the input is an error (IDs compared where the
    hashes meet)."""
    h = _id_hashes(source)
    h.sort()
    same = h[1:] == h[:-1]
    if same.any():
        ids = pd.Index(_ids_with_hash(source, np.unique(h[1:][same])))
        if ids.duplicated().any():
            raise ScmmError(f"{source.path}: duplicated cell IDs (obs names), e.g. '{ids[ids.duplicated()][0]}'")
    return h


def _shared_ids(sources: list[H5adSource], hashes: list[np.ndarray]) -> bool:
    """Some cell ID is in two inputs (hashes from :func:`_sorted_ids`; IDs compared where the hashes meet)."""
    for i in range(len(sources)):
        for j in range(i + 1, len(sources)):
            a, b = hashes[i], hashes[j]
            shared = []
            for k in range(0, len(b), _ID_CHUNK):
                part = b[k:k + _ID_CHUNK]
                idx = np.minimum(np.searchsorted(a, part), len(a) - 1)
                shared.append(part[a[idx] == part])
            shared = np.unique(np.concatenate(shared))
            if shared.size and set(_ids_with_hash(sources[i], shared)) & set(_ids_with_hash(sources[j], shared)):
                return True
    return False


def _concat_obs(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """The compact obs of all inputs: each column one categorical (categories the sorted union); a text extra that
    an input lacks is '' for its cells."""
    columns = list(dict.fromkeys(c for f in frames for c in f.columns))
    out = {}
    for column in columns:
        parts = [f[column].array if column in f.columns else _constant("", len(f)) for f in frames]
        out[column] = union_categoricals(parts, sort_categories=True) if len(parts) > 1 else parts[0]
    return pd.DataFrame(out)


def _plan_corpus(cfg: BuildConfig, vocab: GeneVocab, ontology: Ontology) -> _Plan:
    """Pass 1: read obs and var of every input, then plan the gene panel and the splits (no expression read)."""
    sources, frames, keeps, mappings, scales = [], [], [], [], []
    hashes = []  # per input: its sorted cell-ID hashes (8 bytes per cell, during pass 1 only)
    for opened in _open_inputs(cfg):
        source, mapping, frame, keep, scale = _read_metadata(opened, cfg, vocab, ontology)
        sources.append(source), frames.append(frame), keeps.append(keep), mappings.append(mapping)
        scales.append(scale)
        ids = _sorted_ids(source)  # checks the input's own IDs; kept only to compare with the other inputs
        hashes.append(ids if len(cfg.inputs) > 1 else None)
        del ids
    qualify = len(sources) > 1 and _shared_ids(sources, hashes)  # the same obs names in two files: qualify them
    del hashes
    all_obs = _concat_obs(frames)
    del frames
    keep = np.concatenate(keeps)
    ct_id = all_obs["cell_type_ontology_term_id"].array
    held = _holdout_mask(ct_id, keep, cfg, ontology)
    labels = _combine(ct_id, all_obs["cell_type"].array, lambda i, lab: i if i != "" else lab)
    try:  # label codes sort like the labels (categories sorted), so the split equals one drawn on the strings
        splits = plan_splits(all_obs, np.asarray(labels.codes, dtype=np.int32), cfg.split_fractions, cfg.seed,
                             "donor_id", "dataset_id", holdout=held)
    except ValueError as exc:
        raise ScmmError(f"--holdout-types {','.join(cfg.holdout_types)}: {exc}") from None
    panel_ids = np.unique(np.concatenate([m.gene_ids[m.gene_ids >= 0] for m in mappings]))
    extras = tuple(c for c in _TEXT_EXTRAS if c in all_obs.columns)
    columns = ("cell_id", "text", *OBS_COLUMNS, *extras, "source_file")
    return _Plan(sources, mappings, scales, all_obs, keep, splits, panel_ids, columns, qualify)


def _holdout_mask(cell_type_ids: pd.Categorical, keep: np.ndarray, cfg: BuildConfig,
                  ontology: Ontology) -> np.ndarray:
    """Per cell: its type is one of ``cfg.holdout_types`` (checked CL IDs, :func:`_checked_terms`), each of which
    some kept cell must have."""
    held = np.zeros(len(cell_type_ids), dtype=bool)
    for term in cfg.holdout_types:
        mask = np.asarray(cell_type_ids == term) & keep
        if not mask.any():
            raise ScmmError(f"--holdout-types: no cell of type {term} ({ontology.label(term)}) in the input")
        held |= mask
    if held.any() and held[keep].all():
        raise ScmmError("--holdout-types: every cell would be held out, leaving nothing to train on")
    return held


def _init_store(tmp: Path, panel_ids: np.ndarray, vocab: GeneVocab) -> zarr.Group:
    """Create the corpus zarr group with its gene panel (vocabulary IDs and symbols) and vocab.json."""
    root = zarr.open_group(str(tmp), mode="w", zarr_format=3)
    write_array(root, "genes/vocab_id", panel_ids.astype(np.int32))
    inverse_vocab = {i: t for t, i in vocab.token_to_id.items()}
    symbols = np.array([inverse_vocab[int(i)] for i in panel_ids], dtype=str)
    write_array(root, "genes/symbol", symbols)
    vocab.save(tmp / "vocab.json")
    return root


@dataclass
class _FileJob:
    """What a worker needs of one input to encode its chunks (no obs, no var)."""

    source: H5adSource
    scale: ScaleDecision
    cols: np.ndarray  # columns of the file that map onto the panel
    panel_cols: np.ndarray  # their panel index
    n_panel: int


@dataclass
class _Chunk:
    """One encoded chunk of cells: per split the kept, non-empty cells (expression, obs with texts), and sums."""

    n_rows: int
    parts: list[tuple[str, sp.csr_matrix, pd.DataFrame, tuple[np.ndarray, np.ndarray] | None]]
    n_empty: int
    integral: bool
    total_counts: float
    mapped_counts: float


class _Encoder:
    """Encodes one chunk of one input: read rows, check and convert the values, remap onto the gene panel,
    describe the kept cells. Runs in the build process (``--jobs 1``) or in each worker process.

    ``mode``: "encode" (the chunk for the shards), or one of the statistics passes over the chunk's training
    cells that the per-cell facts need first: "genes" (:class:`GeneStats`) and "programs" (:class:`ProgramMoments`
    of the raw program scores). ``facts``: the fact model (programs standardised for "encode"), ``names``: the full
    name of each panel gene (or None)."""

    def __init__(self, files: list[_FileJob], qualify_ids: bool, ontology: Ontology, mode: str = "encode",
                 facts: FactModel | None = None, names: list[str | None] | None = None):
        self.files, self.qualify_ids, self.ontology = files, qualify_ids, ontology
        self.mode, self.facts, self.names = mode, facts, names

    def _train_rows(self, task: tuple) -> sp.csr_matrix:
        f, start, stop, _obs, keep, split = task
        job = self.files[f]
        block = job.source.read_chunk(start, stop)
        block = to_linear(block, job.scale, f"{job.source.path} (rows from {start})")
        sub = block[:, job.cols].tocoo()
        remapped = sp.csr_matrix((sub.data, (sub.row, job.panel_cols[sub.col])),
                                 shape=(block.shape[0], job.n_panel), dtype=np.float32)
        remapped.sort_indices()
        rows = np.flatnonzero(keep & (np.diff(remapped.indptr) > 0) & (split == SPLITS.index("train")))
        return remapped[rows]

    def _fact_text(self, scores: np.ndarray, markers: np.ndarray, cell_ids: np.ndarray) -> list[str]:
        """The cell-specific sentence of each cell: its top programs and first marker genes with their names."""
        assert self.facts is not None
        names = self.facts.program_names
        out = []
        for s, m, cid in zip(scores, markers, cell_ids):
            top = np.argsort(-s, kind="stable")[:N_CAPTION_PROGRAMS]
            genes = [(str(self.facts.symbols[g]), self.names[g] if self.names else None)
                     for g in m[:N_CAPTION_MARKERS] if g >= 0]
            out.append(fact_sentence([names[p] for p in top], genes, fact_template_index(str(cid))))
        return out

    def __call__(self, task: tuple):
        if self.mode == "genes":
            return GeneStats.of(self._train_rows(task))
        if self.mode == "programs":
            assert self.facts is not None
            moments = ProgramMoments.empty(self.facts.n_programs)
            moments.add(self.facts.raw_scores(self._train_rows(task)))
            return moments
        f, start, stop, obs, keep, split = task
        job = self.files[f]
        source = job.source
        block = source.read_chunk(start, stop)  # values checked as read (h5ad.check_values)
        integral = bool(np.all(block.data == np.round(block.data)))
        block = to_linear(block, job.scale, f"{source.path} (rows from {start})")
        total = float(block.data.sum())
        sub = block[:, job.cols].tocoo()
        remapped = sp.csr_matrix((sub.data, (sub.row, job.panel_cols[sub.col])),
                                 shape=(block.shape[0], job.n_panel), dtype=np.float32)
        remapped.sort_indices()
        mapped = float(remapped.data.sum())
        cell_ids = source.obs_names(start, stop)
        if self.qualify_ids:
            cell_ids = np.array([f"{source.path.name}:{c}" for c in cell_ids], dtype=object)
        nonempty = np.diff(remapped.indptr) > 0
        n_empty = int((keep & ~nonempty).sum())
        keep = keep & nonempty
        parts = []
        for s, name in enumerate(SPLITS):
            sel = np.flatnonzero(keep & (split == s))
            if sel.size:
                part = obs.iloc[sel].copy()
                part.index = pd.Index(cell_ids[sel], dtype=object)
                facts, sentences = None, None
                if self.facts is not None:
                    facts = self.facts.facts(remapped[sel])
                    sentences = self._fact_text(*facts, part.index.to_numpy())
                part["text"] = _describe_rows(part[[c for c in part.columns if c != "source_file"]], self.ontology,
                                              sentences)
                parts.append((name, remapped[sel], part, facts))
        return _Chunk(block.shape[0], parts, n_empty, integral, total, mapped)


_WORKER: _Encoder | None = None


def _init_worker(files: list[_FileJob], qualify_ids: bool, mode: str, facts: FactModel | None,
                 names: list[str | None] | None) -> None:
    global _WORKER
    logging.basicConfig(level=logging.WARNING)
    _WORKER = _Encoder(files, qualify_ids, get_ontology(), mode, facts, names)


def _encode_in_worker(task: tuple):
    assert _WORKER is not None
    return _WORKER(task)


def _file_jobs(plan: _Plan) -> list[_FileJob]:
    jobs = []
    for source, mapping, scale in zip(plan.sources, plan.mappings, plan.scales):
        mapped = mapping.gene_ids >= 0
        cols = np.flatnonzero(mapped)
        panel_cols = np.searchsorted(plan.panel_ids, mapping.gene_ids[mapped]).astype(np.int64)
        jobs.append(_FileJob(source.for_worker(), scale, cols, panel_cols, len(plan.panel_ids)))
    return jobs


def _tasks(cfg: BuildConfig, plan: _Plan) -> Iterator[tuple]:
    """(file, start, stop, obs rows, keep, split) of every chunk, in corpus order."""
    offset = 0
    for f, source in enumerate(plan.sources):
        for start in range(0, source.n_obs, cfg.chunk_size):
            stop = min(start + cfg.chunk_size, source.n_obs)
            rows = slice(offset + start, offset + stop)
            yield f, start, stop, plan.obs.iloc[rows], plan.keep[rows], plan.splits.split[rows]
        offset += source.n_obs


def _encoded_chunks(cfg: BuildConfig, plan: _Plan, ontology: Ontology, mode: str = "encode",
                    facts: FactModel | None = None, names: list[str | None] | None = None) -> Iterator[tuple[int, Any]]:
    """(file index, chunk) in corpus order: encoded here, or by ``cfg.jobs`` worker processes with at most
    2 x jobs chunks in flight (results are taken in submission order, so the corpus does not depend on jobs).
    ``mode``/``facts``/``names``: see :class:`_Encoder` (the statistics passes yield per-chunk sums)."""
    files = _file_jobs(plan)
    if cfg.jobs <= 1:
        encoder = _Encoder(files, plan.qualify_ids, ontology, mode, facts, names)
        for task in _tasks(cfg, plan):
            yield task[0], encoder(task)
        return
    ctx = multiprocessing.get_context("forkserver" if "forkserver" in multiprocessing.get_all_start_methods()
                                      else "spawn")
    with ProcessPoolExecutor(cfg.jobs, mp_context=ctx, initializer=_init_worker,
                             initargs=(files, plan.qualify_ids, mode, facts, names)) as pool:
        pending: deque = deque()
        try:
            for task in _tasks(cfg, plan):
                pending.append((task[0], pool.submit(_encode_in_worker, task)))
                if len(pending) >= 2 * cfg.jobs:
                    f, future = pending.popleft()
                    yield f, future.result()
            while pending:
                f, future = pending.popleft()
                yield f, future.result()
        except BaseException:
            for _, future in pending:
                future.cancel()
            raise


def _fit_facts(cfg: BuildConfig, plan: _Plan, ontology: Ontology, symbols: np.ndarray) -> FactModel:
    """The statistics passes over the training cells (gene moments, then raw program-score moments), summed in
    chunk order so that the fact model does not depend on ``--jobs``."""
    stats = GeneStats.empty(len(plan.panel_ids))
    for _, part in _encoded_chunks(cfg, plan, ontology, "genes"):
        stats.add(part)
    if stats.n == 0:
        raise ScmmError("no training cells to compute the per-cell facts against (pass --no-facts)")
    facts = FactModel.from_stats(symbols, stats)
    moments = ProgramMoments.empty(facts.n_programs)
    for _, part in _encoded_chunks(cfg, plan, ontology, "programs", facts):
        moments.merge(part)
    facts.program_mean, facts.program_sd = moments.mean_sd()
    log.info("per-cell facts: %d hallmark programs scored, %d left out (< 5 panel genes)", facts.n_programs,
             len(facts.left_out))
    return facts


def _write_cells(cfg: BuildConfig, plan: _Plan, writer: _ShardWriter, ontology: Ontology,
                 bar: tqdm, facts: FactModel | None = None) -> tuple[str, int, list[dict]]:
    """Pass 2: stream every input into the shards; return (normalization, cells dropped empty, file reports)."""
    n = len(plan.sources)
    integral, n_empty = [True] * n, [0] * n
    total, mapped = [0.0] * n, [0.0] * n
    names = None
    if facts is not None:
        table = gene_names(facts.symbols)
        names = [table.get(str(s)) for s in facts.symbols]
    for f, chunk in _encoded_chunks(cfg, plan, ontology, "encode", facts, names):
        for split, matrix, obs, cell_facts in chunk.parts:
            writer.add(split, matrix, obs, cell_facts)
        integral[f] &= chunk.integral
        n_empty[f] += chunk.n_empty
        total[f] += chunk.total_counts
        mapped[f] += chunk.mapped_counts
        bar.update(chunk.n_rows)
    normalization, file_reports = "counts", []
    for f, (source, mapping, scale) in enumerate(zip(plan.sources, plan.mappings, plan.scales)):
        mapping.count_share = mapped[f] / total[f] if total[f] > 0 else 0.0
        if scale.stored != "counts":
            normalization = "normalized"
        file_reports.append({"file": str(source.path), "element": source.element, "integer_counts": integral[f],
                             "input_scale": scale.to_dict(), **mapping.report()})
    return normalization, sum(n_empty), file_reports


def _checked_terms(cfg: BuildConfig, ontology: Ontology) -> BuildConfig:
    """``cfg`` with its label map's IDs and its held-out types checked as Cell Ontology terms (before any input is
    read; every entry, used or not) and written as the ontology writes them."""
    label_map = {str(label): check_term(str(term), CELL_TYPE, ontology, f"--label-map: label '{label}'")
                 for label, term in cfg.label_map.items()}
    holdout = check_terms(cfg.holdout_types, CELL_TYPE, ontology, "--holdout-types")
    return replace(cfg, label_map=label_map, holdout_types=holdout)


def build_corpus(cfg: BuildConfig) -> dict:
    """Build the corpus described by `cfg`; returns its manifest."""
    out = Path(cfg.out)
    if out.exists() and not cfg.overwrite:
        raise ScmmError(f"output {out} already exists (pass --overwrite to replace it)")
    if not cfg.inputs and cfg.soma is None:
        raise ScmmError("no input given: name h5ad files or --soma URI")
    ontology = get_ontology()
    cfg = _checked_terms(cfg, ontology)
    vocab = GeneVocab.load(cfg.vocab)
    plan = _plan_corpus(cfg, vocab, ontology)

    # disable=None: no bar when stderr is not a terminal, so logs and `error:` lines stay clean
    bar = tqdm(total=sum(s.n_obs for s in plan.sources), unit="cells", desc="build corpus",
               disable=None if cfg.progress else True)
    tmp = temp_dir_beside(out)
    try:
        root = _init_store(tmp, plan.panel_ids, vocab)
        facts = _fit_facts(cfg, plan, ontology, np.asarray(root["genes/symbol"][:]).astype(object)) \
            if cfg.facts else None
        writer = _ShardWriter(root, cfg.shard_size, plan.columns)
        normalization, n_dropped_empty, file_reports = _write_cells(cfg, plan, writer, ontology, bar, facts)
        bar.close()
        writer.close()
        if not writer.entries:
            raise ScmmError("no cells left to write (every cell was dropped or empty)")
        manifest = _manifest(cfg, writer.entries, writer.cell_types, vocab, plan.panel_ids, plan.splits.group_by,
                             normalization, n_dropped_empty, int((~plan.keep).sum()), file_reports)
        if facts is not None:
            arrays = facts.arrays()
            for key, value in arrays.items():
                write_array(root, f"facts/{key}", value)
            manifest["facts"] = {**facts.manifest(), "checksums": shard_checksums(arrays)}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        publish_dir(tmp, out, marker="manifest.json")  # --overwrite: the old corpus is swapped out, then deleted
    except BaseException:
        bar.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _manifest(cfg: BuildConfig, entries: list[dict], type_counts: dict[str, dict], vocab: GeneVocab,
              panel_ids: np.ndarray, group_by: str, normalization: str, n_empty: int, n_unlabelled: int,
              file_reports: list[dict]) -> dict:
    cell_types = dict(sorted(type_counts.items()))
    splits = {s: sum(e["n_cells"] for e in entries if e["split"] == s) for s in SPLITS}
    mapped = sum(r["genes_mapped"] for r in file_reports)
    id_tables = [r["id_table"] for r in file_reports if "id_table" in r]
    in_files = sum(r["genes_in_file"] for r in file_reports)
    return {
        "format": "scmm-corpus", "schema_version": SCHEMA_VERSION, "complete": True,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "vocab": {"name": vocab.name, "sha256": vocab.sha256(), "size": len(vocab)},
        "n_cells": sum(splits.values()), "n_genes": int(len(panel_ids)), "nnz": sum(e["nnz"] for e in entries),
        # what the stored values are: "counts" (every input raw counts) or "normalized" (linear values: some input
        # was normalised or log-normalised; logs undone); corpora from before scale.py may say "log1p" (stored log1p)
        "normalization": normalization,
        "splits": splits, "split_group_by": group_by, "split_seed": cfg.seed,
        "split_fractions": list(cfg.split_fractions),
        "holdout_types": sorted(set(cfg.holdout_types)),  # never in train or val: every cell of them is in test
        "cell_types": cell_types,
        "gene_coverage": {"genes_mapped": mapped, "genes_in_files": in_files,
                          "coverage": round(mapped / max(in_files, 1), 6), "files": file_reports},
        # the offline Ensembl -> symbol table (package, version, file) when some input gave Ensembl IDs only
        "gene_id_table": id_tables[0] if id_tables else None,
        "dropped_cells": {"no_mapped_expression": n_empty, "no_label": n_unlabelled},
        "shard_size": cfg.shard_size, "shards": entries,
        **({"soma": {"uri": cfg.soma, "measurement": cfg.measurement, "obs_filter": cfg.obs_filter,
                     "var_filter": cfg.var_filter}} if cfg.soma is not None else {}),
    }
