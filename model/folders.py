"""Model folders: the one opener, :func:`load_model`, for every kind of folder scmm writes.

Three kinds of folder hold a model:

* a **stage-1 model folder** (``runs/demo/stage1/model``, :class:`~scmm.model.aligner.CellTextAligner`);
* a **stage-2 model folder** (``runs/demo/stage2/model``, :class:`~scmm.model.stage2.Stage2Model`), which carries
  the stage-1 model it was trained on in ``stage1/``;
* a **packaged model** (``scmm package``, marked by ``scmm_model.json``)::

    scmm_model.json   format "scmm-model", format_version, scmm version, created, components,
                      files: {relative path: sha256} of every other file, manifest_sha256: the manifest's own
                      sha256 (without that key). On load every file is checked before use: a file not listed,
                      missing, of another checksum, or that does not decode is refused by name
    stage1/           the stage-1 model folder
    stage2/           the stage-2 model folder without its stage1/ (stored once, above; only when packaged)
    labels.json       candidate labels of the training corpus: key (CL ID or `unmatched:<label>`), CL ID,
                      label, count, and the label texts whose mean text embedding is the label's prototype
    genes.json        the training corpus's gene panel (vocabulary ids and symbols): inference keeps only
                      these genes, since genes never seen in training have untrained embeddings
    facts.json        how the training corpus computed its per-cell facts (the training split's gene mean, sd and
                      detection share, the hallmark programs' panel genes and score standardisation): `scmm
                      describe` computes each cell's programs and markers with it and checks the description's
                      claims against them (only when the corpus has facts)
    metrics.json      evaluation metrics (only when given)
    novelty_reference.npz  the novelty check's genes, PCA and reference cells (at most 50,000 training cells'
                      expression profiles as float16 PCA points; ``scmm eval`` writes it beside its metrics.json;
                      packaged with it when present; :mod:`scmm.eval.novelty`). A package without it has no
                      novelty check.
    README.md         model card: training data, evaluation table, usage

A bare stage-1 or stage-2 folder is self-contained too: its trainer writes the training corpus's ``labels.json``
and ``genes.json`` (and ``facts.json``) into it (a stage-2 folder without them uses those of its ``stage1/``).
Nothing is looked up outside the folder: a folder without them (older formats, or saved without a corpus) has no
default labels (annotation then needs explicit labels) and reads every vocabulary gene. Packages are written by
:mod:`scmm.package`; every folder kind's format is in :data:`scmm.model.pretrained.FORMATS`.

The model *fingerprint* (used by reference indexes) is a sha256 over the stage-1 files that decide the embedding
(everything but ``train_summary.json``, ``labels.json`` and ``facts.json``; the cell encoding included), so a bare
stage-1 folder, the stage-2 model built on it and their package share one fingerprint.
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
from scmm.data_pipeline.facts import FactModel
from scmm.errors import ScmmError
from scmm.model import pretrained
from scmm.model.aligner import CellTextAligner
from scmm.model.stage2 import Stage2Model

log = logging.getLogger("scmm.model")

__all__ = ["ScmmModel", "load_model", "model_kind", "fingerprint", "files_of", "sha256_file", "manifest_digest",
           "PACKAGE_FORMAT", "MANIFEST", "NOT_IN_FINGERPRINT", "NOVELTY_FILE"]

PACKAGE_FORMAT = "scmm-model"
MANIFEST = pretrained.FORMATS[PACKAGE_FORMAT].marker
# files of a stage-1 folder that do not decide the embedding
NOT_IN_FINGERPRINT = ("train_summary.json", pretrained.LABELS_FILE, pretrained.FACTS_FILE)
NOVELTY_FILE = "novelty_reference.npz"  # what scmm.eval.novelty writes and reads (layer 3 owns its content)
_KINDS = {PACKAGE_FORMAT: "package", Stage2Model.folder_format: "stage2", CellTextAligner.folder_format: "stage1"}


# --- hashing ----------------------------------------------------------------------------------------
def sha256_file(path: Path, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def _present(folder: Path, skip: tuple[str, ...] = ()) -> list[str]:
    """Relative posix paths of the regular files under ``folder`` (hidden temporaries and the top-level entries
    named in ``skip`` left out)."""
    out = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if p.is_file() and not any(part.startswith(".") for part in rel.parts) and rel.parts[0] not in skip:
            out.append(rel.as_posix())
    return out


def files_of(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """{relative posix path: sha256} of every regular file under ``folder`` (hidden temp files and the top-level
    entries named in ``skip`` left out)."""
    return {rel: sha256_file(folder / rel) for rel in _present(folder, skip)}


def fingerprint(stage1_files: dict[str, str]) -> str:
    """sha256 identifying the embedding a stage-1 model computes (see the module docstring)."""
    files = {k: v for k, v in stage1_files.items() if k.split("/")[-1] not in NOT_IN_FINGERPRINT}
    return hashlib.sha256(json.dumps({"files": files}, sort_keys=True).encode()).hexdigest()


def manifest_digest(manifest: dict) -> str:
    """The sha256 a package manifest records of itself: over its canonical JSON without ``manifest_sha256``."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


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
    facts: FactModel | None = None  # how the training corpus computed per-cell facts (None: it had none)
    _stage2: Stage2Model | None = field(default=None, repr=False)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, verify: bool = True) -> ScmmModel:
        """Open any model folder (:func:`load_model`)."""
        return load_model(folder, verify)

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
    found = pretrained.marker_format(folder)
    if found is None or found[0] not in _KINDS:
        raise ScmmError(f"{folder} is not an scmm model folder (no {MANIFEST}, and no config.json of a stage-1 or "
                        f"stage-2 model)")
    return _KINDS[found[0]]


