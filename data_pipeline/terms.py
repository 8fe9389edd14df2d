"""Which ontology each kind of term scmm takes must come from, and the one check every entry point makes.

A cell type is a Cell Ontology (CL) term; a tissue an UBERON term (or a CL term: the CELLxGENE schema's tissue of
a cell culture); a disease a MONDO term or PATO:0000461 ("normal", a healthy donor). Every place an ontology ID
enters scmm (obs columns, ``--label-map`` values, ``--holdout-types``, ``--labels``, an index's label column)
calls :func:`check_term`: a known term of another ontology (``UBERON:0000178``, blood, given as a cell type) is
refused as firmly as an unknown one. :func:`looks_like_term_id` tells IDs from free text: a value written as
``PREFIX:LOCAL`` or ``PREFIX_LOCAL`` whose prefix names an ontology the schema knows (any case) and whose local
part holds a digit; anything else (``cluster_a``, ``weird blob cells``) is free text.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from scmm.data_pipeline.ontology import NORMAL_DISEASE_ID, Ontology
from scmm.errors import ScmmError

__all__ = ["TermKind", "CELL_TYPE", "TISSUE", "DISEASE", "looks_like_term_id", "check_term", "check_terms"]

_ID = re.compile(r"^([A-Za-z][A-Za-z0-9]*?)[:_]([A-Za-z0-9]*\d[A-Za-z0-9]*)$")


@dataclass(frozen=True)
class TermKind:
    """A kind of term: the ontologies whose every term it may be, and single terms allowed besides."""

    name: str  # "cell type", as error messages say it
    ontologies: tuple[str, ...]  # prefixes, as the IDs write them
    also: tuple[str, ...]  # single terms of other ontologies that are allowed
    expected: str  # what a valid value is, for error messages


CELL_TYPE = TermKind("cell type", ("CL",), (), "a Cell Ontology term (CL:NNNNNNN)")
TISSUE = TermKind("tissue", ("UBERON", "CL"), (), "an UBERON term (or a CL term for a cell culture)")
DISEASE = TermKind("disease", ("MONDO",), (NORMAL_DISEASE_ID,), f"a MONDO term or {NORMAL_DISEASE_ID} (normal)")


_NAMES = {"CL": "Cell Ontology (CL)", "UBERON": "Uberon (UBERON)", "MONDO": "Mondo disease ontology (MONDO)"}


def _name(prefix: str) -> str:
    return _NAMES.get(prefix, prefix)


def _split(value: str, ontology: Ontology) -> tuple[str, str] | None:
    """(prefix as the schema writes it, local part) of an ID-looking value, else None."""
    m = _ID.match(value.strip()) if isinstance(value, str) else None
    if m is None:
        return None
    prefix = ontology.prefixes.get(m.group(1).upper())
    return (prefix, m.group(2)) if prefix is not None else None


def looks_like_term_id(value: str, ontology: Ontology) -> bool:
    """``value`` is written as an ontology ID (``CL:0000236``, ``cl_0000236``, ``UBERON:0000178``), not free text."""
    return _split(value, ontology) is not None


def check_term(value: str, kind: TermKind, ontology: Ontology, where: str) -> str:
    """The ID ``value`` names, in the ontology's own spelling (``cl_0000236`` -> ``CL:0000236``), when it is a known
    term of ``kind``'s ontologies; else a :class:`ScmmError` that starts with ``where`` and says what the value is
    (a term of another ontology, with its label, or no known term) and what was expected."""
    parts = _split(value, ontology)
    if parts is None:
        raise ScmmError(f"{where}: '{value}' is not an ontology ID (expected {kind.expected})")
    prefix, local = parts
    term = f"{prefix}:{local}"
    if not ontology.is_valid(term):
        raise ScmmError(f"{where}: '{value}' is not a known {_name(prefix)} term (expected {kind.expected})")
    if prefix not in kind.ontologies and term not in kind.also:
        raise ScmmError(f"{where}: '{value}' ({ontology.label(term)}) is a {_name(prefix)} term, not a {kind.name} "
                        f"(expected {kind.expected})")
    return term


def check_terms(values, kind: TermKind, ontology: Ontology, where: str) -> tuple[str, ...]:
    """:func:`check_term` of each value, duplicates dropped, order kept."""
    return tuple(dict.fromkeys(check_term(str(v), kind, ontology, where) for v in values))
