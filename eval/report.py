"""``report.md`` of an evaluation run: scmm side by side with the baselines, per task.

:func:`main_table` is the headline (``make demo`` prints it): method | accuracy | macro-F1 for scmm's
zero-shot annotation by text, scmm + kNN smoothing and each baseline. :func:`write_report` adds the run's
context (model, corpus, splits, seeds, value encoding), the ontology-aware scores, the 'unknown' threshold,
retrieval, the per-class table and links to the PNGs. Both read the ``metrics`` dict of
:func:`eval.harness.evaluate` (the content of ``metrics.json``) and, for the report, a ``context`` dict.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from scmm.eval.language_report import language_section

__all__ = ["main_table", "retrieval_table", "generation_section", "stage2_table", "pseudocell_section",
           "write_report", "METHOD_NAMES"]

# display names of the rows; the metrics key is shown beside each
METHOD_NAMES = {
    "scmm": "scmm (zero-shot by text)",
    "scmm_knn_smoothing": "scmm + kNN smoothing",
    "majority": "majority class",
    "logistic_regression": "logistic regression (log1p HVG)",
    "pca_knn": "PCA + 15-NN (log1p HVG)",
}
BASELINE_ORDER = ("scmm_knn_smoothing", "majority", "logistic_regression", "pca_knn")


def _f(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _table(header: list[str], rows: list[list[Any]], align: list[str] | None = None) -> str:
    align = align or ["---"] + ["---:"] * (len(header) - 1)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(_f(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _method(name: str) -> str:
    shown = METHOD_NAMES.get(name, name)
    return shown if name == "scmm" else f"{shown} (`{name}`)"


def main_table(metrics: Mapping[str, Any]) -> str:
    """Markdown table: method | accuracy | macro-F1 (scmm, scmm + kNN smoothing, baselines).

    Without an annotation section (e.g. only retrieval ran) the retrieval table is returned instead.
    """
    ann = metrics.get("annotation")
    if not ann:
        return retrieval_table(metrics) if metrics.get("retrieval") else "(no annotation or retrieval metrics)"
    rows = [[_method("scmm"), ann["accuracy"], ann["macro_f1"]]]
    baselines = metrics.get("baselines", {})
    names = [n for n in BASELINE_ORDER if n in baselines] + sorted(n for n in baselines if n not in BASELINE_ORDER)
    rows += [[_method(n), baselines[n]["accuracy"], baselines[n]["macro_f1"]] for n in names]
    return _table(["method", "accuracy", "macro-F1"], rows)


def retrieval_table(metrics: Mapping[str, Any]) -> str:
    """Markdown table of recall@k, label recall@k and mean rank, cell->text and text->cell."""
    r = metrics.get("retrieval") or {}
    ks = sorted({int(k.rsplit("@", 1)[1]) for k in r if k.startswith("cell_to_text_recall@")})
    header = ["direction"] + [f"R@{k}" for k in ks] + [f"label R@{k}" for k in ks] + ["mean rank"]
    rows = []
    for prefix, label in (("cell_to_text", "cell → text"), ("text_to_cell", "text → cell")):
        rows.append([label] + [r.get(f"{prefix}_recall@{k}") for k in ks]
                    + [r.get(f"{prefix}_label_recall@{k}") for k in ks] + [r.get(f"{prefix}_mean_rank")])
    return _table(header, rows)


def generation_section(g: Mapping[str, Any], examples: list[Mapping[str, Any]] | None = None) -> list[str]:
    """Markdown lines of the description / cell-type answer section (stage 2)."""
    split = g.get("split", "test")
    lines = [f"## Descriptions and cell-type answers (stage 2, {split} split)", "",
             f"Each of the {g.get('n_cells', '?')} {split} cells is described by the LLM from its soft cell tokens "
             "(BLEU and ROUGE against the cell's own text) and asked for its cell type; the CL term read from the "
             "answer is scored by accuracy and the ontology path score, with free decoding and with decoding "
             "constrained to Cell Ontology names (a prefix tree over labels and synonyms).", "",
             _table(["BLEU-2", "BLEU-4", "ROUGE-1", "ROUGE-L"],
                    [[g.get("bleu2"), g.get("bleu4"), g.get("rouge1"), g.get("rougeL")]], ["---:"] * 4), "",
             _table(["cell-type answer", "accuracy", "ontology score", "answers naming a CL term"],
                    [["free decoding", g.get("type_accuracy"), g.get("ontology_score"), g.get("valid_answer_rate")],
                     ["constrained to Cell Ontology names", g.get("type_accuracy_constrained"),
                      g.get("ontology_score_constrained"), g.get("valid_answer_rate_constrained")]]), ""]
    sc = g.get("scored")
    if sc:
        lines += [f"Scored over the corpus's cell types (the LLM's probability of each type's name as the answer, "
                  f"calibrated on {sc.get('n_val_cells')} val cells: T = {_f(sc.get('temperature'), 4)}; when the top "
                  f"two differ by less than {_f(sc.get('margin'))} the answer is their lowest informative common "
                  "Cell Ontology ancestor, as for the annotation):", "",
                  _table(["accuracy", "lineage accuracy", "lineage accuracy with back-off", "accuracy with back-off",
                          "backed off", "ECE"],
                         [[sc.get("accuracy"), sc.get("lineage_accuracy"), sc.get("lineage_accuracy_backoff"),
                           sc.get("accuracy_backoff"), sc.get("backoff_rate"), sc.get("ece")]], ["---:"] * 6), ""]
    if examples:
        lines += ["### Examples", ""]
        for e in examples:
            lines += [f"- `{e.get('cell_id')}` (`{e.get('true')}`): **{e.get('type_answer')}** — "
                      f"{e.get('description')}", f"  - reference: {e.get('reference')}"]
        lines.append("")
    return lines


def stage2_table(metrics: Mapping[str, Any]) -> str:
    """Markdown table of the stage-2 headline figures (empty string when stage 2 was not evaluated)."""
    rows = []
    g = metrics.get("generation")
    if g:
        rows += [["cell-type answer accuracy (free / constrained)",
                  f"{_f(g.get('type_accuracy'))} / {_f(g.get('type_accuracy_constrained'))}"],
                 ["description BLEU-4 / ROUGE-L", f"{_f(g.get('bleu4'))} / {_f(g.get('rougeL'))}"]]
        if "repeated_phrase_rate" in g:
            rows.append(["descriptions that repeat a 4-word phrase", _f(g["repeated_phrase_rate"])])
        if g.get("scored"):
            rows.append(["cell-type answer scored over the corpus's types: accuracy; lineage accuracy without / "
                         "with back-off", f"{_f(g['scored']['accuracy'])}; {_f(g['scored']['lineage_accuracy'])} / "
                         f"{_f(g['scored']['lineage_accuracy_backoff'])}"])
        if "type_accuracy_unseen_phrasing" in g:
            rows.append(["cell-type answer accuracy, question in phrasings never trained on",
                         _f(g["type_accuracy_unseen_phrasing"])])
    p = metrics.get("pseudocell")
    if p:
        for name, sp in (p.get("spaces") or {p.get("space"): p}).items():
            rows.append([f"pseudo-cell {p.get('k')}-NN accuracy, {name} (real train cells / class-mean reference / "
                         "random)", f"{_f(sp.get('knn_accuracy'))} ({_f(sp.get('real_cells_reference'))} / "
                         f"{_f(sp.get('class_mean_reference'))} / {_f(sp.get('random_baseline'))})"])
        for name, sp in ((p.get("unseen_phrasing") or {}).get("spaces") or {}).items():
            rows.append([f"pseudo-cell {p.get('k')}-NN accuracy, {name}, from ontology texts never trained on",
                         _f(sp.get("knn_accuracy"))])
        if p.get("zero_fraction_ratio") is not None:
            rows.append(["pseudo-cells' share of zero genes over real cells' (1 = as sparse)",
                         _f(p["zero_fraction_ratio"])])
    return _table(["stage 2", "value"], rows, ["---", "---:"]) if rows else ""


SPACE_NAMES = {"expression_pca": "expression PCA (log1p HVG, PCA fitted on train)",
               "stage1_embedding": "stage-1 cell embedding"}


def pseudocell_section(p: Mapping[str, Any]) -> list[str]:
    """Markdown lines of the pseudo-cell k-NN section from a :func:`eval.pseudocell.pseudocell_report` dict."""
    spaces = p.get("spaces") or {p.get("space", "expression_pca"): p}
    k = p.get("k", "?")
    lines = ["## Pseudo-cells: k-NN accuracy against real held-out cells", "",
             f"Each pseudo-cell takes its {k} nearest real cells of the "
             f"{'+'.join(p.get('reference_splits') or ['val', 'test'])} split(s) "
             f"({p.get('n_reference', '?')} cells, {p.get('n_genes', '?')} panel genes) and hits when their majority "
             "label is the type it was generated from. Class-mean reference: cells drawn gene by gene from each type's "
             "train statistics (detected with the type's detection rate, then its mean detected value plus noise "
             "of its spread), as many cells as pseudo-cells, scored the same way. Real train cells: as many real "
             "training cells of each type, scored the same way (how recognisable a cell that is of the type is). "
             "Random: 1 / number of types scored.", ""]
    rows = []
    for name, sp in spaces.items():
        rows.append([SPACE_NAMES.get(name, name) + f" (`{name}`)", sp.get("knn_accuracy"),
                     sp.get("real_cells_reference"), sp.get("class_mean_reference"), sp.get("random_baseline"),
                     sp.get("n_types_scored"), sp.get("n_scored")])
    lines += [_table(["space", "scmm", "real train cells", "class-mean reference", "random", "types scored",
                      "pseudo-cells scored"], rows), ""]
    first = next(iter(spaces.values()), {})
    per_type = first.get("per_type") or {}
    if per_type:
        header = ["cell type"] + [f"{n} scmm" if len(spaces) == 1 else f"{n}: scmm" for n in spaces] + \
            [f"{n}: class mean" for n in spaces] + ["pseudo-cells", "reference cells"]
        prow = []
        for t, row in per_type.items():
            prow.append([f"`{t}`"] + [(spaces[n].get("per_type") or {}).get(t, {}).get("accuracy") for n in spaces]
                        + [(spaces[n].get("per_type") or {}).get(t, {}).get("class_mean_accuracy") for n in spaces]
                        + [row.get("n"), row.get("n_reference")])
        lines += ["### Per type", "", _table(header, prow, ["---"] + ["---:"] * (len(header) - 1)), ""]
    sparsity = p.get("zero_fraction") or {}
    if sparsity:
        lines += [f"Sparsity: pseudo-cells' share of zero panel genes over the reference cells' of their type, "
                  f"averaged over types: **{_f(p.get('zero_fraction_ratio'))}** (1 = as sparse as real cells).", "",
                  _table(["cell type", "pseudo-cells' zeros", "real cells' zeros", "ratio"],
                         [[f"`{t}`", r["pseudo"], r["real"], r["ratio"]] for t, r in sparsity.items()],
                         ["---", "---:", "---:", "---:"]), ""]
    excluded = first.get("excluded_types") or {}
    if excluded:
        lines += [f"Left out of the accuracy (fewer than k = {k} reference cells, a majority vote cannot pick them): "
                  + ", ".join(f"`{t}` ({n})" for t, n in sorted(excluded.items())) + ".", ""]
    for note in p.get("notes") or []:
        lines.append(f"- {note}")
    if p.get("notes"):
        lines.append("")
    return lines


def _context_header(c: Mapping[str, Any]) -> list[str]:
    """Title and the run's context: model, corpus, splits, tasks and seeds, value encoding, wall time."""
    lines = ["# scmm evaluation", ""]
    lines += [f"- model: `{c.get('model', '?')}`", f"- corpus: `{c.get('corpus', '?')}`"]
    splits = c.get("splits") or {}
    if splits:
        lines.append("- splits (cells): " + ", ".join(f"{k} {v}" for k, v in splits.items())
                     + f"; split seed {c.get('split_seed', '?')}, grouped by {c.get('split_group_by', '?')}")
    lines.append(f"- tasks: {', '.join(c.get('tasks', []))}; evaluation seed {c.get('seed', 0)}"
                 + (f"; {c['n_cell_types']} cell types in the corpus" if "n_cell_types" in c else ""))
    if "encoding" in c:
        e = c["encoding"]
        enc = "continuous log1p values" if e.get("n_bins", 0) == 0 else f"{e.get('n_bins')} value bins"
        genes = "every expressed gene" if not e.get("inference_max_len") else f"at most {e['inference_max_len']} tokens"
        lines.append(f"- value encoding (the model's own): {enc}, {genes} per cell")
    if "seconds" in c:
        lines.append(f"- wall time: {c['seconds']} s")
    lines.append("")
    return lines


