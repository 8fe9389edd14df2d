"""Model folders: the one opener, :func:`load_model`, for every kind of folder scmm writes.

Three kinds of folder hold a model:

* a **stage-1 model folder** (``runs/demo/stage1/model``, :class:`~scmm.model.aligner.CellTextAligner`);
* a **stage-2 model folder** (``runs/demo/stage2/model``, :class:`~scmm.model.stage2.Stage2Model`), which carries
  the stage-1 model it was trained on in ``stage1/``;
* a **packaged model** (``scmm package``, marked by ``scmm_model.json``)::

    scmm_model.json   format "scmm-model", format_version, scmm version, created, components,
                      files: {relative path: sha256} of every other file (checked on load)
    stage1/           the stage-1 model folder
    stage2/           the stage-2 model folder without its stage1/ (stored once, above; only when packaged)
    labels.json       candidate labels of the training corpus: key (CL ID or `unmatched:<label>`), CL ID,
                      label, count, and the label texts whose mean text embedding is the label's prototype
    genes.json        the training corpus's gene panel (vocabulary ids and symbols): inference keeps only
                      these genes, since genes never seen in training have untrained embeddings
    metrics.json      evaluation metrics (only when given)
    novelty_reference.npz  the novelty check's genes, PCA and reference cells (at most 50,000 training cells'
                      expression profiles as float16 PCA points; ``scmm eval`` writes it beside its metrics.json;
                      packaged with it when present; :mod:`scmm.eval.novelty`). A package without it has no
                      novelty check.
    README.md         model card: training data, evaluation table, usage

For a bare stage-1 or stage-2 folder the labels and gene panel come from the training corpus named by the run
config one level up (``../config.json`` key ``corpus``) when it can be found, else there are none (annotation then
needs explicit labels, and all vocabulary genes are used). Packages are written by :mod:`scmm.package`.

The model *fingerprint* (used by reference indexes) is a sha256 over the stage-1 files that decide the embedding
(everything but ``train_summary.json``, the cell encoding included), so a bare stage-1 folder, the stage-2 model
built on it and their package share one fingerprint.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from scmm.config import read_json
from scmm.data_pipeline.store import Corpus
from scmm.data_pipeline.text import corpus_labels
from scmm.errors import ScmmError
from scmm.model.aligner import CellTextAligner
from scmm.model.stage2 import FORMAT as STAGE2_FORMAT
from scmm.model.stage2 import Stage2Model

log = logging.getLogger("scmm.model")

__all__ = ["ScmmModel", "load_model", "model_kind", "fingerprint", "files_of", "sha256_file", "FORMAT",
           "FORMAT_VERSION", "MANIFEST", "NOT_IN_FINGERPRINT"]

FORMAT = "scmm-model"
FORMAT_VERSION = 2  # 2: stage2/ without a second copy of stage1/; the cell encoding in stage1/
MANIFEST = "scmm_model.json"
NOT_IN_FINGERPRINT = ("train_summary.json",)
NOVELTY_FILE = "novelty_reference.npz"  # what scmm.eval.novelty writes and reads (layer 3 owns its content)


# --- hashing ----------------------------------------------------------------------------------------
def sha256_file(path: Path, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def files_of(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """{relative posix path: sha256} of every regular file under ``folder`` (hidden temp files and the top-level
    entries named in ``skip`` left out)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if p.is_file() and not any(part.startswith(".") for part in rel.parts) and rel.parts[0] not in skip:
            out[rel.as_posix()] = sha256_file(p)
    return out


def fingerprint(stage1_files: dict[str, str]) -> str:
    """sha256 identifying the embedding a stage-1 model computes (see the module docstring)."""
    files = {k: v for k, v in stage1_files.items() if k.split("/")[-1] not in NOT_IN_FINGERPRINT}
    return hashlib.sha256(json.dumps({"files": files}, sort_keys=True).encode()).hexdigest()


# --- the model object -------------------------------------------------------------------------------
@dataclass
class ScmmModel:
    """What inference and evaluation need: the stage-1 model (with its gene vocabulary and cell encoding), the
    candidate labels, the training gene panel, and the stage-2 model, loaded on first use."""

    folder: Path
    stage1_folder: Path
    aligner: CellTextAligner  # eval mode, fp32
    labels: list[dict] | None  # labels.json "labels" (None: unknown; pass labels explicitly)
    panel_vocab_ids: np.ndarray | None  # training-panel vocabulary ids (None: every vocabulary gene)
    fingerprint: str
    stage2_folder: Path | None = None
    packaged: bool = False
    metrics: dict | None = None
    novelty_reference: dict[str, np.ndarray] | None = None  # the arrays of NOVELTY_FILE (scmm.eval.novelty)
    _stage2: Stage2Model | None = field(default=None, repr=False)

    @property
    def vocab(self):
        return self.aligner.vocab

    @property
    def encoding(self):
        return self.aligner.encoding

    @property
    def has_stage2(self) -> bool:
        return self.stage2_folder is not None

    @property
    def stage2(self) -> Stage2Model:
        """The stage-2 model, loaded on first use around this model's stage-1 model (one copy in memory)."""
        if self._stage2 is None:
            if self.stage2_folder is None:
                raise ScmmError(f"model {self.folder} has no stage-2 part (LLM bridge): describing cells and "
                                f"generating pseudo-cells need a stage-2 model or a package made with "
                                f"`scmm package ... --stage2 DIR`")
            self._stage2 = Stage2Model.from_pretrained(self.stage2_folder, aligner=self.aligner,
                                                       stage1_folder=self.stage1_folder)
        return self._stage2


