"""Ontology-grounded natural-language descriptions of cells.

Each cell gets one sentence naming its cell type first (with tissue and disease), then the cell type's CL
definition, then donor and assay details when known. Several phrasings (``TEMPLATES``) vary the wording; the
phrasing of a cell is picked from a stable hash of its key (cell ID), so corpora are reproducible across
processes. :func:`label_texts` gives every phrasing of a cell type alone, for zero-shot annotation by text.
"""
from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from scmm.data_pipeline.ontology import NORMAL_DISEASE_ID, Ontology, get_ontology
from scmm.data_pipeline.store import Corpus

__all__ = ["CellMetadata", "TEMPLATES", "corpus_labels", "describe", "label_texts", "metadata_from_obs",
           "template_index"]


class Template(NamedTuple):
    """One phrasing. ``main`` has slots {a} (article), {ct} (label), {tissue}, {disease}; the others take one value."""

    main: str
    tissue: str
    healthy: str
    disease: str
    donor: str
    assay: str


TEMPLATES: tuple[Template, ...] = (
    Template("{a} {ct}{tissue}{disease}", " from the {}", " of a healthy donor", " of a donor with {}",
             "It was sampled from a {}", "It was profiled with {}"),
    Template("This cell is {a} {ct}{tissue}{disease}", ", found in the {}", ", from a healthy donor",
             ", from a donor with {}", "The sample comes from a {}", "The assay used was {}"),
    Template("Single-cell transcriptome of {a} {ct}{tissue}{disease}", " in the {}", " from a healthy individual",
             " from a patient with {}", "The cell was obtained from a {}", "Expression was measured by {}"),
    Template("The cell type is {ct}{tissue}{disease}", ", sampled from the {}", "; the donor is healthy",
             "; the donor has {}", "The donor is a {}", "The data come from {}"),
    Template("An expression profile of {a} {ct}{tissue}{disease}", " isolated from the {}", " of a healthy donor",
             " of a donor diagnosed with {}", "It derives from a {}", "It was sequenced with {}"),
)

SKIP_VALUES = frozenset({"", "unknown", "na", "nan", "none"})
ORGANISM_NAMES = {"Homo sapiens": "human", "Mus musculus": "mouse"}
ORGANISM_IDS = {"NCBITaxon:9606": "Homo sapiens", "NCBITaxon:10090": "Mus musculus"}
_TERM_ID = re.compile(r"^[A-Za-z]+[:_][A-Za-z0-9]+$")


@dataclass(frozen=True)
class CellMetadata:
    """What a description may say about one cell; every field but the cell type is optional."""

    cell_type_id: str
    cell_type: str
    tissue_id: str | None = None
    tissue: str | None = None
    disease_id: str | None = None
    disease: str | None = None
    sex: str | None = None
    development_stage: str | None = None
    assay: str | None = None
    organism: str | None = None


