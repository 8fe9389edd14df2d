"""The one model-folder format (after Hugging Face's ``PretrainedConfig``/``PreTrainedModel``).

Every folder kind scmm writes is named in one registry, :data:`FORMATS` (name, current version, the older versions
this scmm still opens, the file that names the format). A folder's *marker* file (``config.json``; a package's
``scmm_model.json``; an index's ``index.json``) holds ``{"format": NAME, "format_version": N, ...}`` followed by
the folder's config dataclass, serialised one way (:func:`config_to_dict` / :func:`config_from_dict`: every key
validated). Weights are safetensors files (:func:`save_weights` / :func:`load_weights`).

:class:`PretrainedModel` gives a module ``save_pretrained`` (atomic: :func:`scmm.atomic.write_folder`) and
``from_pretrained`` (format and version checked, any decoding error of a file turned into a :class:`ScmmError`
naming the file); a subclass says what it writes (``_write``) and how it is built from an opened folder
(``_from_folder``).

A model folder is self-contained: besides its weights it holds its gene vocabulary, its cell encoding and, when it
was trained from a corpus, the corpus's gene panel (:data:`PANEL_FILE`), candidate labels (:data:`LABELS_FILE`) and,
when the corpus has per-cell facts, how they were computed (:data:`FACTS_FILE`: the training split's gene and
program statistics), written by :func:`write_corpus_facts` and read by :func:`read_panel` / :func:`read_labels` /
:func:`read_fact_model`. Nothing is looked up outside the folder.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np

from scmm.atomic import write_folder
from scmm.config import from_dict
from scmm.data_pipeline.facts import FactModel
from scmm.errors import ScmmError

__all__ = ["FolderFormat", "FORMATS", "CONFIG_FILE", "WEIGHTS_FILE", "PANEL_FILE", "LABELS_FILE",
           "PretrainedModel", "read_marker", "write_marker", "marker_format", "config_to_dict",
           "config_from_dict", "save_weights", "load_weights", "reading", "check_decodable", "write_corpus_facts",
           "read_panel", "read_labels", "read_fact_model", "corpus_panel", "FACTS_FILE"]

T = TypeVar("T")
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
PANEL_FILE = "genes.json"  # the training corpus's gene panel: inference reads only these genes
LABELS_FILE = "labels.json"  # the training corpus's cell types: annotation's default candidates
FACTS_FILE = "facts.json"  # how the training corpus scored programs and picked marker genes (describe checks claims)


@dataclass(frozen=True)
class FolderFormat:
    """One folder kind: its format name, the version this scmm writes, the older versions it still opens (0: a
    marker without ``format`` keys, as written before the registry) and what each version changed."""

    name: str
    version: int
    what: str
    marker: str = CONFIG_FILE
    reads: tuple[int, ...] = ()
    history: str = ""

    @property
    def readable(self) -> tuple[int, ...]:
        return (self.version, *self.reads)


FORMATS: dict[str, FolderFormat] = {f.name: f for f in (
    FolderFormat("scmm-cell-tower", 1, "cell tower", reads=(0,),
                 history="1: config.json names its format; inside a stage-1 folder pad_value comes from the cell "
                         "encoding (config key from_parent)"),
    FolderFormat("scmm-expr-decoder", 1, "expression decoder", reads=(0,),
                 history="1: config.json names its format"),
    FolderFormat("scmm-aligner", 3, "stage-1 model", reads=(2,),
                 history="3: the gene panel and labels in the folder, the cell tower's config once (cell_tower/), "
                         "pad_value once (cell_encoding.json); 2: the cell encoding is saved with the model"),
    FolderFormat("scmm-stage2", 4, "stage-2 model", reads=(3,),
                 history="4: the decoder's zero model (bridge.zero_inflated; 3 reads as false); 3: typed LoRA "
                         "options; 2: LayerNorm before each GELU of the bridge MLPs"),
    FolderFormat("scmm-model", 3, "packaged model", marker="scmm_model.json", reads=(2,),
                 history="3: the manifest checks itself (manifest_sha256); 2: stage2/ without a second copy of "
                         "stage1/, the cell encoding in stage1/"),
    FolderFormat("scmm-index", 1, "reference index", marker="index.json"),
)}


# --- the marker file ---------------------------------------------------------------------------------
def marker_format(folder: Path) -> tuple[str, int] | None:
    """(format name, version) that ``folder``'s marker names, or None (no marker, or one of no known format)."""
    for marker in dict.fromkeys(f.marker for f in FORMATS.values()):
        path = folder / marker
        if not path.is_file():
            continue
        raw = _read_json(path, "model folder description")
        name = raw.get("format") if isinstance(raw, dict) else None
        if name in FORMATS and FORMATS[name].marker == marker:
            return name, raw.get("format_version")
    return None


