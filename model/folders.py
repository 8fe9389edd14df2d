"""The packaged scmm model: one self-contained folder for inference, and `load_model` to open it.

    scmm package --stage1 DIR --corpus DIR [--stage2 DIR] [--metrics FILE] --out DIR

Layout of a packaged model folder (written atomically: a temporary folder beside ``out``, renamed into
place when complete; an existing package at ``out`` is replaced, any other existing path is an error)::

    scmm_model.json   format "scmm-model", format_version, scmm version, created, components,
                      files: {relative path: sha256} of every other file (checked on load)
    stage1/           copy of the stage-1 model folder (CellTextAligner) incl. loader.json
    stage2/           copy of the stage-2 model folder (only when given)
    labels.json       candidate labels of the training corpus: key (CL ID or `unmatched:<label>`), CL ID,
                      label, count, and the label texts whose mean text embedding is the label's prototype
    genes.json        the training corpus's gene panel (vocabulary ids and symbols): inference keeps only
                      these genes, since genes never seen in training have untrained embeddings
    metrics.json      evaluation metrics (only when given)
    README.md         model card: training data, evaluation table, usage

:func:`load_model` opens a packaged folder (checksums verified) or, for convenience, a bare stage-1 model
folder (e.g. ``runs/demo/stage1/model``); for the latter the labels and gene panel come from the training
corpus named by the stage-1 run config one level up (``../config.json`` key ``corpus``) when it can be
found, else there are none (annotation then needs explicit labels, and all vocabulary genes are used).

The model *fingerprint* (used by reference indexes) is a sha256 over the stage-1 files that decide the
embedding (everything but ``loader.json``/``train_summary.json``) and the value encoding of the loader
settings, so a bare stage-1 folder and its package share one fingerprint.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from scmm.atomic import publish_dir, temp_dir_beside
from scmm.errors import ScmmError

log = logging.getLogger("scmm.package")

FORMAT = "scmm-model"
FORMAT_VERSION = 1
MANIFEST = "scmm_model.json"
_NOT_IN_FINGERPRINT = ("loader.json", "train_summary.json")
_ENCODING_KEYS = ("n_bins", "pad_value", "target_sum")


# --- hashing ----------------------------------------------------------------------------------------
def sha256_file(path: Path, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def _files_of(folder: Path) -> dict[str, str]:
    """{relative posix path: sha256} of every regular file under ``folder`` (hidden temp files skipped)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts):
            out[p.relative_to(folder).as_posix()] = sha256_file(p)
    return out