def _annotation_intro(metrics: Mapping[str, Any], c: Mapping[str, Any], det: Mapping[str, Any]) -> list[str]:
    """How scmm and the baselines predict, then :func:`main_table`."""
    hvg = f" on {det['n_hvg']} genes (the train split's most variable, at most 2,000)" if "n_hvg" in det else ""
    return ["## Cell-type annotation (test split)", "",
            f"scmm predicts the candidate label ({c.get('labels', 'corpus cell types')}, "
            f"{len(det.get('candidates', [])) or '?'} candidates) whose text is most similar to the cell "
            "embedding; the baselines are fitted on the train split" + hvg + ".", "",
            main_table(metrics), ""]


def _ontology_scores(ann: Mapping[str, Any], det: Mapping[str, Any]) -> list[str]:
    """Path and PPR scores of scmm and of each baseline with details."""
    bdet = det.get("baselines") or {}
    rows = [[_method("scmm"), ann.get("ontology_score"), ann.get("ppr_score")]]
    rows += [[_method(n), bdet[n].get("ontology_score"), bdet[n].get("ppr_score")]
             for n in BASELINE_ORDER if n in bdet]
    return ["### Ontology-aware scores", "",
            "Partial credit for near misses in the Cell Ontology (1 exact, 0 unrelated): the path score "
            "(0.8 per step through the closest shared informative ancestor) and the two-way "
            "Personalized-PageRank similarity; definitions in `eval/ontology_score.py`.", "",
            _table(["method", "ontology score", "PPR score"], rows), ""]