def _clean(value: Any) -> str | None:
    """A usable string, or None for missing/placeholder values (None, NaN, "", "unknown", "na")."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = " ".join(str(value).split())
    return None if text.lower() in SKIP_VALUES else text


def _term_label(ontology: Ontology, label: Any, term_id: Any) -> str | None:
    """The given label, else the ontology label of ``term_id`` (``A || B`` joined with "and"), else the raw
    value when it is not an ontology ID; None when nothing usable remains."""
    label = _clean(label)
    if label is not None:
        return label
    term_id = _clean(term_id)
    if term_id is None:
        return None
    parts = []
    for part in (p.strip() for p in term_id.split("||")):
        if part in ORGANISM_IDS:  # spares loading NCBITaxon (~15 s) for the common organisms
            parts.append(ORGANISM_IDS[part])
        elif ontology.is_valid(part):
            parts.append(ontology.label(part))
        elif not _TERM_ID.match(part):
            parts.append(part)
    return " || ".join(parts) or None


def _article(phrase: str) -> str:
    """ "a" or "an" for a noun phrase, reading leading initialisms letter by letter (an NK cell, a CD4 cell)."""
    word = phrase.split()[0] if phrase.split() else ""
    if re.match(r"^[A-Z]{2,}|^[A-Z](\d|$|-)", word) and word[:4] != "MAIT":
        return "an" if word[0] in "AEFHILMNORSX" else "a"
    lower = word.lower()
    if re.match(r"^(8|11|18)(\D|$)", lower):
        return "an"
    if re.match(r"^(uni|uro|ure|uri|use|usu|ute|uve|eu|one)", lower):
        return "a"
    return "an" if lower[:1] in set("aeiou") else "a"


def _sentence(text: str) -> str:
    """Capitalise the first letter and end with a full stop."""
    text = " ".join(text.split())
    if not text:
        return ""
    text = text[0].upper() + text[1:]
    return text if text[-1] in ".!?" else text + "."


def _compose(t: Template, cell_type: str, definition: str | None, tissue: str | None = None,
             disease: str | None = None, healthy: bool = False, donor: str | None = None,
             assay: str | None = None, facts: str | None = None) -> str:
    main = t.main.format(
        a=_article(cell_type), ct=cell_type,
        tissue=t.tissue.format(tissue) if tissue else "",
        disease=t.healthy if healthy else (t.disease.format(disease) if disease else ""),
    )
    sentences = [main, facts, definition, t.donor.format(donor) if donor else None,
                 t.assay.format(assay) if assay else None]
    return " ".join(_sentence(s) for s in sentences if s)


def template_index(key: str) -> int:
    """Phrasing chosen for ``key``: a stable hash (SHA-256), identical in every process."""
    digest = hashlib.sha256(str(key).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % len(TEMPLATES)


def _cell_type_definition(ontology: Ontology, cell_type_id: str | None) -> str | None:
    if not cell_type_id or not cell_type_id.startswith("CL:") or not ontology.is_valid(cell_type_id):
        return None
    return ontology.definition(cell_type_id)


def _disease_phrase(meta: CellMetadata, ontology: Ontology) -> tuple[str | None, bool]:
    """(disease text, healthy?): "normal"/PATO:0000461 means a healthy donor."""
    ids = [p.strip() for p in (_clean(meta.disease_id) or "").split("||") if p.strip()]
    label = _term_label(ontology, meta.disease, meta.disease_id)
    labels = [p.strip() for p in (label or "").split("||") if p.strip()]
    sick = [lab for lab in labels if lab.lower() != "normal"]
    if (ids and all(i == NORMAL_DISEASE_ID for i in ids)) or (labels and not sick):
        return None, True
    return (" and ".join(sick) or None), False


def _donor_phrase(meta: CellMetadata, ontology: Ontology) -> str | None:
    sex = _clean(meta.sex)
    organism = _clean(meta.organism)
    stage = _clean(meta.development_stage)
    if not (sex or organism or stage):
        return None
    words = [w for w in (sex, ORGANISM_NAMES.get(organism or "", organism)) if w] + ["donor"]
    if stage:
        words.append(f"at the {stage}" if "stage" in stage.lower() else f"at the {stage} stage")
    return " ".join(words)


def describe(meta: CellMetadata, key: str, ontology: Ontology, facts: str | None = None) -> str:
    """Description of one cell; the phrasing is ``TEMPLATES[template_index(key)]``.

    Says the cell type (with its CL definition when it has one), tissue, disease ("healthy" for
    normal/PATO:0000461), then sex/organism/development stage and assay; missing or placeholder fields are skipped.
    ``facts``: the cell-specific sentence (:func:`scmm.data_pipeline.fact_text.fact_sentence`), placed right after
    the first sentence, so that a text encoder's length limit keeps it.
    """
    cell_type = _term_label(ontology, meta.cell_type, meta.cell_type_id)
    if cell_type is None:
        raise ValueError(f"cell {key!r} has no cell type label")
    disease, healthy = _disease_phrase(meta, ontology)
    return _compose(
        TEMPLATES[template_index(key)], cell_type, _cell_type_definition(ontology, meta.cell_type_id),
        tissue=_term_label(ontology, meta.tissue, meta.tissue_id), disease=disease, healthy=healthy,
        donor=_donor_phrase(meta, ontology), assay=_clean(meta.assay), facts=facts or None,
    )


def label_texts(cell_type_id: str, ontology: Ontology, label: str | None = None) -> list[str]:
    """Every phrasing of a cell type alone (label + CL definition), as training texts phrase it.

    ``cell_type_id`` may be a CL ID (label defaults to its ontology label) or free text (no definition).
    """
    definition = _cell_type_definition(ontology, cell_type_id)
    if label is None:
        label = ontology.label(cell_type_id) if ontology.is_valid(cell_type_id) else cell_type_id
    label = " ".join(label.split())
    return [_compose(t, label, definition) for t in TEMPLATES]


def corpus_labels(corpus: Corpus) -> list[dict]:
    """The cell types of a corpus as candidate labels: key (CL ID, or ``unmatched:<label>`` for a kept free-text
    label), CL ID, label, cell count and every phrasing of the type alone (:func:`label_texts`).

    Held-out types (:attr:`Corpus.holdout_types`) are left out: the candidates are the types a model trained on
    the corpus has seen (this list also feeds a package's ``labels.json`` and stage 1's text centre)."""
    ontology = get_ontology()
    out = []
    held = set(corpus.holdout_types)
    for key in corpus.cell_types:
        if key in held:
            continue
        rec = corpus.manifest["cell_types"][key]
        if key.startswith("unmatched:"):
            text = key[len("unmatched:"):]
            out.append({"key": key, "cell_type_ontology_term_id": "", "label": text, "count": int(rec["count"]),
                        "texts": label_texts(text, ontology, label=text)})
        else:
            out.append({"key": key, "cell_type_ontology_term_id": key, "label": rec["label"],
                        "count": int(rec["count"]), "texts": label_texts(key, ontology)})
    return out


def metadata_from_obs(row: Mapping[str, Any], ontology: Ontology) -> CellMetadata:
    """Metadata from a CELLxGENE-schema obs row (a dict or a pandas Series).

    Labels missing from the row are looked up from the ``*_ontology_term_id`` columns; IDs the ontology cannot
    resolve are skipped. Raises ValueError when the row has no usable cell type.
    """
    get = row.get

    cell_type_id = _clean(get("cell_type_ontology_term_id"))
    cell_type = _term_label(ontology, get("cell_type"), cell_type_id)
    if cell_type_id is None and cell_type is not None:
        cell_type_id = ontology.match_cell_type(cell_type)
    if cell_type_id is None or cell_type is None:
        raise ValueError(f"obs row has no usable cell type (cell_type_ontology_term_id="
                         f"{get('cell_type_ontology_term_id')!r}, cell_type={get('cell_type')!r})")

    def field(name: str) -> str | None:
        return _term_label(ontology, get(name), get(f"{name}_ontology_term_id"))

    return CellMetadata(
        cell_type_id=cell_type_id, cell_type=cell_type,
        tissue_id=_clean(get("tissue_ontology_term_id")), tissue=field("tissue"),
        disease_id=_clean(get("disease_ontology_term_id")), disease=field("disease"),
        sex=field("sex"), development_stage=field("development_stage"), assay=field("assay"),
        organism=field("organism"),
    )