def read_marker(folder: str | os.PathLike, name: str) -> tuple[dict, int]:
    """The marker of a folder of format ``name`` without its format keys, and its version. A missing folder or
    marker, another format, or a version this scmm does not read is a :class:`ScmmError`."""
    fmt, folder = FORMATS[name], Path(folder)
    if not folder.is_dir():
        raise ScmmError(f"{fmt.what} folder not found: {folder}")
    path = folder / fmt.marker
    if not path.is_file():
        raise ScmmError(f"{folder} is not an scmm {fmt.what} folder (no {fmt.marker})")
    raw = _read_json(path, f"{fmt.what} description")
    if not isinstance(raw, dict):
        raise ScmmError(f"{path} is not an scmm {fmt.what} description (not a JSON object)")
    raw = dict(raw)
    found = raw.pop("format", None)
    version = raw.pop("format_version", None) if found is not None else 0
    if found is None and 0 not in fmt.reads or found is not None and found != name:
        raise ScmmError(f"{folder} is not an scmm {fmt.what} folder (format {found!r} in {fmt.marker})")
    if version not in fmt.readable:
        raise ScmmError(f"{folder} has format {name} version {version}; this scmm reads version "
                        f"{' or '.join(map(str, fmt.readable))} (write it again with this scmm)")
    return raw, version


def write_marker(folder: Path, name: str, body: Mapping[str, Any]) -> Path:
    """Write the marker file of a folder of format ``name``: format keys first, then ``body``."""
    fmt = FORMATS[name]
    path = folder / fmt.marker
    path.write_text(json.dumps({"format": name, "format_version": fmt.version, **body}, indent=1) + "\n")
    return path


# --- configs: one serialisation -----------------------------------------------------------------------
def config_to_dict(config: Any) -> dict:
    """A config dataclass as the JSON object a folder stores."""
    return dataclasses.asdict(config)


def config_from_dict(cls: type[T], raw: Mapping[str, Any], where: str = "") -> T:
    """A config dataclass from a folder's JSON object: unknown keys and wrong types are errors naming the key."""
    return from_dict(cls, dict(raw), where)


# --- files: reading with errors that name the file -----------------------------------------------------
@contextlib.contextmanager
def reading(path: str | os.PathLike, what: str = "model file") -> Iterator[None]:
    """Turn any error while decoding ``path`` into one :class:`ScmmError` naming the file."""
    try:
        yield
    except ScmmError:
        raise
    except Exception as exc:  # any decoder's error (zip, npy, safetensors, JSON, YAML, torch, tokenizers)
        detail = str(exc).splitlines()[0][:200] if str(exc) else ""
        raise ScmmError(f"{what} {path} is unreadable ({type(exc).__name__}{': ' + detail if detail else ''})"
                        ) from None


def _read_json(path: Path, what: str) -> Any:
    with reading(path, what):
        return json.loads(path.read_bytes().decode("utf-8"))


