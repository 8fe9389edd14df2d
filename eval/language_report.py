"""The report.md section of ``language.*`` (:mod:`scmm.eval.language`): each faithfulness figure beside its
type-template baseline, and the descriptions' fluency with and without the decoding defaults."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from scmm.data_pipeline.fact_text import PROGRAM_PHRASES

__all__ = ["language_section"]


def _f(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return "nan" if v != v else f"{v:.3f}"
    return str(v)


def language_section(lang: Mapping[str, Any] | None, generation: Mapping[str, Any] | None = None,
                     examples: list[Mapping[str, Any]] | None = None) -> list[str]:
    """Markdown lines (nothing when the section was not computed)."""
    if not lang:
        return []
    lines = ["## Language about each cell: faithfulness (test split)", ""]
    if "absent" in lang:
        return lines + [f"Not measured: {lang['absent']}.", ""]
    lines += [f"Claims read from the generated descriptions of {lang.get('n_cells')} seen-type test cells with the "
              f"closed-vocabulary parser, checked against the cell's facts ({lang.get('n_programs')} hallmark "
              "programs scored at corpus build; top 3 programs, top 20 over-expressed genes). The baseline is a "
              "type template: for every cell of a type, the programs and markers most common among that type's "
              "training cells (what the label alone tells).", "",
              "| figure | scmm | type-template baseline |", "|---|---:|---:|"]
    pc, mc = lang.get("program_claims") or {}, lang.get("marker_claims") or {}
    if pc:
        lines += [f"| program claims: precision / recall / F1 | {_f(pc.get('precision'))} / {_f(pc.get('recall'))} / "
                  f"{_f(pc.get('f1'))} | F1 {_f(pc.get('baseline_f1'))} |",
                  f"| program claims: F1 within type (mean over types) | {_f(pc.get('f1_within_type'))} | "
                  f"{_f(pc.get('baseline_f1_within_type'))} |"]
    if mc:
        lines += [f"| marker claims: precision (named genes among the top 20) | {_f(mc.get('precision'))} | "
                  f"{_f(mc.get('baseline_precision'))} |",
                  f"| marker claims: named symbols not in the corpus genes | {_f(mc.get('unknown_rate'))} | |"]
    se = lang.get("search") or {}
    if se:
        lines += [f"| search \"cells with high <program> activity\": AUROC (top quartile), mean over programs | "
                  f"{_f(se.get('auroc'))} | 0.5 (random) |",
                  f"| search: AUROC within type | {_f(se.get('auroc_within_type'))} | 0.5 (random) |"]
    tc = lang.get("text_to_cell") or {}
    if tc:
        lines += [f"| text to cell: program score AUROC, high vs low text ({tc.get('n_programs')} programs) | "
                  f"{_f(tc.get('auroc'))} | 0.5 (random) |"]
    an = lang.get("answers") or {}
    if an:
        ap, am = an.get("program_claims") or {}, an.get("marker_claims") or {}
        lines += [f"| answers to \"Which programs are active in this cell?\": F1 / F1 within type | "
                  f"{_f(ap.get('f1'))} / {_f(ap.get('f1_within_type'))} | {_f(ap.get('baseline_f1'))} / "
                  f"{_f(ap.get('baseline_f1_within_type'))} |",
                  f"| answers to \"Which genes does it express highly?\": precision | {_f(am.get('precision'))} | "
                  f"{_f(am.get('baseline_precision'))} |"]
        rk = an.get("ranked_programs") or {}
        if rk:
            lines += [f"| the LLM's 3 likeliest programs as that answer (teacher forcing, no decoding): precision / "
                      f"within type (chance {_f(rk.get('chance'))}) | {_f(rk.get('precision'))} / "
                      f"{_f(rk.get('precision_within_type'))} | {_f(rk.get('baseline_precision'))} |"]
    rd = lang.get("reader") or {}
    if "auroc" in rd:
        lines += [f"| the program reader (what the LLM reads of the cell's programs): AUROC / within type | "
                  f"{_f(rd.get('auroc'))} / {_f(rd.get('auroc_within_type'))} | 0.5 (random) |",
                  f"| the program reader's 3 highest programs: precision / within type | "
                  f"{_f(rd.get('top_precision'))} / {_f(rd.get('top_precision_within_type'))} | |"]
    if "marker_precision" in rd:
        lines += [f"| the marker reader's 3 genes (what the LLM reads of the cell's markers): precision | "
                  f"{_f(rd.get('marker_precision'))} | |"]
    g = generation or {}
    if "repeated_phrase_rate" in g:
        lines += [f"| descriptions repeating a 4-word phrase (decoding defaults / raw decoder) | "
                  f"{_f(g.get('repeated_phrase_rate'))} / {_f(g.get('repeated_phrase_rate_raw'))} | |"]
    lines.append("")
    if examples:
        lines += [f"### Descriptions of {len(examples)} {examples[0].get('type')} test cells, with their facts", ""]
        for e in examples:
            programs = ", ".join(PROGRAM_PHRASES.get(p, p) for p in e.get("top_programs", []))
            lines += [f"- `{e.get('cell_id')}`: {e.get('description')}",
                      f"  - true top programs: {programs}; first markers: {', '.join(e.get('markers', []))}"]
        lines.append("")
    return lines