def model_kind(folder: Path) -> str:
    """``package``, ``stage2`` or ``stage1`` (a folder that is none of them is a ScmmError)."""
    if not folder.exists():
        raise ScmmError(f"model folder not found: {folder}")
    if not folder.is_dir():
        raise ScmmError(f"model {folder} is not a folder")
    if (folder / MANIFEST).exists():
        return "package"
    if not (folder / "config.json").is_file():
        raise ScmmError(f"{folder} is not an scmm model folder (no config.json)")
    raw = read_json(folder / "config.json", "model config")
    return "stage2" if isinstance(raw, dict) and raw.get("format") == STAGE2_FORMAT else "stage1"


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


def _find_run_corpus(model_folder: Path) -> Path | None:
    """The corpus of a bare model folder's run config (``../config.json`` key ``corpus``), if it exists."""
    cfg = model_folder.parent / "config.json"
    if not cfg.is_file():
        return None
    try:
        raw = json.loads(cfg.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    corpus = raw.get("corpus") if isinstance(raw, dict) else None
    if not isinstance(corpus, str):
        return None
    for base in (Path.cwd(), model_folder.parent, *model_folder.parent.parents):
        p = Path(corpus) if Path(corpus).is_absolute() else base / corpus
        if (p / "manifest.json").is_file():
            return p
    return None


def _load_package(folder: Path, verify: bool) -> ScmmModel:
    manifest = read_json(folder / MANIFEST, "model manifest")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ScmmError(f"{folder}/{MANIFEST} is not an scmm model manifest")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ScmmError(f"model {folder} has format_version {version}; this scmm reads format_version "
                        f"{FORMAT_VERSION} (repackage it with this scmm's `scmm package`)")
    if verify:
        _verify(folder, manifest)
    labels = read_json(folder / "labels.json", "label file")["labels"] if (folder / "labels.json").exists() else None
    panel = None
    if (folder / "genes.json").exists():
        panel = np.asarray(read_json(folder / "genes.json", "gene panel")["vocab_ids"], dtype=np.int64)
    metrics = read_json(folder / "metrics.json", "metrics") if (folder / "metrics.json").exists() else None
    reference = None
    if (folder / NOVELTY_FILE).exists():
        try:
            with np.load(folder / NOVELTY_FILE, allow_pickle=False) as npz:
                reference = {k: npz[k] for k in npz.files}
        except (OSError, ValueError) as exc:
            raise ScmmError(f"model {folder}: cannot read {NOVELTY_FILE} ({exc})") from None
    s1_files = {k[len("stage1/"):]: v for k, v in manifest["files"].items() if k.startswith("stage1/")}
    return ScmmModel(folder=folder, stage1_folder=folder / "stage1",
                     aligner=CellTextAligner.from_pretrained(folder / "stage1"), labels=labels,
                     panel_vocab_ids=panel, fingerprint=fingerprint(s1_files),
                     stage2_folder=folder / "stage2" if "stage2" in manifest.get("components", []) else None,
                     packaged=True, metrics=metrics, novelty_reference=reference)


def _load_bare(folder: Path, stage2: bool) -> ScmmModel:
    stage1 = folder / "stage1" if stage2 else folder
    labels = panel = None
    corpus_dir = _find_run_corpus(folder)
    if corpus_dir is not None:
        corpus = Corpus(corpus_dir)
        labels = corpus_labels(corpus)
        panel = np.asarray(corpus.gene_vocab_ids, dtype=np.int64)
        log.info("model %s: candidate labels and gene panel from its training corpus %s", folder, corpus_dir)
    return ScmmModel(folder=folder, stage1_folder=stage1, aligner=CellTextAligner.from_pretrained(stage1),
                     labels=labels, panel_vocab_ids=panel, fingerprint=fingerprint(files_of(stage1)),
                     stage2_folder=folder if stage2 else None)


def load_model(folder: str | os.PathLike | ScmmModel, verify: bool = True) -> ScmmModel:
    """Open any model folder scmm writes: a package (checksums verified unless ``verify`` is False), a stage-2
    model folder or a stage-1 model folder (see the module docstring). An opened model is returned as is.

    A package of another format version, a missing or corrupted file, or a folder of no known kind is a
    :class:`ScmmError`.
    """
    if isinstance(folder, ScmmModel):
        return folder
    folder = Path(folder)
    kind = model_kind(folder)
    if kind == "package":
        return _load_package(folder, verify)
    return _load_bare(folder, stage2=kind == "stage2")