def save_weights(path: Path, state: Mapping[str, Any]) -> None:
    """Write a state dict (tensors) as safetensors, on the CPU and contiguous."""
    from safetensors.torch import save_file  # noqa: PLC0415 - torch: imported by the model modules anyway
    save_file({k: v.detach().to("cpu").contiguous() for k, v in state.items()}, str(path), metadata={"format": "pt"})


def load_weights(path: str | os.PathLike) -> dict:
    """The tensors of a safetensors file (CPU); a missing or undecodable file is a :class:`ScmmError` naming it."""
    from safetensors.torch import load_file  # noqa: PLC0415
    path = Path(path)
    if not path.is_file():
        raise ScmmError(f"model file is missing: {path}")
    with reading(path, "weights file"):
        return load_file(str(path), device="cpu")


def check_decodable(path: Path) -> None:
    """Decode ``path`` by its kind (JSON, safetensors, npz/npy, YAML, torch, zip, text), so that a damaged file is
    refused by name before any reader uses it; files of other kinds are left to their readers."""
    name = path.name
    with reading(path):
        if name.endswith(".json"):
            json.loads(path.read_bytes().decode("utf-8"))
        elif name.endswith(".safetensors"):
            from safetensors import safe_open  # noqa: PLC0415
            with safe_open(str(path), framework="np") as f:
                for key in f.keys():
                    f.get_slice(key).get_shape()
        elif name.endswith(".npz"):
            with np.load(path, allow_pickle=False) as npz:
                for key in npz.files:
                    npz[key]
        elif name.endswith(".npy"):
            np.load(path, allow_pickle=False)
        elif name.endswith((".yaml", ".yml")):
            import yaml  # noqa: PLC0415
            yaml.safe_load(path.read_bytes().decode("utf-8"))
        elif name.endswith((".pt", ".pth", ".bin")):
            import torch  # noqa: PLC0415
            torch.load(path, map_location="cpu", weights_only=True)
        elif name.endswith(".zip"):
            with zipfile.ZipFile(path) as z:
                bad = z.testzip()
                if bad is not None:
                    raise ValueError(f"member {bad} is damaged")
        elif name.endswith((".txt", ".md", ".jinja")):
            path.read_bytes().decode("utf-8")


# --- the corpus's gene panel and labels, kept in the folder --------------------------------------------
def corpus_panel(corpus) -> dict:
    """The training gene panel of a :class:`~scmm.data_pipeline.store.Corpus`: vocabulary ids and symbols."""
    return {"vocab_ids": [int(i) for i in corpus.gene_vocab_ids], "symbols": [str(s) for s in corpus.gene_symbols]}


def write_corpus_facts(folder: Path, corpus) -> None:
    """Write the corpus's gene panel and candidate labels into a model folder (so that it is self-contained)."""
    from scmm.data_pipeline.text import corpus_labels  # noqa: PLC0415 - ontology texts: only when writing
    cm = corpus.manifest
    (folder / LABELS_FILE).write_text(json.dumps({
        "source": "training corpus", "corpus": str(corpus.path), "n_cells": cm.get("n_cells"),
        "normalization": cm.get("normalization"), "labels": corpus_labels(corpus)}, indent=1))
    (folder / PANEL_FILE).write_text(json.dumps(corpus_panel(corpus)))
    if corpus.facts is not None:  # JSON floats round-trip float64 exactly
        (folder / FACTS_FILE).write_text(json.dumps({
            "symbols": [str(s) for s in corpus.gene_symbols],
            "facts": {k: v for k, v in corpus.facts.items() if k != "checksums"},
            "arrays": {k: np.asarray(v).tolist() for k, v in corpus.fact_arrays().items()}}))


def read_panel(folder: Path) -> np.ndarray | None:
    """The gene panel's vocabulary ids kept in ``folder`` (None: the folder has none; every gene is read)."""
    path = folder / PANEL_FILE
    if not path.is_file():
        return None
    raw = _read_json(path, "gene panel")
    with reading(path, "gene panel"):
        ids = np.asarray(raw["vocab_ids"], dtype=np.int64)
        if ids.ndim != 1:
            raise ValueError("vocab_ids must be a list of integers")
    return ids