def _unknown_option(ann: Mapping[str, Any], det: Mapping[str, Any] | None = None) -> list[str]:
    """Calibrated confidence, the 'unknown' threshold and the ontology back-off chosen on val, their test figures,
    and the held-out (unseen) types (or why they were not evaluated)."""
    wu = ann.get("with_unknown")
    if not wu:
        return ["### Confidence, 'unknown' and back-off", "",
                "Not evaluated (no val split to choose the threshold on).", ""]
    rate = ann.get("unknown_rate")
    lines = ["### Confidence, 'unknown' and back-off", "",
             f"Chosen on the val split ({wu.get('n_val_cells', '?')} cells; never on test): the temperature of the "
             f"confidence (softmax of similarity / T, fitted by NLL) T = {_f(ann.get('temperature'), 4)}; the "
             f"threshold below which a cell is `unknown`, {_f(ann.get('threshold'))}"
             + (f" (a new in-distribution cell abstains with probability at most {rate:.1%})"
                if isinstance(rate, float) else " (set directly)")
             + (f", or whose expression profile's similarity to the nearest training cells is below "
                f"{_f(ann['novelty_threshold'])} (the novelty check, `eval/novelty.py`; the rate is split between "
                "the two; its threshold is calibrated on "
                + _novelty_calibration_text(ann) + ")"
                if ann.get("novelty_threshold") is not None else "")
             + f"; the back-off margin {_f(ann.get('margin'))} (when the top two candidates' probabilities differ "
             "by less, the answer is their lowest informative common Cell Ontology ancestor). Over the test cells "
             "of seen types; lineage accuracy counts an answer that is the truth or one of its ancestors; "
             "definitions in `eval/calibration.py`.", "",
             _table(["figure", "value"], [
                 ["expected calibration error (15 bins; at the contrastive temperature)",
                  f"{_f(ann.get('ece'))} ({_f(ann.get('ece_uncalibrated'))})"],
                 *([["expected calibration error of a perfectly calibrated model with these confidences, on as many "
                     "cells (mean; 10th-90th percentile)", f"{_f(ann['ece_floor'])} ({_f(ann.get('ece_floor_p10'))}-"
                     f"{_f(ann.get('ece_floor_p90'))})"]] if "ece_floor" in ann else []),
                 *([["val abstain rate (the check that the stated rate holds) / target",
                     f"{_f(ann['val_abstain_rate'])} / {_f(rate)}"]]
                   if "val_abstain_rate" in ann and isinstance(rate, float) else []),
                 ["abstain rate (`unknown`)", ann.get("abstain_rate")],
                 *([["abstain rate by the novelty check", ann["abstain_rate_novelty"]]]
                   if "abstain_rate_novelty" in ann else []),
                 ["exact accuracy without / with back-off",
                  f"{_f(ann.get('accuracy'))} / {_f(ann.get('accuracy_backoff'))}"],
                 ["lineage accuracy without / with back-off",
                  f"{_f(ann.get('lineage_accuracy'))} / {_f(ann.get('lineage_accuracy_backoff'))}"],
                 ["ontology score without / with back-off",
                  f"{_f(ann.get('ontology_score'))} / {_f(ann.get('ontology_score_backoff'))}"],
                 ["cells backed off (mean level, ontology steps up)",
                  f"{_f(ann.get('backoff_rate'))} ({_f(ann.get('backoff_mean_level'), 2)})"]], ["---", "---:"]), "",
             "Final answers (abstention, then back-off; `unknown` counts wrong, kept figures are over the other "
             "cells):", "",
             _table(["accuracy", "lineage accuracy", "ontology score", "unknown rate", "kept accuracy",
                     "kept lineage accuracy"],
                    [[wu.get("accuracy"), wu.get("lineage_accuracy"), wu.get("ontology_score"),
                      wu.get("unknown_rate"), wu.get("kept_accuracy"), wu.get("kept_lineage_accuracy")]],
                    ["---:"] * 6), ""]
    un = ann.get("unseen")
    if un:
        names = (det or {}).get("holdout_types") or {}
        shown = ", ".join(f"{names.get(t, t)} (`{t}`)" for t in un.get("types", [])) or "–"
        lines += ["#### Held-out (unseen) types", "",
                  f"Types kept out of train and val when the corpus was built: {shown}; their "
                  f"{un.get('n_cells')} test cells are never a candidate answer.", "",
                  _table(["unknown or a correct ancestor", "unknown", "unknown by novelty", "a correct ancestor",
                          "AUROC seen vs unseen: abstention score", "confidence", "novelty similarity"],
                         [[un.get("unknown_or_ancestor_rate"), un.get("unknown_rate"), un.get("novel_rate", "–"),
                           un.get("ancestor_rate"), un.get("auroc"), un.get("auroc_confidence", "–"),
                           un.get("auroc_novelty", "–")]], ["---:"] * 7), ""]
    fo = ann.get("foreign")
    if fo:
        lines += ["#### Foreign cells", "",
                  f"{fo.get('n_cells')} synthetic cells made unlike the corpus (made-up expression programmes on "
                  "the genes the train split detects least; `eval/foreign.py`), annotated as `scmm annotate` would: "
                  "a model should call them `unknown`.", "",
                  _table(["unknown", "unknown by novelty"], [[fo.get("unknown_rate"), fo.get("novel_rate", "–")]],
                         ["---:"] * 2), ""]
    return lines


