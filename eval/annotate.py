"""Annotation by text: a cell's type is the candidate label whose text embedding is most similar.

Each candidate label's text is built the way training texts are (`data_pipeline.text.label_texts`:
the label and its Cell Ontology definition in every phrasing); the normalised embeddings of the
phrasings are averaged into one prototype per label. Cell embeddings and prototypes are compared
by cosine similarity.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
from tqdm.auto import tqdm

from scmm.data_pipeline.loader import CorpusLoader, LoaderConfig
from scmm.data_pipeline.ontology import get_ontology
from scmm.data_pipeline.store import Corpus
from scmm.data_pipeline.text import label_texts


@dataclass
class Embedded:
    """Cell embeddings of one split, with the cells' IDs, labels (CL IDs) and texts."""

    embeddings: np.ndarray  # [N, D] float32, L2-normalised
    cell_ids: list[str]
    labels: list[str]
    texts: list[str]


def inference_loader_config(cfg: LoaderConfig, batch_size: int = 64, max_len: int = 4096) -> LoaderConfig:
    """The training loader's value encoding, without shuffling or dropping, with every expressed gene kept."""
    return replace(cfg, batch_size=batch_size, max_len=max(max_len, cfg.max_len), shuffle=False, drop_last=False,
                   even_ranks=False, num_workers=0)


@torch.no_grad()
def embed_split(model, corpus: Corpus, split: str, loader_cfg: LoaderConfig, progress: bool = True) -> Embedded:
    """Embed every cell of a corpus split with the model's aligned cell features."""
    vocab = model.vocab
    loader = CorpusLoader(corpus, split, inference_loader_config(loader_cfg), vocab["<cls>"], vocab["<pad>"])
    model.eval()
    dtype = next(model.cell_tower.parameters()).dtype
    parts, ids, labels, texts = [], [], [], []
    for batch in tqdm(loader, desc=f"embed {split}", unit="batch", disable=None if progress else True):
        feats = model.cell_features(batch["gene_ids"], batch["values"].to(dtype), batch["padding_mask"])
        parts.append(feats.float().numpy())
        ids += batch["cell_id"]
        labels += batch["cell_type_ontology_term_id"]
        texts += batch["text"]
    return Embedded(np.concatenate(parts).astype(np.float32), ids, labels, texts)


@torch.no_grad()
def label_prototypes(model, labels: list[str], free_text: dict[str, str] | None = None) -> np.ndarray:
    """One L2-normalised text prototype per candidate label (CL ID, or a key of `free_text`)."""
    ontology = get_ontology()
    free_text = free_text or {}
    protos = []
    for label in labels:
        if label in free_text:
            phrasings = label_texts(label, ontology, label=free_text[label])
        else:
            phrasings = label_texts(label, ontology)
        f = model.text_features(phrasings).float()
        f = torch.nn.functional.normalize(f, dim=-1).mean(0)
        protos.append(torch.nn.functional.normalize(f, dim=0).numpy())
    return np.stack(protos).astype(np.float32)


def corpus_label_texts(corpus: Corpus) -> list[str]:
    """Every phrasing of every cell type of a corpus (types kept as free text use their label)."""
    ontology = get_ontology()
    texts = []
    for key, rec in corpus.manifest["cell_types"].items():
        texts += label_texts(rec["label"], ontology, label=rec["label"]) if key.startswith("unmatched:") \
            else label_texts(key, ontology)
    return texts


def predict_by_text(embeddings: np.ndarray, prototypes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(index of the most similar prototype, its cosine similarity) per cell."""
    sim = embeddings @ prototypes.T
    best = sim.argmax(1)
    return best, sim[np.arange(len(best)), best]


def zero_shot_accuracy(model, corpus: Corpus, split: str, loader_cfg: LoaderConfig, progress: bool = False) -> float:
    """Share of cells of a split whose most similar label text (among the corpus's types) is their own type."""
    emb = embed_split(model, corpus, split, loader_cfg, progress)
    candidates = corpus.cell_types
    best, _ = predict_by_text(emb.embeddings, label_prototypes(model, candidates))
    pred = [candidates[i] for i in best]
    return float(np.mean([p == t for p, t in zip(pred, emb.labels)]))
