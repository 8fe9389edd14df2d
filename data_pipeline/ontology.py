"""Cached, offline access to the CELLxGENE ontologies (CL, UBERON, MONDO, PATO, HsapDv, EFO, ...).

A thin wrapper over ``cellxgene_ontology_guide``: the ontology a term belongs to is its prefix, and all data
comes from the package's bundled files (no network). Unknown prefixes or IDs are never valid, and ``label``
raises ``KeyError`` naming the term. The special CELLxGENE values ``"unknown"`` and ``"na"`` are not ontology
terms (``is_valid`` is False) but have a label (themselves) and no definition, parents or ancestors.
"""
from __future__ import annotations

import functools
import re
import unicodedata
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from cellxgene_ontology_guide.ontology_parser import OntologyParser

__all__ = ["Ontology", "get_ontology", "normalise_label", "NORMAL_DISEASE_ID", "SPECIAL_VALUES"]

NORMAL_DISEASE_ID = "PATO:0000461"  # "normal": the disease value of healthy donors
SPECIAL_VALUES = frozenset({"unknown", "na"})  # CELLxGENE values that are valid but not ontology terms
_ID_PATTERN = re.compile(r"^([A-Za-z]+)[:_][A-Za-z0-9]+$")
_CL_ID_PATTERN = re.compile(r"^CL[:_](\d{7})$", re.IGNORECASE)


def normalise_label(text: str) -> str:
    """Normalise a cell-type label for exact matching.

    Case-folded; ``CD14+`` reads as ``CD14-positive`` and a trailing ``CD25-`` as ``CD25-negative``;
    punctuation other than the prime ``'`` and runs of whitespace become single spaces; ``cells`` becomes ``cell``.
    """
    s = unicodedata.normalize("NFKC", text).casefold()
    s = re.sub(r"(?<=[a-z0-9])\+", "-positive ", s)
    s = re.sub(r"(?<=[a-z0-9])-(?=$|[\s/,;)])", "-negative ", s)
    s = re.sub(r"[^\w']+|_+", " ", s).strip()  # keep primes: "Bm2' B cell" is not "Bm2 B cell"
    return re.sub(r"\bcells\b", "cell", s)