def _novelty_calibration_text(ann: Mapping[str, Any]) -> str:
    """Which cells the novelty threshold was calibrated on (``annotation.calibration.novelty_calibration``)."""
    nc = (ann.get("calibration") or {}).get("novelty_calibration") or {}
    if not nc:
        return "the val cells"
    left = {"donor_id": "its own donor", "dataset_id": "its own dataset"}.get(nc.get("left_out"), "itself")
    return (f"the {nc.get('n_cells')} training cells' similarity to the other training cells, each leaving out "
            f"{left}")


def _per_class(det: Mapping[str, Any]) -> list[str]:
    """scmm's per-class precision / recall / F1 table (nothing without one)."""
    per_class = det.get("per_class") or []
    if not per_class:
        return []
    return ["### Per class (scmm)", "",
            _table(["cell type", "label", "precision", "recall", "F1", "support"],
                   [[r["name"], f"`{r['label']}`", r["precision"], r["recall"], r["f1"], r["support"]]
                    for r in per_class], ["---", "---"] + ["---:"] * 4), ""]


def _annotation_section(metrics: Mapping[str, Any], c: Mapping[str, Any]) -> list[str]:
    """The annotation section and its subsections (nothing when annotation was not evaluated)."""
    ann = metrics.get("annotation")
    if not ann:
        return []
    det = c.get("annotation") or {}
    return (_annotation_intro(metrics, c, det) + _ontology_scores(ann, det) + _unknown_option(ann, det)
            + _per_class(det)
            + [f"Cells of seen types: {ann.get('n_cells')} (of {ann.get('n_test_cells', ann.get('n_cells'))} test "
               f"cells), classes among them: {ann.get('n_classes')}.", ""])


