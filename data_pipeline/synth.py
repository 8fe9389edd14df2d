"""Synthetic CELLxGENE-schema h5ad files for scale tests and benchmarks.

:func:`synthesize` writes an AnnData ``.h5ad`` that looks like a CELLxGENE dataset (the ``obs``
``*_ontology_term_id`` columns and their label columns, Ensembl-style ``var`` index with
``feature_name`` symbols, raw integer counts in a CSR ``X``) without holding the count matrix in
memory: ``X`` is generated and written in row chunks straight into the file's HDF5 groups, in the
on-disk layout that :func:`anndata.read_h5ad` reads (also with ``backed='r'``).

What is real and what is made up
--------------------------------
* Gene symbols are real: they are drawn from scGPT's census vocabulary
  (``scgpt/tokenizer/default_census_vocab.json``), read as a data file; ``scgpt`` is not imported.
  Canonical marker genes of the chosen cell types (e.g. CD3E for T cells, MS4A1 for B cells) are
  included when there is room for them.
* Gene IDs are **not** real. No symbol -> Ensembl table ships offline, so each gene gets the
  deterministic ID ``ENSG9`` + its 10-digit vocabulary index (``ENSG90000012345``). Real human
  Ensembl gene IDs start with ``ENSG0``, so these can never be mistaken for (or collide with) real
  ones; gene mapping must go through ``var['feature_name']``.
* Every ontology term (CL cell types, UBERON tissues, MONDO/PATO diseases, PATO sex, HsapDv
  development stages, EFO assay, NCBITaxon organism) is a real, non-deprecated term and its label
  is the ontology label (checked against ``cellxgene-ontology-guide`` in the tests).
* The expression values are simulated: each cell type has an expression programme (a log-normal
  mean profile over genes plus a type-specific set of up-regulated marker genes), each donor a
  small multiplicative gene-wise effect, each cell a log-normal library size; counts are drawn
  negative-binomial (gamma-Poisson). The tissue of a cell follows from its cell type (immune cells
  in blood or bone marrow, hepatocytes in liver, ...). Donors, their sex, age and disease, and the
  datasets are made up; each donor belongs to exactly one dataset.

The output depends only on ``(n_cells, n_genes, seed, n_cell_types, n_donors)``: counts are drawn
in fixed blocks of cells, each from its own generator seeded by ``(seed, block index)``, so
``chunk_size`` (the number of rows written per append, i.e. the memory bound) does not change the
result. The ground truth is stored in ``uns['synth']`` (parameters, and ``markers``: cell type
ontology ID -> the ``var`` IDs of its marker genes).
"""

from __future__ import annotations

import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
from anndata import AnnData
from tqdm.auto import tqdm

from scmm.atomic import file_beside

__all__ = ["synthesize", "CELL_TYPES", "census_vocab_path", "load_census_vocab"]


@dataclass(frozen=True)
class _CellType:
    term_id: str
    label: str
    tissue_id: str
    tissue: str
    markers: tuple[str, ...]  # canonical marker symbols (all present in the census vocabulary)


_BLOOD = ("UBERON:0000178", "blood")
_MARROW = ("UBERON:0002371", "bone marrow")
_LIVER = ("UBERON:0002107", "liver")
_LUNG = ("UBERON:0002048", "lung")
_SKIN = ("UBERON:0002097", "skin of body")

