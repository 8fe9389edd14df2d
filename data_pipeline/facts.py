"""Per-cell facts computed at corpus build: hallmark program activity and marker genes.

Both are measured against the **training split** of the corpus, on log1p CP10k values over the corpus gene panel
(:func:`scmm.data_pipeline.collate.log1p_normalize`, the loader's normalisation):

* **gene statistics** (:class:`GeneStats`): per panel gene, over the training cells, the mean and the population
  standard deviation (ddof 0) of log1p CP10k, and the share of cells that express it (value > 0). Gene ``g``'s
  z-score in a cell is ``(x_g - mean_g) / sd_g`` (0 for genes with ``sd_g = 0``).
* **program activity** (method :data:`PROGRAM_METHOD`): a hallmark set's raw score in a cell is the mean z-score of
  its genes in the panel (genes with ``sd > 0`` only), i.e. scanpy's ``score_genes`` on gene-standardised values
  with the training mean as the reference; the score stored is that raw score standardised with the training
  split's mean and sd of it, so 0 is the training average and 1 one training sd above it, the same in every
  shard and split. Sets with fewer than :data:`MIN_SET_GENES` genes in the panel are left out (listed in the
  manifest).
* **marker genes**: the :data:`N_MARKERS` genes of the cell with the highest z-score among the genes expressed in
  the cell (value > 0) with ``z > 0``, expressed in at least :data:`MIN_DETECTION` of training cells; ties go to
  the lower panel index; fewer when fewer qualify (``-1`` pads).

Computed by :class:`FactModel` from the statistics (two statistics passes over the training cells before the
shards are written: gene moments, then program-score moments), chunk by chunk, with fixed summation order, so a
build gives the same bytes for any ``--jobs``. The gene sets (MSigDB hallmarks v7.5.1, CC BY 4.0) and the NCBI
gene names are small tables committed under ``data_pipeline/data/`` and made by ``scripts/make_gene_tables.py``.
"""
from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from scmm.data_pipeline.collate import CP10K, log1p_normalize

__all__ = ["FACTS_VERSION", "GeneStats", "FactModel", "ProgramMoments", "hallmark_sets", "gene_names",
           "MIN_SET_GENES", "N_MARKERS", "MIN_DETECTION", "PROGRAM_METHOD"]

DATA = Path(__file__).resolve().parent / "data"
HALLMARK_FILE = DATA / "hallmark_v7.5.1.json"
GENE_NAMES_FILE = DATA / "gene_names.tsv.gz"
FACTS_VERSION = 1
MIN_SET_GENES = 5
N_MARKERS = 20  # stored per cell (captions name the first few; eval checks named genes against all 20)
MIN_DETECTION = 0.01
PROGRAM_METHOD = ("mean z-score of the set's panel genes (log1p CP10k, gene mean/sd of the training split), "
                  "standardised with the training split's mean and sd of the score")
_BLOCK_ELEMENTS = 1 << 22  # dense cells x genes values per block (32 MB of float64)


def hallmark_sets() -> dict:
    """The committed hallmark table: {source, version, licence, citation, sets: {name: [symbols]}}."""
    return json.loads(HALLMARK_FILE.read_text())


def gene_names(symbols=None) -> dict[str, str]:
    """NCBI full names by symbol (all, or those of ``symbols``) from the committed table."""
    wanted = None if symbols is None else {str(s) for s in symbols}
    out = {}
    with gzip.open(GENE_NAMES_FILE, "rt", encoding="utf-8") as f:
        for line in f:
            if line.startswith("#"):
                continue
            symbol, name = line.rstrip("\n").split("\t", 1)
            if wanted is None or symbol in wanted:
                out[symbol] = name
    return out


def log1p_cp10k(matrix: sp.csr_matrix) -> sp.csr_matrix:
    """log1p CP10k (float64) of linear values (counts or normalised), totals over the whole panel."""
    return log1p_normalize(matrix, "counts", CP10K, np.float64)