def _retrieval_section(metrics: Mapping[str, Any]) -> list[str]:
    """Cell <-> text retrieval: what R@k means, then :func:`retrieval_table`."""
    ret = metrics.get("retrieval")
    if not ret:
        return []
    return ["## Cell ↔ text retrieval (test split)", "",
            f"Each of the {ret.get('n_pairs', '?')} test cells is paired with its own text. R@k: the exact "
            "pair within the top k (ties shared); label R@k: any of the top k has the query's cell type.", "",
            retrieval_table(metrics), ""]


def _stage2_sections(metrics: Mapping[str, Any], c: Mapping[str, Any]) -> list[str]:
    """The description / cell-type answer section and the pseudo-cell section, those that were evaluated."""
    lines = []
    if metrics.get("generation"):
        lines += generation_section(metrics["generation"], c.get("generation_examples"))
    if metrics.get("pseudocell"):
        lines += pseudocell_section(metrics["pseudocell"])
    return lines


PLOT_TITLES = {"confusion_matrix.png": "Confusion matrix (scmm, test split)",
               "reliability.png": "Reliability of the calibrated confidence (seen-type test cells)",
               "umap.png": "UMAP of test cell embeddings, by true and by predicted type"}


def _plots_section(metrics: Mapping[str, Any], c: Mapping[str, Any]) -> list[str]:
    """Links to the annotation's PNGs (nothing without annotation or PNGs)."""
    pngs = ((c.get("annotation") or {}).get("pngs") or []) if metrics.get("annotation") else []
    if not pngs:
        return []
    lines = ["## Plots", ""]
    for p in pngs:
        lines += [f"![{PLOT_TITLES.get(p, p)}]({p})", ""]
    return lines


def _notes_section(c: Mapping[str, Any]) -> list[str]:
    """The context's notes as a list (nothing without notes)."""
    notes = c.get("notes") or []
    if not notes:
        return []
    return ["## Notes", ""] + [f"- {n}" for n in notes] + [""]


def write_report(metrics: Mapping[str, Any], out_dir: str | Path, context: Mapping[str, Any]) -> Path:
    """Write ``out_dir/report.md`` and return its path."""
    out = Path(out_dir) / "report.md"
    c = dict(context)
    lines = _context_header(c)
    lines += _annotation_section(metrics, c)
    lines += _retrieval_section(metrics)
    lines += _stage2_sections(metrics, c)
    lines += language_section(metrics.get("language"), metrics.get("generation"), c.get("language_examples"))
    lines += _plots_section(metrics, c)
    lines += _notes_section(c)
    out.write_text("\n".join(lines).rstrip() + "\n")
    return out