def read_fact_model(folder: Path) -> FactModel | None:
    """The training corpus's fact model kept in ``folder`` (None: the folder has none: a corpus without facts)."""
    path = folder / FACTS_FILE
    if not path.is_file():
        return None
    raw = _read_json(path, "fact reference")
    with reading(path, "fact reference"):
        integer = ("program_indptr", "program_genes")
        arrays = {k: np.asarray(v, dtype=np.int64 if k in integer else np.float64) for k, v in raw["arrays"].items()}
        programs = raw["facts"]["programs"]
        model = FactModel.from_arrays(raw["symbols"], programs["names"], programs["left_out"], arrays)
        n_genes = len(model.symbols)
        if not (len(model.gene_mean) == len(model.gene_sd) == len(model.detected) == n_genes
                and len(model.program_mean) == len(model.program_sd) == model.n_programs
                and all(len(g) and 0 <= g.min() and g.max() < n_genes for g in model.program_genes)):
            raise ValueError("arrays do not match the gene panel and the programs")
    return model


def read_labels(folder: Path) -> list[dict] | None:
    """The candidate labels kept in ``folder`` (None: the folder has none; annotation then needs labels)."""
    path = folder / LABELS_FILE
    if not path.is_file():
        return None
    raw = _read_json(path, "label file")
    with reading(path, "label file"):
        labels = raw["labels"]
        if not isinstance(labels, list) or not all(isinstance(r, dict) and isinstance(r["key"], str)
                                                   and isinstance(r["label"], str) for r in labels):
            raise ValueError("labels must be a list of objects with key and label")
    return labels


# --- the base ----------------------------------------------------------------------------------------
class PretrainedModel:
    """``save_pretrained`` / ``from_pretrained`` for a module of folder format :attr:`folder_format`.

    A subclass implements ``_write(tmp, **options)`` (everything but the atomic publishing: weights, marker,
    sub-folders) and ``_from_folder(folder, raw, version, **options)`` (build the module from the marker's body
    ``raw`` of format ``version``, already checked).
    """

    folder_format: ClassVar[str]

    def save_pretrained(self, folder: str | os.PathLike, **options: Any) -> Path:
        """Write the folder atomically (a temporary beside it, renamed into place when complete)."""
        return write_folder(Path(folder), lambda tmp: self._write(tmp, **options),
                            marker=FORMATS[self.folder_format].marker)

    def _write(self, tmp: Path, **options: Any) -> None:
        raise NotImplementedError

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, **options: Any):
        """Open a folder of this kind (format and version checked; see the class docstring)."""
        folder = Path(folder)
        raw, version = read_marker(folder, cls.folder_format)
        return cls._from_folder(folder, raw, version, **options)

    @classmethod
    def _from_folder(cls, folder: Path, raw: dict, version: int, **options: Any):
        raise NotImplementedError

    @staticmethod
    def weights_of(module) -> dict:
        """A module's state dict ready to save (CPU, contiguous, detached)."""
        return {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}

    def write_config(self, folder: Path, exclude: tuple[str, ...] = (), **extra: Any) -> None:
        """The marker file: format keys, this module's ``config`` dataclass (keys in ``exclude`` left out), then
        ``extra``."""
        body = {k: v for k, v in config_to_dict(self.config).items() if k not in exclude}
        write_marker(folder, self.folder_format, {**body, **extra})

    @staticmethod
    def read_config(config_class: type[T], folder: Path, raw: Mapping[str, Any]) -> T:
        """The config dataclass of an opened folder's marker body (every key validated, errors name the file)."""
        return config_from_dict(config_class, raw, where=str(folder / CONFIG_FILE))

    save_weights = staticmethod(save_weights)
    load_weights = staticmethod(load_weights)

