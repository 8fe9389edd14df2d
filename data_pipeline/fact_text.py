"""The cell-specific part of a caption (its most active hallmark programs and its marker genes), and the parser
that reads those claims back out of any text, generated or not.

A caption is the label template of :mod:`scmm.data_pipeline.text` followed by one sentence from
:data:`FACT_TEMPLATES` (picked by a stable hash of the cell ID, independent of the label template), e.g. "Its most
active programs are interferon-gamma response, allograft rejection and complement; it expresses high levels of
HLA-DRA (major histocompatibility complex, class II, DR alpha), LYZ (lysozyme) and CD74 (CD74 molecule)."

Programs are named by :data:`PROGRAM_PHRASES` (a fixed map from hallmark set to readable words); genes as
``SYMBOL (NCBI full name)``. :func:`parse_claims` is closed-vocabulary and exact: it finds each phrasing's lead-ins,
reads the program phrases in the program clause (longest phrase first, whole words) and the gene symbols written
as ``SYMBOL (`` in the gene clause, so a program word inside a gene name or a cell-type definition is never read as
a program claim.
"""
from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["PROGRAM_PHRASES", "FACT_TEMPLATES", "N_CAPTION_PROGRAMS", "N_CAPTION_MARKERS", "Claims",
           "display_name", "fact_sentence", "program_context", "marker_context", "fact_template_index",
           "parse_claims", "join_list", "FACT_VIEW_PARTS", "fact_view", "program_query", "type_program_query"]

N_CAPTION_PROGRAMS = 3
N_CAPTION_MARKERS = 3

PROGRAM_PHRASES: dict[str, str] = {
    "HALLMARK_ADIPOGENESIS": "adipogenesis",
    "HALLMARK_ALLOGRAFT_REJECTION": "allograft rejection",
    "HALLMARK_ANDROGEN_RESPONSE": "androgen response",
    "HALLMARK_ANGIOGENESIS": "angiogenesis",
    "HALLMARK_APICAL_JUNCTION": "apical junction",
    "HALLMARK_APICAL_SURFACE": "apical surface",
    "HALLMARK_APOPTOSIS": "apoptosis",
    "HALLMARK_BILE_ACID_METABOLISM": "bile acid metabolism",
    "HALLMARK_CHOLESTEROL_HOMEOSTASIS": "cholesterol homeostasis",
    "HALLMARK_COAGULATION": "coagulation",
    "HALLMARK_COMPLEMENT": "complement",
    "HALLMARK_DNA_REPAIR": "DNA repair",
    "HALLMARK_E2F_TARGETS": "E2F targets",
    "HALLMARK_EPITHELIAL_MESENCHYMAL_TRANSITION": "epithelial-mesenchymal transition",
    "HALLMARK_ESTROGEN_RESPONSE_EARLY": "early estrogen response",
    "HALLMARK_ESTROGEN_RESPONSE_LATE": "late estrogen response",
    "HALLMARK_FATTY_ACID_METABOLISM": "fatty acid metabolism",
    "HALLMARK_G2M_CHECKPOINT": "G2/M checkpoint",
    "HALLMARK_GLYCOLYSIS": "glycolysis",
    "HALLMARK_HEDGEHOG_SIGNALING": "hedgehog signaling",
    "HALLMARK_HEME_METABOLISM": "heme metabolism",
    "HALLMARK_HYPOXIA": "hypoxia",
    "HALLMARK_IL2_STAT5_SIGNALING": "IL-2/STAT5 signaling",
    "HALLMARK_IL6_JAK_STAT3_SIGNALING": "IL-6/JAK/STAT3 signaling",
    "HALLMARK_INFLAMMATORY_RESPONSE": "inflammatory response",
    "HALLMARK_INTERFERON_ALPHA_RESPONSE": "interferon-alpha response",
    "HALLMARK_INTERFERON_GAMMA_RESPONSE": "interferon-gamma response",
    "HALLMARK_KRAS_SIGNALING_DN": "KRAS signaling down",
    "HALLMARK_KRAS_SIGNALING_UP": "KRAS signaling up",
    "HALLMARK_MITOTIC_SPINDLE": "mitotic spindle",
    "HALLMARK_MTORC1_SIGNALING": "mTORC1 signaling",
    "HALLMARK_MYC_TARGETS_V1": "MYC targets v1",
    "HALLMARK_MYC_TARGETS_V2": "MYC targets v2",
    "HALLMARK_MYOGENESIS": "myogenesis",
    "HALLMARK_NOTCH_SIGNALING": "Notch signaling",
    "HALLMARK_OXIDATIVE_PHOSPHORYLATION": "oxidative phosphorylation",
    "HALLMARK_P53_PATHWAY": "p53 pathway",
    "HALLMARK_PANCREAS_BETA_CELLS": "pancreatic beta cell genes",
    "HALLMARK_PEROXISOME": "peroxisome",
    "HALLMARK_PI3K_AKT_MTOR_SIGNALING": "PI3K/AKT/mTOR signaling",
    "HALLMARK_PROTEIN_SECRETION": "protein secretion",
    "HALLMARK_REACTIVE_OXYGEN_SPECIES_PATHWAY": "reactive oxygen species pathway",
    "HALLMARK_SPERMATOGENESIS": "spermatogenesis",
    "HALLMARK_TGF_BETA_SIGNALING": "TGF-beta signaling",
    "HALLMARK_TNFA_SIGNALING_VIA_NFKB": "TNF-alpha signaling via NF-kB",
    "HALLMARK_UNFOLDED_PROTEIN_RESPONSE": "unfolded protein response",
    "HALLMARK_UV_RESPONSE_DN": "UV response down",
    "HALLMARK_UV_RESPONSE_UP": "UV response up",
    "HALLMARK_WNT_BETA_CATENIN_SIGNALING": "Wnt/beta-catenin signaling",
    "HALLMARK_XENOBIOTIC_METABOLISM": "xenobiotic metabolism",
}