def _verify(folder: Path, manifest: dict, version: int) -> None:
    """Every file of a package checked before use: listed with its checksum, present, unchanged, decodable."""
    path = folder / MANIFEST
    files = manifest.get("files")
    if not isinstance(files, dict) or not files or not all(isinstance(v, str) for v in files.values()):
        raise ScmmError(f"{path} lists no files")
    if version >= 3:
        whole = {"format": PACKAGE_FORMAT, "format_version": version, **manifest}
        if whole.get("manifest_sha256") != manifest_digest(whole):
            raise ScmmError(f"model {folder} is corrupted: {MANIFEST} does not match its own checksum")
    unlisted = [rel for rel in _present(folder) if rel != MANIFEST and rel not in files]
    if unlisted:
        raise ScmmError(f"model {folder} holds {len(unlisted)} file(s) its manifest does not list (refused): "
                        f"{', '.join(unlisted[:3])}")
    for rel, digest in files.items():
        p = folder / rel
        if not p.is_file():
            raise ScmmError(f"model {folder} is incomplete: {rel} is missing")
        if sha256_file(p) != digest:
            raise ScmmError(f"model {folder} is corrupted: checksum mismatch in {rel}")
    for rel in files:
        pretrained.check_decodable(folder / rel)


def _novelty_reference(folder: Path) -> dict[str, np.ndarray] | None:
    path = folder / NOVELTY_FILE
    if not path.exists():
        return None
    with pretrained.reading(path, "novelty reference"), np.load(path, allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def _load_package(folder: Path, verify: bool) -> ScmmModel:
    manifest, version = pretrained.read_marker(folder, PACKAGE_FORMAT)
    if verify:
        _verify(folder, manifest, version)
    with pretrained.reading(folder / MANIFEST, "model manifest"):
        s1_files = {k[len("stage1/"):]: v for k, v in manifest["files"].items() if k.startswith("stage1/")}
        has_stage2 = "stage2" in manifest.get("components", [])
    metrics = read_json(folder / "metrics.json", "metrics") if (folder / "metrics.json").exists() else None
    return ScmmModel(folder=folder, stage1_folder=folder / "stage1",
                     aligner=CellTextAligner.from_pretrained(folder / "stage1"), labels=pretrained.read_labels(folder),
                     panel_vocab_ids=pretrained.read_panel(folder), fingerprint=fingerprint(s1_files),
                     stage2_folder=folder / "stage2" if has_stage2 else None,
                     packaged=True, metrics=metrics, novelty_reference=_novelty_reference(folder),
                     facts=pretrained.read_fact_model(folder))


def _load_bare(folder: Path, stage2: bool) -> ScmmModel:
    """A stage-1 or stage-2 folder: its own labels and gene panel (a stage-2 folder's, else its stage1/'s)."""
    for rel in _present(folder):
        pretrained.check_decodable(folder / rel)
    stage1 = folder / "stage1" if stage2 else folder
    sources = (folder, stage1) if stage2 else (folder,)
    labels = next((x for x in map(pretrained.read_labels, sources) if x is not None), None)
    panel = next((x for x in map(pretrained.read_panel, sources) if x is not None), None)
    if panel is None:
        log.debug("model %s keeps no gene panel (genes.json): every vocabulary gene of the input is read", folder)
    return ScmmModel(folder=folder, stage1_folder=stage1, aligner=CellTextAligner.from_pretrained(stage1),
                     labels=labels, panel_vocab_ids=panel, fingerprint=fingerprint(files_of(stage1)),
                     stage2_folder=folder if stage2 else None,
                     facts=next((x for x in map(pretrained.read_fact_model, sources) if x is not None), None))


def load_model(folder: str | os.PathLike | ScmmModel, verify: bool = True) -> ScmmModel:
    """Open any model folder scmm writes: a package (every file verified unless ``verify`` is False), a stage-2
    model folder or a stage-1 model folder (see the module docstring). An opened model is returned as is.

    A package of another format version, a missing, unlisted, corrupted or undecodable file, or a folder of no
    known kind is a :class:`ScmmError` naming the folder or file.
    """
    if isinstance(folder, ScmmModel):
        return folder
    folder = Path(folder)
    kind = model_kind(folder)
    if kind == "package":
        return _load_package(folder, verify)
    return _load_bare(folder, stage2=kind == "stage2")