@dataclass
class GeneStats:
    """Running sums over training cells of log1p CP10k per panel gene (merged in chunk order)."""

    n: int
    s1: np.ndarray
    s2: np.ndarray
    detected: np.ndarray

    @classmethod
    def empty(cls, n_genes: int) -> GeneStats:
        return cls(0, np.zeros(n_genes), np.zeros(n_genes), np.zeros(n_genes, dtype=np.int64))

    @classmethod
    def of(cls, matrix: sp.csr_matrix) -> GeneStats:
        """The sums of one chunk of linear values."""
        x = log1p_cp10k(matrix)
        g = x.shape[1]
        return cls(x.shape[0], np.bincount(x.indices, weights=x.data, minlength=g),
                   np.bincount(x.indices, weights=x.data * x.data, minlength=g),
                   np.bincount(x.indices[x.data > 0], minlength=g).astype(np.int64))

    def add(self, other: GeneStats) -> None:
        self.n += other.n
        self.s1 += other.s1
        self.s2 += other.s2
        self.detected += other.detected

    def mean_sd(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(mean, population sd, detected share) per gene."""
        n = max(self.n, 1)
        mean = self.s1 / n
        sd = np.sqrt(np.maximum(self.s2 / n - mean * mean, 0.0))
        return mean, sd, self.detected / n


@dataclass
class ProgramMoments:
    """Running sums of raw program scores over training cells."""

    n: int
    s1: np.ndarray
    s2: np.ndarray

    @classmethod
    def empty(cls, n_programs: int) -> ProgramMoments:
        return cls(0, np.zeros(n_programs), np.zeros(n_programs))

    def add(self, raw: np.ndarray) -> None:
        self.n += raw.shape[0]
        self.s1 += raw.sum(axis=0)
        self.s2 += (raw * raw).sum(axis=0)

    def merge(self, other: ProgramMoments) -> None:
        self.n += other.n
        self.s1 += other.s1
        self.s2 += other.s2

    def mean_sd(self) -> tuple[np.ndarray, np.ndarray]:
        n = max(self.n, 1)
        mean = self.s1 / n
        return mean, np.sqrt(np.maximum(self.s2 / n - mean * mean, 0.0))


@dataclass
class FactModel:
    """What scores programs and picks marker genes over one gene panel (see the module docstring)."""

    symbols: np.ndarray  # panel gene symbols
    gene_mean: np.ndarray
    gene_sd: np.ndarray
    detected: np.ndarray  # share of training cells expressing each gene
    program_names: list[str]
    program_genes: list[np.ndarray]  # panel indices (sd > 0) of each kept program
    left_out: dict[str, int]  # programs with fewer than MIN_SET_GENES panel genes -> how many they have
    program_mean: np.ndarray | None = None  # training mean / sd of the raw score (None before the second pass)
    program_sd: np.ndarray | None = None

    @classmethod
    def from_stats(cls, symbols, stats: GeneStats, sets: dict[str, list[str]] | None = None) -> FactModel:
        """Gene statistics and gene sets (default: the hallmark table) -> a model without program standardisation."""
        mean, sd, detected = stats.mean_sd()
        sets = hallmark_sets()["sets"] if sets is None else sets
        index = {str(s): i for i, s in enumerate(symbols)}
        names, genes, left_out = [], [], {}
        for name in sorted(sets):
            idx = np.array(sorted({index[g] for g in sets[name] if g in index and sd[index[g]] > 0}), dtype=np.int64)
            if len(idx) >= MIN_SET_GENES:
                names.append(name)
                genes.append(idx)
            else:
                left_out[name] = int(len(idx))
        return cls(np.asarray(symbols, dtype=object), mean, sd, detected, names, genes, left_out)

    @property
    def n_programs(self) -> int:
        return len(self.program_names)

    def _blocks(self, x: sp.csr_matrix):
        step = max(1, _BLOCK_ELEMENTS // max(x.shape[1], 1))
        for a in range(0, x.shape[0], step):
            b = min(a + step, x.shape[0])
            dense = x[a:b].toarray()
            z = np.zeros_like(dense)
            ok = self.gene_sd > 0
            z[:, ok] = (dense[:, ok] - self.gene_mean[ok]) / self.gene_sd[ok]
            yield a, b, dense, z

    def raw_scores(self, matrix: sp.csr_matrix) -> np.ndarray:
        """Raw program scores [n, P] (float64) of linear values over the panel."""
        x = log1p_cp10k(matrix)
        out = np.zeros((x.shape[0], self.n_programs))
        for a, b, _, z in self._blocks(x):
            for p, genes in enumerate(self.program_genes):
                out[a:b, p] = z[:, genes].mean(axis=1)
        return out

    def facts(self, matrix: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
        """(program scores [n, P] float32, standardised; marker panel indices [n, N_MARKERS] int32, -1 padded)."""
        if self.program_mean is None or self.program_sd is None:
            raise ValueError("program standardisation not fitted")
        x = log1p_cp10k(matrix)
        scores = np.zeros((x.shape[0], self.n_programs))
        markers = np.full((x.shape[0], N_MARKERS), -1, dtype=np.int32)
        eligible = (self.detected >= MIN_DETECTION) & (self.gene_sd > 0)
        sd = np.where(self.program_sd > 0, self.program_sd, 1.0)
        for a, b, dense, z in self._blocks(x):
            for p, genes in enumerate(self.program_genes):
                scores[a:b, p] = (z[:, genes].mean(axis=1) - self.program_mean[p]) / sd[p]
            candidate = np.where(eligible & (dense > 0) & (z > 0), z, -np.inf)
            order = np.argsort(-candidate, axis=1, kind="stable")[:, :N_MARKERS]
            picked = np.take_along_axis(candidate, order, axis=1)
            k = order.shape[1]
            markers[a:b, :k] = np.where(np.isfinite(picked), order, -1)
        return scores.astype(np.float32), markers

    def arrays(self) -> dict[str, np.ndarray]:
        """The model as 1-D arrays for the corpus store (``facts/`` group)."""
        lengths = np.array([len(g) for g in self.program_genes], dtype=np.int64)
        return {"gene_mean": self.gene_mean.astype(np.float64), "gene_sd": self.gene_sd.astype(np.float64),
                "gene_detected": self.detected.astype(np.float64),
                "program_mean": np.asarray(self.program_mean, dtype=np.float64),
                "program_sd": np.asarray(self.program_sd, dtype=np.float64),
                "program_indptr": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
                "program_genes": (np.concatenate(self.program_genes) if self.program_genes
                                  else np.zeros(0)).astype(np.int64)}

    @classmethod
    def from_arrays(cls, symbols, names: list[str], left_out: dict[str, int], arrays: dict) -> FactModel:
        ptr, genes = arrays["program_indptr"], arrays["program_genes"]
        return cls(np.asarray(symbols, dtype=object), arrays["gene_mean"], arrays["gene_sd"], arrays["gene_detected"],
                   list(names), [np.asarray(genes[ptr[i]:ptr[i + 1]], dtype=np.int64) for i in range(len(names))],
                   dict(left_out), arrays["program_mean"], arrays["program_sd"])

    def manifest(self) -> dict:
        """The manifest's ``facts`` entry (what the arrays mean, where the sets come from)."""
        table = hallmark_sets()
        return {"version": FACTS_VERSION,
                "programs": {"names": self.program_names, "n_genes": [int(len(g)) for g in self.program_genes],
                             "left_out": self.left_out, "min_genes": MIN_SET_GENES, "method": PROGRAM_METHOD,
                             "source": table["source"], "set_version": table["version"],
                             "licence": table["licence"], "citation": table["citation"]},
                "markers": {"n_stored": N_MARKERS, "min_detection": MIN_DETECTION,
                            "statistic": "z-score of log1p CP10k against the training split's gene mean/sd, among "
                                         "genes the cell expresses with z > 0",
                            "gene_names": "NCBI Gene (Entrez Gene 2022-Sep12) via Debian r-bioc-org.hs.eg.db 3.16"},
                "reference_split": "train"}