@dataclass(frozen=True)
class FactTemplate:
    """One phrasing of the cell-specific sentence: ``{programs}`` and ``{genes}`` slots, the two lead-ins."""

    text: str
    program_lead: str
    gene_lead: str


FACT_TEMPLATES: tuple[FactTemplate, ...] = (
    FactTemplate("Its most active programs are {programs}; it expresses high levels of {genes}.",
                 "Its most active programs are", "it expresses high levels of"),
    FactTemplate("The hallmark programs most active in this cell are {programs}, and its top marker genes are "
                 "{genes}.", "The hallmark programs most active in this cell are", "its top marker genes are"),
    FactTemplate("It shows high activity of {programs}; among its most over-expressed genes are {genes}.",
                 "It shows high activity of", "among its most over-expressed genes are"),
    FactTemplate("Its transcriptome points to {programs}; it shows strong expression of {genes}.",
                 "Its transcriptome points to", "it shows strong expression of"),
)


def display_name(name: str) -> str:
    """An NCBI full name as written in parentheses in a caption: no nested parentheses, semicolons or
    sentence-ending stops (so the parser's clause ends stay unambiguous)."""
    text = name.replace(" (", ", ").replace("(", "").replace(")", "").replace(";", ",")
    return " ".join(re.sub(r"\.(\s|$)", r"\1", text).split())


def join_list(items: Sequence[str]) -> str:
    """"a", "a and b", "a, b and c"."""
    items = list(items)
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def gene_list(genes: Sequence[tuple[str, str | None]]) -> str:
    """(symbol, full name or None) pairs as captions write them: "LYZ (lysozyme) and CD74 (CD74 molecule)"."""
    return join_list([f"{s} ({display_name(n)})" if n else s for s, n in genes])