#: The cell types, in the order they are used (``n_cell_types`` takes the first ones).
CELL_TYPES: tuple[_CellType, ...] = (
    _CellType("CL:0000084", "T cell", *_BLOOD, ("CD3D", "CD3E", "CD2", "IL7R", "TRAC")),
    _CellType("CL:0000236", "B cell", *_BLOOD, ("MS4A1", "CD79A", "CD79B", "CD19")),
    _CellType("CL:0000623", "natural killer cell", *_BLOOD, ("NKG7", "GNLY", "KLRD1", "NCAM1")),
    _CellType("CL:0001054", "CD14-positive monocyte", *_BLOOD, ("CD14", "LYZ", "S100A8", "S100A9", "FCN1")),
    _CellType("CL:0000451", "dendritic cell", *_BLOOD, ("FCER1A", "CD1C", "CLEC10A")),
    _CellType("CL:0000232", "erythrocyte", *_BLOOD, ("HBB", "HBA1", "HBA2", "ALAS2")),
    _CellType("CL:0000556", "megakaryocyte", *_MARROW, ("PPBP", "PF4", "ITGA2B", "GP9")),
    _CellType("CL:0000182", "hepatocyte", *_LIVER, ("ALB", "APOA1", "TTR", "SERPINA1")),
    _CellType("CL:0000057", "fibroblast", *_LUNG, ("COL1A1", "COL1A2", "DCN", "LUM")),
    _CellType("CL:0000115", "endothelial cell", *_LUNG, ("PECAM1", "VWF", "CDH5", "CLDN5")),
    _CellType("CL:0000786", "plasma cell", *_MARROW, ("JCHAIN", "MZB1", "IGKC", "XBP1")),
    _CellType("CL:0000784", "plasmacytoid dendritic cell", *_BLOOD, ("LILRA4", "IL3RA", "CLEC4C")),
    _CellType("CL:0000097", "mast cell", *_LUNG, ("TPSAB1", "CPA3", "KIT")),
    _CellType("CL:0000235", "macrophage", *_LUNG, ("CD68", "C1QA", "C1QB", "MARCO")),
    _CellType("CL:0000192", "smooth muscle cell", *_LUNG, ("ACTA2", "MYH11", "DES", "TAGLN")),
    _CellType("CL:0002063", "pulmonary alveolar type 2 cell", *_LUNG, ("SFTPC", "SFTPB", "NAPSA")),
    _CellType("CL:0000312", "keratinocyte", *_SKIN, ("KRT14", "KRT5", "KRT1")),
)

_NORMAL = ("PATO:0000461", "normal")
#: Diseases given to some donors of the second and third dataset.
_DISEASES = (("MONDO:0100096", "COVID-19"), ("MONDO:0005148", "type 2 diabetes mellitus"))
_SEXES = (("PATO:0000383", "female"), ("PATO:0000384", "male"))
_DEV_STAGES = (
    ("HsapDv:0000237", "third decade stage"),
    ("HsapDv:0000238", "fourth decade stage"),
    ("HsapDv:0000239", "fifth decade stage"),
    ("HsapDv:0000240", "sixth decade stage"),
    ("HsapDv:0000241", "seventh decade stage"),
)
_ASSAY = ("EFO:0009922", "10x 3' v3")
_ORGANISM = ("NCBITaxon:9606", "Homo sapiens")

# Generative model constants (log scale unless named otherwise).
_BASE_SD = 1.6  # spread of the shared log mean profile over genes
_TYPE_SD = 0.4  # type-specific deviation of every gene
_MARKER_UP = (1.8, 3.2)  # uniform range of the marker up-regulation (log fold, ~6x to ~25x)
_DONOR_SD = 0.15  # donor (batch) gene-wise effect
_LIB_PER_GENE = 0.15  # median library size = _LIB_PER_GENE * n_genes (keeps density ~independent of G)
_LIB_SD = 0.4
_NB_SHAPE = 5.0  # gamma shape of the gamma-Poisson (NB dispersion 1/shape = 0.2)
_MAX_MARKERS = 50
_BLOCK_ELEMENTS = 1 << 21  # cells per generation block = this // n_genes (at most 1024)

_PSEUDO_EXCLUDE = re.compile(
    r"(-AS\d*|-DT|-IT\d*|-OT\d*|\dP)$|^(LINC|LOC|FLJ|MIR\d|SNOR|SCAR|RNU|RNA5|RNY|Y-RNA|RP\d+-|CT[ABCD]-)"
    r"|^(IG|TR)[ABDGHKL][VDJC]"
)
_SYMBOL = re.compile(r"^[A-Z][A-Z0-9]{1,11}(-[A-Z0-9]{1,4})?$")


