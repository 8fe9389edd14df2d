"""`scmm package`: one self-contained model folder for inference (layout: :mod:`scmm.model.folders`).

    scmm package --stage1 DIR --corpus DIR [--stage2 DIR] [--metrics FILE] --out DIR

Written atomically (a temporary folder beside ``out``, renamed into place when complete); an existing package at
``out`` is replaced, any other existing path is an error. When the metrics file records a novelty reference
(``annotation.calibration.novelty_reference``, written by ``scmm eval``), the ``novelty_reference.npz`` beside it
goes into the package too (checked against the sha256 the metrics record; a missing or different file is an
error), so that ``scmm annotate`` can apply the novelty check. Each part is stored once: the stage-2 folder goes in
without its copy of the stage-1 model, which must then be the ``--stage1`` given.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import scmm
from scmm.atomic import write_folder
from scmm.config import read_json
from scmm.data_pipeline.encoding import ENCODING_FILE, CellEncoding
from scmm.data_pipeline.store import Corpus
from scmm.errors import ScmmError
from scmm.eval.report import main_table, retrieval_table
from scmm.model.aligner import CellTextAligner
from scmm.model.folders import (
    MANIFEST,
    NOT_IN_FINGERPRINT,
    NOVELTY_FILE,
    PACKAGE_FORMAT,
    files_of,
    manifest_digest,
    model_kind,
    sha256_file,
)
from scmm.model.pretrained import FORMATS, read_labels, write_corpus_facts, write_marker

log = logging.getLogger("scmm.package")

__all__ = ["package_model"]


def _model_card(manifest: dict, corpus_manifest: dict, labels: list[dict], metrics: dict | None,
                encoding: CellEncoding, aligner_cfg: dict) -> str:
    ct = aligner_cfg.get("cell_tower", {})
    lines = [
        "# scmm model", "",
        "A scMMGPT-style cell–text model: a cell tower (scGPT-compatible expression transformer) aligned with a "
        "text tower through a Q-Former" + (", with a stage-2 LLM bridge for descriptions." if "stage2" in
                                           manifest["components"] else "."), "",
        f"- format: `{PACKAGE_FORMAT}` version {FORMATS[PACKAGE_FORMAT].version}, written by scmm "
        f"{manifest['scmm_version']} on {manifest['created']}",
        f"- components: {', '.join(manifest['components'])}",
        f"- cell tower: d_model {ct.get('d_model')}, {ct.get('nlayers')} layers, {ct.get('nhead')} heads; "
        f"embedding width {aligner_cfg.get('qformer', {}).get('embed_dim')} (`obsm['X_scmm']`)",
        f"- value encoding: {'binned, ' + str(encoding.n_bins) + ' bins' if encoding.n_bins else 'continuous'}"
        f" log1p of counts per {encoding.target_sum:g} (`stage1/{ENCODING_FILE}`)", "",
        "## Training data", "",
        f"- corpus: {corpus_manifest.get('n_cells')} cells, {corpus_manifest.get('n_genes')} genes "
        f"(gene vocabulary `{corpus_manifest.get('vocab', {}).get('name')}`), input normalization "
        f"`{corpus_manifest.get('normalization')}`",
        "- splits: " + ", ".join(f"{k} {v}" for k, v in corpus_manifest.get("splits", {}).items()) +
        f" (grouped by `{corpus_manifest.get('split_group_by')}`)",
        f"- {len(labels)} cell types:", "",
        "| CL ID | label | cells |", "|---|---|---:|"]
    lines += [f"| {r['cell_type_ontology_term_id'] or '–'} | {r['label']} | {r['count']} |" for r in labels]
    lines += ["", "## Evaluation", ""]
    if metrics:
        try:
            lines += [main_table(metrics), ""]
            if metrics.get("annotation") and metrics.get("retrieval"):
                lines += ["Retrieval:", "", retrieval_table(metrics), ""]
            cal = (metrics.get("annotation") or {}).get("calibration")
            wu = (metrics.get("annotation") or {}).get("with_unknown")
            if cal:
                rate = cal.get("unknown_rate")
                lines += [f"Confidence, 'unknown' and back-off, chosen on the val split and applied by `scmm "
                          f"annotate`: temperature {cal['temperature']:.4g}; a cell whose calibrated confidence is "
                          f"below {cal['threshold']:.3f} is `unknown`"
                          + (f" ({rate:.1%} of val cells)" if rate is not None else "")
                          + (f"; a cell whose expression profile is unlike the training cells' (similarity to the "
                             f"nearest ones below {cal['novelty_threshold']:.3f}, `obs['scmm_novelty']`) is "
                             f"`unknown` too (the novelty check, reference in `{NOVELTY_FILE}`)"
                             if cal.get("novelty_threshold") is not None else "")
                          + f"; candidates within {cal['margin']:.3f} of the top one back off to their common "
                          "Cell Ontology ancestor (`obs['scmm_cell_type_level']`). Change the threshold with "
                          "`--unknown-rate R` or `--unknown-threshold C`.", ""]
            elif wu:
                lines += [f"'unknown' threshold chosen on the val split: cosine similarity {wu['threshold']:.3f} "
                          "(from an earlier scmm: this scmm's `--unknown-threshold` is a calibrated confidence).",
                          ""]
        except Exception:  # a metrics file of another shape: show it as is
            lines += ["```json", json.dumps(metrics, indent=1)[:20000], "```", ""]
    else:
        lines += ["No metrics.json was packaged (run `scmm eval` and package with `--metrics`).", ""]
    lines += [
        "## Usage", "",
        "```bash",
        "scmm embed    IN.h5ad --model THIS_FOLDER --out OUT.h5ad        # obsm['X_scmm']",
        "scmm annotate IN.h5ad --model THIS_FOLDER --out OUT.h5ad [--labels CL:0000236,CL:0000084] "
        "[--unknown-rate 0.05 | --unknown-threshold 0.3] [--smooth]",
        "scmm describe IN.h5ad --model THIS_FOLDER --out OUT.h5ad        # obs['scmm_description'] (stage 2)",
        "scmm index build REF.h5ad --model THIS_FOLDER --label-column cell_type --out REF_INDEX",
        "scmm index query REF_INDEX IN.h5ad --model THIS_FOLDER --out OUT.h5ad",
        "```", "",
        "```python",
        "import anndata, scmm.api as scmm",
        "model = scmm.load_model('THIS_FOLDER')",
        "adata = scmm.annotate(anndata.read_h5ad('IN.h5ad'), model)   # a new AnnData; the input is not changed",
        "adata.obs[['scmm_cell_type', 'scmm_cell_type_ontology_term_id', 'scmm_confidence']]",
        "```", "",
        "Input: an h5ad with raw counts (`layers['counts']`, `.raw.X` or `.X`) or log1p-normalised values; genes "
        "as symbols (`var['feature_name']` or the var names) or Ensembl IDs.", ""]
    return "\n".join(lines)



def _check_inputs(stage1: Path, corpus_dir: Path, out: Path, stage2: Path | None, metrics: Path | None) -> None:
    if model_kind(stage1) != "stage1":
        raise ScmmError(f"{stage1} is not a stage-1 model folder; give --stage1 the stage-1 model folder")
    if out.resolve() in (stage1.resolve(), corpus_dir.resolve()):
        raise ScmmError("--out must differ from the inputs")
    if stage2 is not None:
        if model_kind(stage2) != "stage2":
            raise ScmmError(f"{stage2} is not a stage-2 model folder")
        theirs = files_of(stage2 / "stage1", skip=NOT_IN_FINGERPRINT)
        if theirs != files_of(stage1, skip=NOT_IN_FINGERPRINT):
            raise ScmmError(f"the stage-2 model {stage2} was trained on another stage-1 model than {stage1} (or "
                            f"fine-tuned it); package it with --stage1 {stage2 / 'stage1'}")
    if metrics is not None and not metrics.is_file():
        raise ScmmError(f"metrics file not found: {metrics}")


def _novelty_file(metrics: Path | None, metrics_data: dict | None) -> Path | None:
    """The novelty reference to package: the file beside the metrics when they record one (module docstring)."""
    cal = ((metrics_data or {}).get("annotation") or {}).get("calibration") if metrics_data else None
    ref = cal.get("novelty_reference") if isinstance(cal, dict) else None
    if metrics is None or not isinstance(ref, dict) or ref.get("space") != "expression":
        return None  # none, or an earlier scmm's (embedding space), which annotate no longer applies
    path = metrics.parent / NOVELTY_FILE
    if not path.is_file():
        raise ScmmError(f"the metrics file {metrics} records a novelty reference, but {path} is missing (package "
                        f"the metrics.json together with the {NOVELTY_FILE} scmm eval wrote beside it)")
    if ref.get("sha256") and sha256_file(path) != ref["sha256"]:
        raise ScmmError(f"{path} is not the novelty reference the metrics file {metrics} was computed with "
                        "(its sha256 differs)")
    return path


def package_model(stage1: Path, corpus: Path, out: Path, stage2: Path | None = None,
                  metrics: Path | None = None) -> Path:
    """Write the packaged model folder ``out`` (see :mod:`scmm.model.folders`); returns ``out``."""
    stage1, corpus_dir, out = Path(stage1), Path(corpus), Path(out)
    stage2 = Path(stage2) if stage2 is not None else None
    metrics = Path(metrics) if metrics is not None else None
    _check_inputs(stage1, corpus_dir, out, stage2, metrics)
    aligner = CellTextAligner.from_pretrained(stage1)  # checks that the weights load
    corpus_obj = Corpus(corpus_dir)
    aligner.vocab.check_panel(corpus_obj.gene_symbols, corpus_obj.gene_vocab_ids, f"the corpus {corpus_dir}")
    metrics_data = read_json(metrics, "metrics file") if metrics is not None else None
    if metrics_data is not None and not isinstance(metrics_data, dict):
        raise ScmmError(f"metrics file {metrics} must hold a JSON object")
    novelty = _novelty_file(metrics, metrics_data)
    encoding, aligner_cfg = aligner.encoding, asdict(aligner.config)
    del aligner
    components = ["stage1"] + (["stage2"] if stage2 is not None else []) + (["metrics"] if metrics else [])

    def write(tmp: Path) -> None:
        shutil.copytree(stage1, tmp / "stage1", ignore=shutil.ignore_patterns(".*"))
        if stage2 is not None:  # its stage1/ is the one above: stored once
            shutil.copytree(stage2, tmp / "stage2", ignore=lambda d, names: [
                n for n in names if n.startswith(".") or (Path(d) == stage2 and n == "stage1")])
        cm = corpus_obj.manifest
        write_corpus_facts(tmp, corpus_obj)
        labels = read_labels(tmp)
        if metrics is not None:
            shutil.copyfile(metrics, tmp / "metrics.json")
        if novelty is not None:
            shutil.copyfile(novelty, tmp / NOVELTY_FILE)
        manifest = {"format": PACKAGE_FORMAT, "format_version": FORMATS[PACKAGE_FORMAT].version,
                    "scmm_version": scmm.__version__,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "components": components,
                    "corpus": {k: cm.get(k) for k in ("n_cells", "n_genes", "normalization", "splits", "vocab")}}
        (tmp / "README.md").write_text(_model_card(manifest, cm, labels, metrics_data, encoding, aligner_cfg))
        manifest["files"] = files_of(tmp)
        manifest["manifest_sha256"] = manifest_digest(manifest)
        write_marker(tmp, PACKAGE_FORMAT, {k: v for k, v in manifest.items() if k not in ("format", "format_version")})

    write_folder(out, write, marker=MANIFEST)  # replaces an earlier package, and nothing else
    log.info("packaged %s (%s)", out, ", ".join(components))
    return out
