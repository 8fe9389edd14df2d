"""Annotation by text: a cell's type is the candidate label whose text embedding is most similar.

Candidates (:class:`Candidates`) are the training corpus's cell types (with a packaged model: its stored labels) or
a user's list of CL IDs and free text. Each candidate's texts are built the way training texts are
(:func:`scmm.data_pipeline.text.label_texts`: the label and its Cell Ontology definition in every phrasing); the
normalised text embeddings of the phrasings are averaged into one prototype per candidate
(:func:`label_prototypes`). Cell embeddings and prototypes are compared by cosine similarity.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from scmm.config import read_utf8
from scmm.data_pipeline.loader import CorpusLoader, LoaderConfig
from scmm.data_pipeline.ontology import Ontology
from scmm.data_pipeline.store import Corpus
from scmm.data_pipeline.terms import CELL_TYPE, check_term, looks_like_term_id
from scmm.data_pipeline.text import corpus_labels, label_texts
from scmm.errors import ScmmError

__all__ = ["Embedded", "Candidates", "read_labels_option", "embed_split", "label_prototypes",
           "predict_by_text",
           "corpus_label_texts", "zero_shot_accuracy"]


@dataclass
class Embedded:
    """Cell embeddings of one split, with the cells' IDs, labels (CL IDs) and texts."""

    embeddings: np.ndarray  # [N, D] float32, L2-normalised
    cell_ids: list[str]
    labels: list[str]
    texts: list[str]


@torch.no_grad()
def embed_split(model, corpus: Corpus, split: str, progress: bool = True, batch_size: int = 64) -> Embedded:
    """Embed every cell of a corpus split with the model's aligned cell features (its own encoding, at inference)."""
    loader = CorpusLoader(corpus, split, LoaderConfig.inference(batch_size), model.encoding, model.vocab,
                          training=False)
    model.eval()
    parts, ids, labels, texts = [], [], [], []
    for batch in tqdm(loader, desc=f"embed {split}", unit="batch", disable=None if progress else True):
        feats = model.cell_features(batch["gene_ids"], batch["values"], batch["padding_mask"])
        parts.append(feats.float().numpy())
        ids += batch["cell_id"]
        labels += batch["cell_type_ontology_term_id"]
        texts += batch["text"]
    return Embedded(np.concatenate(parts).astype(np.float32), ids, labels, texts)


# --- candidates -------------------------------------------------------------------------------------------
@dataclass
class Candidates:
    """Candidate labels: what a prediction reads (``keys``: a CL ID, ``unmatched:<label>``, or the user's free
    text), a display name, the CL ID ("" for free text naming no CL term) and the texts of the prototype."""

    keys: list[str]
    names: list[str]
    cl_ids: list[str]
    texts: list[list[str]]

    @classmethod
    def from_labels(cls, rows: Sequence[dict]) -> Candidates:
        """From label rows as :func:`scmm.data_pipeline.text.corpus_labels` (and a package's labels.json) hold them."""
        if not rows:
            raise ScmmError("no candidate labels")
        return cls([r["key"] for r in rows], [r["label"] for r in rows],
                   [r["cell_type_ontology_term_id"] for r in rows], [list(r["texts"]) for r in rows])

    @classmethod
    def from_corpus(cls, corpus: Corpus) -> Candidates:
        """The corpus's cell types."""
        if not corpus.cell_types:
            raise ScmmError(f"corpus {corpus.path} lists no cell types")
        return cls.from_labels(corpus_labels(corpus))

    @classmethod
    def from_user(cls, items: Sequence[str], ontology: Ontology) -> Candidates:
        """A user's list: CL IDs (which must be known terms), or free text, matched to a CL term by label or synonym
        when possible (the prediction is then that CL ID, phrased the user's way) and otherwise kept as given."""
        out = cls([], [], [], [])
        for item in items:
            if looks_like_term_id(item, ontology):  # an ontology ID: must be a known CL term
                term = check_term(item, CELL_TYPE, ontology, "--labels")
                out._add(term, ontology.label(term), term, label_texts(term, ontology))
                continue
            term = ontology.match_cell_type(item)
            if term is not None:
                out._add(term, item, term, label_texts(term, ontology, label=item))
            else:
                out._add(item, item, "", label_texts(item, ontology, label=item))
        return out

    def _add(self, key: str, name: str, cl_id: str, texts: list[str]) -> None:
        if key in self.keys:  # the same term named twice ("T cell" and CL:0000084): the first naming is kept
            return
        self.keys.append(key), self.names.append(name), self.cl_ids.append(cl_id), self.texts.append(texts)


LABEL_FILE_SUFFIXES = (".txt", ".tsv", ".csv", ".list")


def read_labels_option(value: str | Sequence[str] | None) -> list[str] | None:
    """Candidate labels from ``--labels``: a file (one label per line; blank lines and ``#`` comments skipped)
    when ``value`` names an existing file, else a comma-separated list. A sequence is taken as is. A value
    without a comma that looks like a path (a ``/``, or a ``.txt``/``.tsv``/``.csv``/``.list`` ending) but names
    no file is an error, never a label."""
    if value is None:
        return None
    if isinstance(value, str):
        path = Path(value)
        if not path.is_file() and "," not in value and ("/" in value or path.suffix.lower() in LABEL_FILE_SUFFIXES):
            raise ScmmError(f"labels file not found: {value} (give a file, or labels separated by commas)")
        if path.is_file():
            items = [line.strip() for line in read_utf8(path, "labels file").splitlines()]
            items = [x for x in items if x and not x.startswith("#")]
            where = f"labels file {path}"
        else:
            items = [x.strip() for x in value.split(",") if x.strip()]
            where = "--labels"
    else:
        items = [str(x).strip() for x in value if str(x).strip()]
        where = "labels"
    items = list(dict.fromkeys(items))
    if not items:
        raise ScmmError(f"{where} holds no label")
    return items


# --- prototypes and predictions ---------------------------------------------------------------------------
@torch.no_grad()
def label_prototypes(model, candidates: Candidates) -> np.ndarray:
    """One L2-normalised text prototype per candidate: the normalised mean of its texts' normalised features."""
    rows = []
    for phrasings in candidates.texts:
        f = torch.nn.functional.normalize(model.text_features(list(phrasings)).float().cpu(), dim=-1).mean(0)
        rows.append(torch.nn.functional.normalize(f, dim=0).numpy())
    return np.stack(rows).astype(np.float32)


def predict_by_text(embeddings: np.ndarray, prototypes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(index of the most similar prototype, its cosine similarity) per cell."""
    sim = embeddings @ prototypes.T
    best = sim.argmax(1)
    return best, sim[np.arange(len(best)), best]


def corpus_label_texts(corpus: Corpus) -> list[str]:
    """Every phrasing of every cell type of a corpus (types kept as free text use their label)."""
    return [t for row in corpus_labels(corpus) for t in row["texts"]]


def zero_shot_accuracy(model, corpus: Corpus, split: str, progress: bool = False) -> float:
    """Share of cells of a split whose most similar label text (among the corpus's types) is their own type."""
    emb = embed_split(model, corpus, split, progress)
    candidates = Candidates.from_corpus(corpus)
    best, _ = predict_by_text(emb.embeddings, label_prototypes(model, candidates))
    pred = [candidates.keys[i] for i in best]
    return float(np.mean([p == t for p, t in zip(pred, emb.labels)]))