def census_vocab_path() -> Path:
    """Path of scGPT's ``default_census_vocab.json``, located without importing ``scgpt``."""
    spec = importlib.util.find_spec("scgpt")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the scgpt package is not installed; it ships tokenizer/default_census_vocab.json "
            "(install it with `pip install --no-deps scgpt==0.2.4`)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "tokenizer" / "default_census_vocab.json"
    if not path.is_file():
        raise FileNotFoundError(f"scGPT census vocabulary not found at {path}")
    return path


def load_census_vocab() -> dict[str, int]:
    """The census vocabulary as ``symbol -> id``, without special tokens (keys starting with '<')."""
    with open(census_vocab_path()) as fh:
        vocab = json.load(fh)
    return {k: int(v) for k, v in vocab.items() if not k.startswith("<")}


def _proper_symbols(vocab: dict[str, int]) -> list[str]:
    """Symbols that look like protein-coding style gene symbols (no pseudogene/lncRNA/clone names)."""
    out = []
    for sym in vocab:
        if not _SYMBOL.match(sym) or _PSEUDO_EXCLUDE.search(sym):
            continue
        m = re.match(r"^(.+?)P\d+$", sym)  # RPL7AP8 -> RPL7A is in the vocab: a pseudogene
        if m and m.group(1) in vocab:
            continue
        out.append(sym)
    return sorted(out)