def fingerprint(stage1_files: dict[str, str], loader_cfg) -> str:
    """sha256 identifying the embedding a stage-1 model computes (see the module docstring)."""
    files = {k: v for k, v in stage1_files.items() if k.split("/")[-1] not in _NOT_IN_FINGERPRINT}
    enc = {k: getattr(loader_cfg, k) for k in _ENCODING_KEYS}
    blob = json.dumps({"files": files, "encoding": enc}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()


# --- labels -----------------------------------------------------------------------------------------
def corpus_labels(corpus) -> list[dict]:
    """Candidate labels of a corpus, with the texts of their prototypes (as :mod:`eval.annotate` builds them)."""
    from scmm.data_pipeline.ontology import get_ontology
    from scmm.data_pipeline.text import label_texts
    ontology = get_ontology()
    out = []
    for key in corpus.cell_types:
        rec = corpus.manifest["cell_types"][key]
        if key.startswith("unmatched:"):
            text = key[len("unmatched:"):]
            out.append({"key": key, "cell_type_ontology_term_id": "", "label": text, "count": int(rec["count"]),
                        "texts": label_texts(text, ontology, label=text)})
        else:
            out.append({"key": key, "cell_type_ontology_term_id": key, "label": rec["label"],
                        "count": int(rec["count"]), "texts": label_texts(key, ontology)})
    return out


def corpus_panel(corpus) -> dict:
    return {"vocab_ids": [int(i) for i in corpus.gene_vocab_ids],
            "symbols": [str(s) for s in corpus.gene_symbols]}


# --- the model object -------------------------------------------------------------------------------
@dataclass
class ScmmModel:
    """What inference needs: the aligner (stage 1), loader settings, candidate labels, lazy stage 2."""

    folder: Path
    aligner: Any  # model.aligner.CellTextAligner, eval mode, fp32
    loader_config: Any  # data_pipeline.loader.LoaderConfig (value encoding)
    labels: list[dict] | None  # labels.json "labels" (None: unknown; pass labels explicitly)
    panel_vocab_ids: Any  # np.ndarray of training-panel vocabulary ids, or None (use all vocabulary genes)
    fingerprint: str
    stage2_folder: Path | None = None
    packaged: bool = False
    metrics: dict | None = None
    _stage2: Any = field(default=None, repr=False)

    @property
    def vocab(self) -> dict[str, int]:
        return self.aligner.vocab

    @property
    def has_stage2(self) -> bool:
        return self.stage2_folder is not None

    @property
    def stage2(self):
        """The stage-2 model (`finetune.model.Stage2Model`), loaded on first use."""
        if self._stage2 is None:
            if self.stage2_folder is None:
                raise ScmmError(f"model {self.folder} has no stage-2 part (LLM bridge): describing cells needs a "
                                f"package made with `scmm package ... --stage2 DIR`")
            try:
                from scmm.model.stage2 import Stage2Model
            except ImportError as exc:
                raise ScmmError(f"the stage-2 code is not available in this installation ({exc})") from None
            self._stage2 = Stage2Model.from_pretrained(self.stage2_folder)
        return self._stage2


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ScmmError(f"{what} is missing: {path}") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ScmmError(f"{what} {path} is unreadable ({exc})") from None


def _load_aligner(folder: Path):
    from scmm.model.aligner import CellTextAligner
    if not (folder / "config.json").is_file():
        raise ScmmError(f"{folder} is not an scmm model folder (no config.json)")
    return CellTextAligner.from_pretrained(folder).float().eval()


def _verify(folder: Path, manifest: dict) -> None:
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise ScmmError(f"{folder}/{MANIFEST} lists no files")
    for rel, digest in files.items():
        p = folder / rel
        if not p.is_file():
            raise ScmmError(f"model {folder} is incomplete: {rel} is missing")
        if sha256_file(p) != digest:
            raise ScmmError(f"model {folder} is corrupted: checksum mismatch in {rel}")


def _find_run_corpus(stage1: Path) -> Path | None:
    """The corpus of a bare stage-1 folder's run config (``../config.json`` key ``corpus``), if it exists."""
    cfg = stage1.parent / "config.json"
    if not cfg.is_file():
        return None
    try:
        raw = json.loads(cfg.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    corpus = raw.get("corpus") if isinstance(raw, dict) else None
    if not isinstance(corpus, str):
        return None
    for base in (Path.cwd(), stage1.parent, *stage1.parent.parents):
        p = Path(corpus) if Path(corpus).is_absolute() else base / corpus
        if (p / "manifest.json").is_file():
            return p
    return None


def load_model(folder: str | os.PathLike, verify: bool = True) -> ScmmModel:
    """Open a packaged model folder (or a bare stage-1 model folder); see the module docstring.

    A packaged folder of another format version, a missing or corrupted file (checksum mismatch, unreadable
    weights) is a :class:`ScmmError`.
    """
    import numpy as np
    from scmm.eval.harness import loader_config_for

    folder = Path(folder)
    if not folder.exists():
        raise ScmmError(f"model folder not found: {folder}")
    if not folder.is_dir():
        raise ScmmError(f"model {folder} is not a folder")
    if (folder / MANIFEST).exists():
        manifest = _read_json(folder / MANIFEST, "model manifest")
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise ScmmError(f"{folder}/{MANIFEST} is not an scmm model manifest")
        version = manifest.get("format_version")
        if version != FORMAT_VERSION:
            raise ScmmError(f"model {folder} has format_version {version}; this scmm reads format_version "
                            f"{FORMAT_VERSION} (repackage it with this scmm's `scmm package`)")
        if verify:
            _verify(folder, manifest)
        stage1 = folder / "stage1"
        aligner = _load_aligner(stage1)
        loader_cfg = loader_config_for(stage1)
        labels = _read_json(folder / "labels.json", "label file")["labels"] if (folder / "labels.json").exists() \
            else None
        panel = None
        if (folder / "genes.json").exists():
            panel = np.asarray(_read_json(folder / "genes.json", "gene panel")["vocab_ids"], dtype=np.int64)
        metrics = _read_json(folder / "metrics.json", "metrics") if (folder / "metrics.json").exists() else None
        s1_files = {k[len("stage1/"):]: v for k, v in manifest["files"].items() if k.startswith("stage1/")}
        return ScmmModel(folder=folder, aligner=aligner, loader_config=loader_cfg, labels=labels,
                         panel_vocab_ids=panel, fingerprint=fingerprint(s1_files, loader_cfg),
                         stage2_folder=folder / "stage2" if "stage2" in manifest.get("components", []) else None,
                         packaged=True, metrics=metrics)
    # a bare stage-1 model folder
    aligner = _load_aligner(folder)
    loader_cfg = loader_config_for(folder)
    labels = panel = None
    corpus_dir = _find_run_corpus(folder)
    if corpus_dir is not None:
        from scmm.data_pipeline.store import Corpus
        corpus = Corpus(corpus_dir)
        labels = corpus_labels(corpus)
        panel = np.asarray(corpus.gene_vocab_ids, dtype=np.int64)
        log.info("bare stage-1 model %s: candidate labels and gene panel from its training corpus %s",
                 folder, corpus_dir)
    return ScmmModel(folder=folder, aligner=aligner, loader_config=loader_cfg, labels=labels,
                     panel_vocab_ids=panel, fingerprint=fingerprint(_files_of(folder), loader_cfg))


# --- packaging --------------------------------------------------------------------------------------
def _model_card(manifest: dict, corpus_manifest: dict, labels: list[dict], metrics: dict | None,
                loader_cfg, aligner_cfg: dict) -> str:
    ct = aligner_cfg.get("cell_tower", {})
    lines = [
        "# scmm model", "",
        "A scMMGPT-style cell–text model: a cell tower (scGPT-compatible expression transformer) aligned with a "
        "text tower through a Q-Former" + (", with a stage-2 LLM bridge for descriptions." if "stage2" in
                                           manifest["components"] else "."), "",
        f"- format: `{FORMAT}` version {FORMAT_VERSION}, written by scmm {manifest['scmm_version']} on "
        f"{manifest['created']}",
        f"- components: {', '.join(manifest['components'])}",
        f"- cell tower: d_model {ct.get('d_model')}, {ct.get('nlayers')} layers, {ct.get('nhead')} heads; "
        f"embedding width {aligner_cfg.get('qformer', {}).get('embed_dim')} (`obsm['X_scmm']`)",
        f"- value encoding: {'binned, ' + str(loader_cfg.n_bins) + ' bins' if loader_cfg.n_bins else 'continuous'}"
        f" log1p of counts per {loader_cfg.target_sum:g}", "",
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
            from scmm.eval.report import main_table, retrieval_table
            lines += [main_table(metrics), ""]
            if metrics.get("annotation") and metrics.get("retrieval"):
                lines += ["Retrieval:", "", retrieval_table(metrics), ""]
            wu = (metrics.get("annotation") or {}).get("with_unknown")
            if wu:
                lines += [f"'unknown' threshold chosen on the val split: cosine similarity {wu['threshold']:.3f} "
                          f"(pass it as `--unknown-threshold`).", ""]
        except Exception:  # a metrics file of another shape: show it as is
            lines += ["```json", json.dumps(metrics, indent=1)[:20000], "```", ""]
    else:
        lines += ["No metrics.json was packaged (run `scmm eval` and package with `--metrics`).", ""]
    lines += [
        "## Usage", "",
        "```bash",
        "scmm embed    IN.h5ad --model THIS_FOLDER --out OUT.h5ad        # obsm['X_scmm']",
        "scmm annotate IN.h5ad --model THIS_FOLDER --out OUT.h5ad [--labels CL:0000236,CL:0000084] "
        "[--unknown-threshold 0.2] [--smooth]",
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


def package_model(stage1: Path, corpus: Path, out: Path, stage2: Path | None = None,
                  metrics: Path | None = None) -> Path:
    """Write the packaged model folder ``out`` (see the module docstring); returns ``out``."""
    import scmm
    from scmm.data_pipeline.store import Corpus
    from scmm.eval.harness import _check_vocab, _find_loader_config

    stage1, corpus_dir, out = Path(stage1), Path(corpus), Path(out)
    if not stage1.is_dir():
        raise ScmmError(f"stage-1 model folder not found: {stage1}")
    if (stage1 / MANIFEST).exists():
        raise ScmmError(f"{stage1} is already a packaged model; give the stage-1 model folder")
    if out.exists() and not (out.is_dir() and ((out / MANIFEST).is_file() or not any(out.iterdir()))):
        raise ScmmError(f"output {out} exists and is not an scmm model package (refusing to replace it)")
    if out.resolve() in (stage1.resolve(), corpus_dir.resolve()):
        raise ScmmError("--out must differ from the inputs")
    aligner = _load_aligner(stage1)  # checks that the weights load
    corpus_obj = Corpus(corpus_dir)
    _check_vocab(aligner.vocab, corpus_obj)
    loader_cfg, loader_source = _find_loader_config(stage1)
    if stage2 is not None:
        stage2 = Path(stage2)
        if not stage2.is_dir():
            raise ScmmError(f"stage-2 model folder not found: {stage2}")
    metrics_data = None
    if metrics is not None:
        metrics = Path(metrics)
        if not metrics.is_file():
            raise ScmmError(f"metrics file not found: {metrics}")
        metrics_data = _read_json(metrics, "metrics file")
        if not isinstance(metrics_data, dict):
            raise ScmmError(f"metrics file {metrics} must hold a JSON object")
    labels = corpus_labels(corpus_obj)
    aligner_cfg = _read_json(stage1 / "config.json", "stage-1 config")
    del aligner

    tmp = temp_dir_beside(out)
    try:
        shutil.copytree(stage1, tmp / "stage1", ignore=shutil.ignore_patterns(".*"))
        if not (tmp / "stage1" / "loader.json").exists():  # settings found beside the model: make them travel
            (tmp / "stage1" / "loader.json").write_text(json.dumps(asdict(loader_cfg), indent=1))
            log.info("loader settings from %s written to stage1/loader.json", loader_source)
        components = ["stage1"]
        if stage2 is not None:
            shutil.copytree(stage2, tmp / "stage2", ignore=shutil.ignore_patterns(".*"))
            components.append("stage2")
        cm = corpus_obj.manifest
        (tmp / "labels.json").write_text(json.dumps({
            "source": "training corpus", "corpus": str(corpus_dir), "n_cells": cm.get("n_cells"),
            "normalization": cm.get("normalization"), "labels": labels}, indent=1))
        (tmp / "genes.json").write_text(json.dumps(corpus_panel(corpus_obj)))
        if metrics_data is not None:
            shutil.copyfile(metrics, tmp / "metrics.json")
            components.append("metrics")
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "scmm_version": scmm.__version__,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "components": components,
                    "corpus": {k: cm.get(k) for k in ("n_cells", "n_genes", "normalization", "splits", "vocab")}}
        (tmp / "README.md").write_text(_model_card(manifest, cm, labels, metrics_data, loader_cfg, aligner_cfg))
        manifest["files"] = _files_of(tmp)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        publish_dir(tmp, out)  # replaces an earlier package
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("packaged %s (%s)", out, ", ".join(components))
    return out