def fact_template_index(key: str) -> int:
    """Phrasing of the cell-specific sentence for ``key`` (salted so it does not follow the label template)."""
    digest = hashlib.sha256(f"facts\x1f{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % len(FACT_TEMPLATES)


def fact_sentence(programs: Sequence[str], genes: Sequence[tuple[str, str | None]], template: int) -> str:
    """The cell-specific sentence: ``programs`` are hallmark set names, ``genes`` (symbol, full name or None).
    Empty when there is nothing to say; a clause with nothing in it is left out."""
    p = join_list([PROGRAM_PHRASES.get(n, n) for n in programs])
    g = gene_list(genes)
    t = FACT_TEMPLATES[template]
    if p and g:
        return t.text.format(programs=p, genes=g)
    if p:
        return f"{t.program_lead} {p}."
    if g:
        return f"{t.gene_lead[0].upper()}{t.gene_lead[1:]} {g}."
    return ""


def program_context(programs: Sequence[str]) -> str:
    """What a stage-2 prompt is told of a cell's programs as read from its expression (``bridge.programs``), e.g.
    "Programs read from its expression: interferon-gamma response and allograft rejection." ("" for none)."""
    if not programs:
        return ""
    return f"Programs read from its expression: {join_list([PROGRAM_PHRASES.get(n, n) for n in programs])}."


def marker_context(genes: Sequence[tuple[str, str | None]]) -> str:
    """What a stage-2 prompt is told of a cell's most over-expressed genes as read from its expression
    (``bridge.markers``; (symbol, full name or None) pairs), written as captions write genes, e.g. "Genes
    over-expressed in it: LYZ (lysozyme) and CD74 (CD74 molecule)." ("" for none)."""
    if not genes:
        return ""
    return f"Genes over-expressed in it: {gene_list(genes)}."


FACT_VIEW_PARTS = ("programs and genes", "programs", "genes")


def fact_view(text: str, template: int, parts: str = "programs and genes") -> str:
    """What ``text`` claims of its cell, alone: its programs and/or genes (``parts``, one of
    :data:`FACT_VIEW_PARTS`; genes with the full names it gives) as one sentence in phrasing ``template``; empty
    when it claims none of them. Stage 1 trains on such views (``loss.fact_view``), so that a text about programs or
    genes without a cell type is aligned with the cells it describes."""
    if parts not in FACT_VIEW_PARTS:
        raise ValueError(f"parts must be one of {', '.join(FACT_VIEW_PARTS)}, not {parts!r}")
    claims = parse_claims(text)
    names: dict[str, str] = {}
    for lead in dict.fromkeys(t.gene_lead for t in FACT_TEMPLATES):  # in order: the first name given wins
        for clause in _clause_genes(text, lead):
            for symbol, name in _GENE_NAME_RE.findall(clause):
                names.setdefault(symbol, name)
    programs = claims.programs if "programs" in parts else []
    genes = [(g, names.get(g)) for g in claims.genes] if "genes" in parts else []
    return fact_sentence(programs, genes, template)


def program_query(program: str, high: bool = True) -> str:
    """The search text for a program: "cells with high <phrase> activity"."""
    return f"cells with {'high' if high else 'low'} {PROGRAM_PHRASES.get(program, program)} activity"


def type_program_query(cell_type: str, program: str, high: bool = True) -> str:
    """The text-to-cell text: "<type> with high <phrase> activity"."""
    return f"{cell_type} with {'high' if high else 'low'} {PROGRAM_PHRASES.get(program, program)} activity"


@dataclass
class Claims:
    """What a text claims: hallmark set names (in order, no repeats) and gene symbols as written."""

    programs: list[str] = field(default_factory=list)
    genes: list[str] = field(default_factory=list)


_PHRASE_TO_PROGRAM = {v.lower(): k for k, v in PROGRAM_PHRASES.items()}
_PHRASE_RE = re.compile(r"(?<![\w/-])(" + "|".join(re.escape(p) for p in sorted(_PHRASE_TO_PROGRAM, key=len,
                                                                                   reverse=True)) + r")(?![\w/-])",
                        re.IGNORECASE)
_GENE_RE = re.compile(r"(?<![\w.-])([A-Za-z0-9][A-Za-z0-9.\-]*) \(")
_GENE_NAME_RE = re.compile(r"(?<![\w.-])([A-Za-z0-9][A-Za-z0-9.\-]*) \(([^()]*)\)")
_CLAUSE_END = re.compile(r";|\.(?:\s|$)")


def _clause(text: str, lead: str, stops: Sequence[str]) -> list[str]:
    """The text after each occurrence of ``lead`` up to the next clause end or stop lead-in."""
    out = []
    low = text.lower()
    start = low.find(lead.lower())
    while start >= 0:
        a = start + len(lead)
        end = len(text)
        m = _CLAUSE_END.search(text, a)
        if m:
            end = m.start()
        for s in stops:
            j = low.find(s.lower(), a)
            if 0 <= j < end:
                end = j
        out.append(text[a:end])
        start = low.find(lead.lower(), a)
    return out


def parse_claims(text: str) -> Claims:
    """The programs and genes a text claims in any of :data:`FACT_TEMPLATES`' phrasings (module docstring)."""
    claims = Claims()
    gene_leads = [t.gene_lead for t in FACT_TEMPLATES]
    for t in FACT_TEMPLATES:
        for clause in _clause(text, t.program_lead, gene_leads):
            for m in _PHRASE_RE.finditer(clause):
                name = _PHRASE_TO_PROGRAM[m.group(1).lower()]
                if name not in claims.programs:
                    claims.programs.append(name)
    seen_gene_clauses = set()
    for lead in gene_leads:
        for clause in _clause_genes(text, lead):
            if clause in seen_gene_clauses:
                continue
            seen_gene_clauses.add(clause)
            for m in _GENE_RE.finditer(clause):
                if m.group(1) not in claims.genes:
                    claims.genes.append(m.group(1))
    return claims


def _clause_genes(text: str, lead: str) -> list[str]:
    """Gene clauses: after the lead-in up to a sentence end outside parentheses."""
    out = []
    low = text.lower()
    start = low.find(lead.lower())
    while start >= 0:
        a = start + len(lead)
        depth, end = 0, len(text)
        for i in range(a, len(text)):
            ch = text[i]
            if ch == "(":
                depth += 1
            elif ch == ")":
                depth = max(depth - 1, 0)
            elif depth == 0 and ch == "." and (i + 1 == len(text) or text[i + 1].isspace()):
                end = i
                break
        out.append(text[a:end])
        start = low.find(lead.lower(), a)
    return out