def _select_genes(vocab, n_genes, types, rng):
    """Choose ``n_genes`` symbols; return (symbols sorted, canonical markers per type)."""
    n_types = len(types)
    per_type = (n_genes // 4) // n_types
    canonical = [list(t.markers[:per_type]) for t in types]
    chosen = [s for c in canonical for s in c]
    taken = set(chosen)
    preferred = [s for s in _proper_symbols(vocab) if s not in taken]
    need = n_genes - len(chosen)
    if need <= len(preferred):
        chosen += [preferred[i] for i in rng.choice(len(preferred), size=need, replace=False)]
    else:  # very large G: all well-formed symbols, then the rest of the vocabulary
        chosen += preferred
        taken.update(preferred)
        rest = sorted(s for s in vocab if s not in taken)
        chosen += [rest[i] for i in rng.choice(len(rest), size=n_genes - len(chosen), replace=False)]
    return sorted(chosen), canonical


def _validate(path, n_cells, n_genes, seed, n_cell_types, n_donors, chunk_size, vocab_size):
    def is_int(x):
        return isinstance(x, (int, np.integer)) and not isinstance(x, bool)

    for name, value in (("n_cells", n_cells), ("n_genes", n_genes), ("seed", seed),
                        ("n_cell_types", n_cell_types), ("n_donors", n_donors), ("chunk_size", chunk_size)):
        if not is_int(value):
            raise ValueError(f"{name} must be an integer, got {value!r}")
    if n_cells < 1:
        raise ValueError(f"n_cells must be at least 1, got {n_cells}")
    if n_genes < 10:
        raise ValueError(f"n_genes must be at least 10, got {n_genes}")
    if n_genes > vocab_size:
        raise ValueError(f"n_genes={n_genes} is more than the gene vocabulary has ({vocab_size} genes)")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    if not 1 <= n_cell_types <= len(CELL_TYPES):
        raise ValueError(f"n_cell_types must be between 1 and {len(CELL_TYPES)}, got {n_cell_types}")
    if n_donors < 1:
        raise ValueError(f"n_donors must be at least 1, got {n_donors}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    parent = Path(path).resolve().parent
    if not parent.is_dir():
        raise ValueError(f"output directory {parent} does not exist")
    if Path(path).is_dir():
        raise ValueError(f"output path {path} is a directory")


def _donor_table(n_donors, rng):
    n_datasets = min(3, n_donors)
    rows = []
    for i in range(n_donors):
        k, j = i % n_datasets, i // n_datasets  # dataset, index of the donor within it
        disease = _NORMAL if (k == 0 or j % 2 == 0) else _DISEASES[(k - 1) % len(_DISEASES)]
        sex = _SEXES[i % 2]
        stage = _DEV_STAGES[int(rng.integers(len(_DEV_STAGES)))]
        rows.append(dict(donor_id=f"donor_{i}", dataset_id=f"synthetic_dataset_{k}",
                         sex_ontology_term_id=sex[0], sex=sex[1],
                         disease_ontology_term_id=disease[0], disease=disease[1],
                         development_stage_ontology_term_id=stage[0], development_stage=stage[1]))
    return pd.DataFrame(rows)


def _block_rng(seed, block):
    return np.random.default_rng(np.random.SeedSequence([seed, 1, block]))


def _generate_block(rng, lib, prof, donor_eff):
    """Counts for one block of cells -> (data float32, indices int32, row nnz int64, row sums)."""
    rate = prof * donor_eff
    rate *= lib[:, None]
    rate *= rng.standard_gamma(_NB_SHAPE, size=rate.shape, dtype=np.float32)
    rate *= 1.0 / _NB_SHAPE
    counts = rng.poisson(rate)
    rows, cols = np.nonzero(counts)
    data = counts[rows, cols].astype(np.float32)
    row_nnz = np.bincount(rows, minlength=counts.shape[0]).astype(np.int64)
    row_sums = counts.sum(axis=1)
    return data, cols.astype(np.int32), row_nnz, row_sums


@dataclass(frozen=True)
class _Model:
    """The generative model drawn once from the seed: gene panel, markers, profiles and per-cell draws."""

    seed: int
    symbols: list[str]
    gene_ids: np.ndarray  # made-up Ensembl-style IDs, one per symbol
    markers: list[np.ndarray]  # per cell type: gene indices of its markers
    prof: np.ndarray  # (types, genes) expression proportions
    donor_eff: np.ndarray  # (donors, genes) multiplicative donor effects
    donors: pd.DataFrame  # one row per donor
    donor_of_cell: np.ndarray
    type_of_cell: np.ndarray
    lib: np.ndarray  # library size per cell

    @property
    def n_cells(self) -> int:
        """Number of cells."""
        return len(self.lib)

    @property
    def n_genes(self) -> int:
        """Number of genes."""
        return len(self.symbols)


def _marker_genes(symbols: list[str], canonical: list[list[str]], rng: np.random.Generator) -> list[np.ndarray]:
    """Marker gene indices per cell type: its canonical markers, topped up from a shuffled gene pool."""
    n_genes, n_cell_types = len(symbols), len(canonical)
    pos = {s: i for i, s in enumerate(symbols)}
    k = max(1, min(_MAX_MARKERS, n_genes // (2 * n_cell_types)))
    canon_idx = [[pos[s] for s in c] for c in canonical]
    canon_set = {i for c in canon_idx for i in c}
    pool = rng.permutation(np.array([i for i in range(n_genes) if i not in canon_set], dtype=np.int64))
    markers, cursor = [], 0
    for t in range(n_cell_types):
        extra = k - len(canon_idx[t])
        take = [int(pool[(cursor + j) % len(pool)]) for j in range(extra)]
        cursor += extra
        markers.append(np.array(canon_idx[t] + take, dtype=np.int64))
    return markers


def _expression_profiles(markers: list[np.ndarray], n_genes: int, rng: np.random.Generator) -> np.ndarray:
    """Per cell type, the expected proportion of each gene (a shared profile, type noise, marker boosts)."""
    base = rng.normal(0.0, _BASE_SD, size=n_genes)
    logp = base[None, :] + rng.normal(0.0, _TYPE_SD, size=(len(markers), n_genes))
    for t, m in enumerate(markers):
        logp[t, m] += rng.uniform(*_MARKER_UP, size=len(m))
    logp -= logp.max(axis=1, keepdims=True)
    prof = np.exp(logp)
    prof /= prof.sum(axis=1, keepdims=True)
    return prof


def _assign_cells(n_cells: int, n_donors: int, n_cell_types: int,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Donor and cell type of every cell; each donor's composition varies around a shared one."""
    comp = rng.dirichlet(np.full(n_cell_types, 4.0))
    donor_of_cell = rng.integers(n_donors, size=n_cells)
    type_of_cell = np.empty(n_cells, dtype=np.int64)
    for d in range(n_donors):
        sel = np.flatnonzero(donor_of_cell == d)
        p_d = rng.dirichlet(20.0 * comp + 0.5)
        type_of_cell[sel] = rng.choice(n_cell_types, size=len(sel), p=p_d)
    return donor_of_cell, type_of_cell


def _draw_model(vocab: dict[str, int], n_cells: int, n_genes: int, seed: int, types: tuple[_CellType, ...],
                n_donors: int) -> _Model:
    """Draw every global parameter (small; the counts themselves are drawn per block when written)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0]))
    symbols, canonical = _select_genes(vocab, n_genes, types, rng)
    markers = _marker_genes(symbols, canonical, rng)
    prof = _expression_profiles(markers, n_genes, rng)
    donor_eff = np.exp(rng.normal(0.0, _DONOR_SD, size=(n_donors, n_genes)))
    donors = _donor_table(n_donors, rng)
    donor_of_cell, type_of_cell = _assign_cells(n_cells, n_donors, len(types), rng)
    lib = np.exp(rng.normal(np.log(_LIB_PER_GENE * n_genes), _LIB_SD, size=n_cells))
    return _Model(seed=seed, symbols=symbols, gene_ids=np.array([f"ENSG9{vocab[s]:010d}" for s in symbols]),
                  markers=markers, prof=prof, donor_eff=donor_eff, donors=donors,
                  donor_of_cell=donor_of_cell, type_of_cell=type_of_cell, lib=lib)


def _categorical(values: list | np.ndarray, categories: list | np.ndarray) -> pd.Categorical:
    """A categorical whose categories keep their first-seen order (stable codes in the file)."""
    return pd.Categorical(values, categories=list(dict.fromkeys(categories)))


def _obs_table(model: _Model, types: tuple[_CellType, ...]) -> pd.DataFrame:
    """The CELLxGENE-schema ``obs`` (``n_counts`` zero: it is filled in once ``X`` is written)."""
    n_cells, type_of_cell = model.n_cells, model.type_of_cell
    width = len(str(n_cells - 1))
    d_rows = model.donors.iloc[model.donor_of_cell].reset_index(drop=True)
    obs = pd.DataFrame(index=pd.Index([f"cell_{i:0{width}d}" for i in range(n_cells)], name=None))
    obs["cell_type_ontology_term_id"] = _categorical([types[t].term_id for t in type_of_cell],
                                                     [t.term_id for t in types])
    obs["cell_type"] = _categorical([types[t].label for t in type_of_cell], [t.label for t in types])
    obs["tissue_ontology_term_id"] = _categorical([types[t].tissue_id for t in type_of_cell],
                                                  [t.tissue_id for t in types])
    obs["tissue"] = _categorical([types[t].tissue for t in type_of_cell], [t.tissue for t in types])
    for col in ("disease_ontology_term_id", "disease", "sex_ontology_term_id", "sex",
                "development_stage_ontology_term_id", "development_stage", "donor_id", "dataset_id"):
        obs[col] = _categorical(d_rows[col].to_numpy(), model.donors[col].to_numpy())
    const = {
        "assay_ontology_term_id": _ASSAY[0], "assay": _ASSAY[1],
        "organism_ontology_term_id": _ORGANISM[0], "organism": _ORGANISM[1],
        "self_reported_ethnicity_ontology_term_id": "unknown", "self_reported_ethnicity": "unknown",
        "suspension_type": "cell",
    }
    for col, value in const.items():
        obs[col] = pd.Categorical.from_codes(np.zeros(n_cells, dtype=np.int8), categories=[value])
    obs["is_primary_data"] = np.ones(n_cells, dtype=bool)
    obs["n_counts"] = np.zeros(n_cells, dtype=np.float32)
    return obs


def _var_table(model: _Model) -> pd.DataFrame:
    """The ``var`` table: made-up Ensembl-style IDs as index, real symbols in ``feature_name``."""
    var = pd.DataFrame(index=pd.Index(model.gene_ids, name=None))
    var["feature_name"] = pd.Categorical(model.symbols)
    var["feature_reference"] = pd.Categorical.from_codes(np.zeros(model.n_genes, dtype=np.int8),
                                                         categories=[_ORGANISM[0]])
    return var


def _uns(model: _Model, types: tuple[_CellType, ...]) -> dict:
    """The ``uns`` dict: a title and the ground truth (parameters and marker genes per cell type)."""
    n_cells, n_genes, seed = model.n_cells, model.n_genes, model.seed
    return {
        "title": f"scmm synthetic dataset ({n_cells} cells x {n_genes} genes, seed {seed})",
        "synth": {
            "seed": seed, "n_cells": n_cells, "n_genes": n_genes,
            "n_cell_types": len(types), "n_donors": len(model.donors),
            "markers": {types[t].term_id: model.gene_ids[m] for t, m in enumerate(model.markers)},
        },
    }


def _skeleton(model: _Model, types: tuple[_CellType, ...]) -> AnnData:
    """The AnnData without ``X`` (obs, var, uns); ``X`` is appended to its file afterwards."""
    return AnnData(obs=_obs_table(model, types), var=_var_table(model), uns=_uns(model, types))


class _RowAppender:
    """Appends CSR ``data``/``indices`` to growable HDF5 datasets, at most ``chunk_size`` rows at a time."""

    def __init__(self, ds_data: h5py.Dataset, ds_idx: h5py.Dataset, chunk_size: int) -> None:
        self.ds_data, self.ds_idx, self.chunk_size = ds_data, ds_idx, chunk_size
        self.buf_data: list[np.ndarray] = []
        self.buf_idx: list[np.ndarray] = []
        self.buffered = 0  # rows in the buffers
        self.nnz = 0  # entries written so far

    def add(self, data: np.ndarray, idx: np.ndarray, row_ptr: np.ndarray) -> None:
        """Buffer a block of rows (``row_ptr``: its local CSR offsets), splitting it at chunk boundaries."""
        r, n_rows = 0, len(row_ptr) - 1
        while r < n_rows:
            r_end = min(n_rows, r + self.chunk_size - self.buffered)
            a, e = row_ptr[r], row_ptr[r_end]
            self.buf_data.append(data[a:e])
            self.buf_idx.append(idx[a:e])
            self.buffered += r_end - r
            r = r_end
            if self.buffered >= self.chunk_size:
                self.flush()

    def flush(self) -> None:
        """Write the buffered rows to the file and empty the buffers."""
        if not self.buf_data:
            return
        data = np.concatenate(self.buf_data)
        idx = np.concatenate(self.buf_idx)
        self.ds_data.resize((self.nnz + len(data),))
        self.ds_data[self.nnz:] = data
        self.ds_idx.resize((self.nnz + len(idx),))
        self.ds_idx[self.nnz:] = idx
        self.nnz += len(data)
        self.buf_data, self.buf_idx, self.buffered = [], [], 0


def _create_csr_group(f: h5py.File, n_cells: int, n_genes: int) -> tuple[h5py.Dataset, h5py.Dataset]:
    """Create the ``X`` group in anndata's CSR encoding, with empty growable ``data`` and ``indices``."""
    g = f.create_group("X")
    g.attrs["encoding-type"] = "csr_matrix"
    g.attrs["encoding-version"] = "0.1.0"
    g.attrs["shape"] = np.array([n_cells, n_genes], dtype=np.int64)
    h5chunk = (1 << 18,)
    ds_data = g.create_dataset("data", shape=(0,), maxshape=(None,), dtype=np.float32, chunks=h5chunk)
    ds_idx = g.create_dataset("indices", shape=(0,), maxshape=(None,), dtype=np.int32, chunks=h5chunk)
    return ds_data, ds_idx


def _stream_counts(model: _Model, appender: _RowAppender, bar: tqdm | None) -> tuple[np.ndarray, np.ndarray]:
    """Draw the counts block by block (fixed blocks: independent of chunk_size); return (indptr, n_counts)."""
    n_cells = model.n_cells
    block = max(1, min(1024, _BLOCK_ELEMENTS // model.n_genes))
    indptr = np.zeros(n_cells + 1, dtype=np.int64)
    n_counts = np.empty(n_cells, dtype=np.float32)
    for b, start in enumerate(range(0, n_cells, block)):
        stop = min(n_cells, start + block)
        data, idx, row_nnz, row_sums = _generate_block(
            _block_rng(model.seed, b), model.lib[start:stop],
            model.prof[model.type_of_cell[start:stop]], model.donor_eff[model.donor_of_cell[start:stop]])
        indptr[start + 1:stop + 1] = indptr[start] + np.cumsum(row_nnz)
        n_counts[start:stop] = row_sums
        appender.add(data, idx, indptr[start:stop + 1] - indptr[start])
        if bar is not None:
            bar.update(stop - start)
    appender.flush()
    return indptr, n_counts


def _write_counts(tmp: str, model: _Model, chunk_size: int, progress: bool, name: str) -> None:
    """Append ``X`` to the skeleton file chunk by chunk and fill in ``obs['n_counts']``."""
    with h5py.File(tmp, "r+") as f:
        ds_data, ds_idx = _create_csr_group(f, model.n_cells, model.n_genes)
        bar = tqdm(total=model.n_cells, unit="cell", desc=f"synthesize {name}") if progress else None
        try:
            indptr, n_counts = _stream_counts(model, _RowAppender(ds_data, ds_idx, chunk_size), bar)
        finally:
            if bar is not None:
                bar.close()
        f["X"].create_dataset("indptr", data=indptr)
        f["obs"]["n_counts"][...] = n_counts


def synthesize(path, n_cells: int, n_genes: int, seed: int = 0, n_cell_types: int = 10,
               n_donors: int = 8, chunk_size: int = 10_000, progress: bool = True) -> None:
    """Write a synthetic CELLxGENE-schema ``.h5ad`` of ``n_cells`` x ``n_genes`` raw counts to ``path``.

    ``X`` is a float32 CSR matrix of integer counts (about 10% non-zero), written ``chunk_size``
    rows at a time so that memory stays bounded (a few hundred MB for any ``n_cells``); the file is
    written to a temporary name in the same folder and renamed into place, so a failure leaves no
    partial output. ``obs`` holds ``cell_type``, ``tissue``, ``disease``, ``sex``,
    ``development_stage``, ``assay``, ``organism``, ``self_reported_ethnicity`` (each with its
    ``*_ontology_term_id``), ``donor_id``, ``dataset_id``, ``suspension_type``, ``is_primary_data``
    and ``n_counts``; ``var`` is indexed by made-up Ensembl-style IDs (``ENSG9...``, see the module
    docstring) with ``feature_name`` (real symbols) and ``feature_reference``. The result depends
    on ``seed`` and the sizes, not on ``chunk_size``. Raises ``ValueError`` on bad arguments.
    """
    vocab = load_census_vocab()
    _validate(path, n_cells, n_genes, seed, n_cell_types, n_donors, chunk_size, len(vocab))
    n_cells, n_genes, seed = int(n_cells), int(n_genes), int(seed)
    n_donors, chunk_size = int(n_donors), int(chunk_size)
    types = CELL_TYPES[:int(n_cell_types)]

    model = _draw_model(vocab, n_cells, n_genes, seed, types, n_donors)
    skeleton = _skeleton(model, types)

    path = Path(path)
    with file_beside(path, suffix=".h5ad") as tmp:  # renamed into place when complete, removed on failure
        skeleton.write_h5ad(tmp)
        del skeleton  # obs is not needed while X is written
        _write_counts(tmp, model, chunk_size, progress, path.name)