class Ontology:
    """Read-only view of the ontologies of one CELLxGENE schema version (default: the newest bundled one)."""

    def __init__(self, schema_version: str | None = None) -> None:
        self._schema_version = schema_version
        self._children_index: dict[str, dict[str, list[str]]] = {}

    # -- internals ---------------------------------------------------------------------------------------
    @functools.cached_property
    def _parser(self) -> Any:
        return OntologyParser(self._schema_version)

    def _ontology_name(self, term_id: str) -> str | None:
        """Name of the supported ontology that holds ``term_id`` (from its prefix), or None."""
        m = _ID_PATTERN.match(term_id) if isinstance(term_id, str) else None
        if not m:
            return None
        schema = self._parser.cxg_schema
        prefix = m.group(1)
        if prefix in schema.supported_ontologies:
            return prefix
        return schema.imported_ontologies.get(prefix)

    def _term(self, term_id: str) -> dict[str, Any] | None:
        name = self._ontology_name(term_id)
        if name is None:
            return None
        try:
            terms = self._parser.cxg_schema.ontology(name)
        except (ValueError, OSError):  # ontology listed but its data file is not bundled
            return None
        return terms.get(term_id)

    def _require(self, term_id: str) -> dict[str, Any]:
        term = self._term(term_id)
        if term is None:
            raise KeyError(f"unknown ontology term {term_id!r}")
        return term

    @functools.cached_property
    def prefixes(self) -> dict[str, str]:
        """Every ontology prefix the schema knows (supported and imported), upper-cased -> as the IDs write it."""
        schema = self._parser.cxg_schema
        names = [*schema.supported_ontologies, *schema.imported_ontologies]
        return {name.upper(): name for name in names}

    # -- term lookups ------------------------------------------------------------------------------------
    def is_valid(self, term_id: str) -> bool:
        """True if ``term_id`` is defined in a supported ontology (deprecated terms included).

        ``PATO:0000461`` ("normal", the healthy disease value) is valid; the special values "unknown"/"na"
        are not ontology terms and give False (see :meth:`is_special`).
        """
        return self._term(term_id) is not None

    @staticmethod
    def is_special(value: str) -> bool:
        """True for the CELLxGENE placeholder values "unknown" and "na"."""
        return isinstance(value, str) and value.strip().lower() in SPECIAL_VALUES

    def label(self, term_id: str) -> str:
        """Human-readable label. Raises KeyError naming the term if it is unknown."""
        if self.is_special(term_id):
            return term_id.strip().lower()
        return str(self._require(term_id)["label"])

    def definition(self, term_id: str) -> str | None:
        """Textual definition, or None if the term has none. Raises KeyError for unknown terms."""
        if self.is_special(term_id):
            return None
        text = self._require(term_id).get("description")
        return " ".join(text.split()) if text else None

    def synonyms(self, term_id: str) -> list[str]:
        """Synonyms (possibly empty). Raises KeyError for unknown terms."""
        if self.is_special(term_id):
            return []
        return list(self._require(term_id).get("synonyms", []))

    def parents(self, term_id: str) -> list[str]:
        """Direct parents (distance 1 in the guide's graph: is_a, plus part_of where the guide encodes it)."""
        if self.is_special(term_id):
            return []
        return [t for t, d in self._require(term_id)["ancestors"].items() if d == 1]

    def ancestors(self, term_id: str) -> list[str]:
        """All ancestors, nearest first, excluding the term itself. Raises KeyError for unknown terms."""
        if self.is_special(term_id):
            return []
        anc = self._require(term_id)["ancestors"]
        return sorted(anc, key=lambda t: (anc[t], t))

    def children(self, term_id: str) -> list[str]:
        """Direct children (sorted). Raises KeyError for unknown terms."""
        if self.is_special(term_id):
            return []
        self._require(term_id)
        name = self._ontology_name(term_id)
        assert name is not None
        if name not in self._children_index:
            index: dict[str, list[str]] = defaultdict(list)
            for child, meta in self._parser.cxg_schema.ontology(name).items():
                for parent, dist in meta["ancestors"].items():
                    if dist == 1:
                        index[parent].append(child)
            self._children_index[name] = {p: sorted(c) for p, c in index.items()}
        return list(self._children_index[name].get(term_id, []))

    # -- free-text cell-type matching --------------------------------------------------------------------
    @functools.cached_property
    def _cell_type_index(self) -> tuple[dict[str, str | None], dict[str, str | None]]:
        """(normalised label -> CL ID, normalised synonym -> CL ID) over non-deprecated CL terms.

        A key shared by several terms maps to None (ambiguous: never matched).
        """
        cl = self._parser.cxg_schema.ontology("CL")

        def add(index: dict[str, str | None], text: str, term_id: str) -> None:
            key = normalise_label(text)
            if key and index.get(key, term_id) != term_id:
                index[key] = None
            elif key:
                index[key] = term_id

        labels: dict[str, str | None] = {}
        synonyms: dict[str, str | None] = {}
        for label, term_id in self._parser.get_term_label_to_id_map("CL").items():
            if not cl[term_id].get("deprecated", False):
                add(labels, label, term_id)
        for term_id, meta in cl.items():
            if not meta.get("deprecated", False):
                for syn in meta.get("synonyms", []):
                    add(synonyms, syn, term_id)
        return labels, synonyms

    def match_cell_type(self, text: str) -> str | None:
        """Map a free-text cell-type label (or a CL ID) to a CL ID, or None.

        Order: a valid CL ID as such (``CL_0000001`` is read as ``CL:0000001``); the exact label; an exact
        synonym; then the same with a plural final ``s`` dropped. Matching ignores case, punctuation and
        whitespace (see :func:`normalise_label`); ambiguous or unknown text gives None (no fuzzy guessing).
        """
        if not isinstance(text, str) or not text.strip():
            return None
        m = _CL_ID_PATTERN.match(text.strip())
        if m:
            term_id = f"CL:{m.group(1)}"
            return term_id if self.is_valid(term_id) else None
        labels, synonyms = self._cell_type_index
        key = normalise_label(text)
        keys = [key, key[:-1]] if re.search(r"[^s]s$", key) else [key]  # "monocytes" -> "monocyte"
        for k in keys:
            for index in (labels, synonyms):
                if k in index:
                    return index[k]
        return None

    def resolve_cell_types(self, values: Iterable[str]) -> tuple[dict[str, str], list[str]]:
        """Match each distinct value: ({value: CL ID} for matched values, sorted list of unmatched values)."""
        matched: dict[str, str] = {}
        unmatched: set[str] = set()
        for value in dict.fromkeys(str(v) for v in values):
            term_id = self.match_cell_type(value)
            if term_id is None:
                unmatched.add(value)
            else:
                matched[value] = term_id
        return matched, sorted(unmatched)


@functools.cache
def get_ontology(schema_version: str | None = None) -> Ontology:
    """Process-wide shared :class:`Ontology` (the data is read-only)."""
    return Ontology(schema_version)

