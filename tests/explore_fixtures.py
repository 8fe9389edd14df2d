"""A small h5ad and a complete (tiny, untrained) stage-1 + stage-2 package for the ``scmm explore`` tests.

The h5ad has readable cell-type labels, an ``obsm['X_umap']`` with one cluster per type, a numeric column, a
program column and an obs label that is HTML (``<img src=x onerror=alert(1)>``: the page must show it as text).
:func:`aligned_embeddings` gives each cell an ``obsm['X_scmm']`` near the model's own text embedding of its type's
label, so that the search path (text tower -> similarity to every cell -> top list) can be checked end to end
with a model too small to have learned it (the demo's trained model is measured separately).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

from conftest import CELL_TYPES, make_adata, save_tiny_stage1

XSS = "<img src=x onerror=alert(1)>"
LABELS = {"CL:0000084": "T cell", "CL:0000236": "B cell", "CL:0000623": "natural killer cell",
          "CL:0001054": "CD14-positive monocyte"}


def explore_adata(n_cells: int = 120, seed: int = 0):
    adata = make_adata(n_cells=n_cells, seed=seed)
    types = adata.obs["cell_type_ontology_term_id"].astype(str)
    adata.obs["cell_type"] = pd.Categorical([LABELS[t] for t in types])
    adata.obs["note"] = pd.Categorical([XSS if i % 5 == 0 else "plain" for i in range(n_cells)])
    adata.obs["n_counts"] = np.asarray(adata.X.sum(1)).ravel().astype(np.float32)
    adata.obs["program_interferon"] = np.linspace(0, 1, n_cells, dtype=np.float32)
    rng = np.random.default_rng(seed)
    centres = {t: (4.0 * np.cos(k * np.pi / 2), 4.0 * np.sin(k * np.pi / 2)) for k, t in enumerate(CELL_TYPES)}
    adata.obsm["X_umap"] = (np.array([centres[t] for t in types]) + rng.normal(0, 0.6, (n_cells, 2))
                            ).astype(np.float32)
    return adata


def aligned_embeddings(model, labels: list[str], noise: float = 0.05, seed: int = 0) -> np.ndarray:
    """Each cell's embedding: the model's text embedding of its label plus a little noise, normalised."""
    names = sorted(set(labels))
    with torch.inference_mode():
        feats = torch.nn.functional.normalize(model.aligner.text_features(names).float(), dim=-1).numpy()
    rng = np.random.default_rng(seed)
    emb = feats[[names.index(lab) for lab in labels]] + rng.normal(0, noise, (len(labels), feats.shape[1]))
    return (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)


def _tiny_lm(corpus: Path, folder: Path) -> Path:
    from scmm.data_pipeline.instructions import PROMPTS
    from scmm.data_pipeline.store import Corpus
    from scmm.model.llm import LlamaSize, build_llama, train_tokenizer
    texts = [str(t) for s in Corpus(corpus).iter_shards("train", columns=("text",)) for t in s.obs["text"]]
    texts += [p for ps in PROMPTS.values() for p in ps] + list(LABELS.values()) + ["blood"]
    tokenizer = train_tokenizer(texts, folder, vocab_size=400)
    torch.manual_seed(0)
    model = build_llama(LlamaSize(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  num_key_value_heads=2, max_position_embeddings=512), len(tokenizer))
    model.save_pretrained(folder)
    return folder


def build_package(root: Path) -> tuple[Path, Path]:
    """(a stage-1 + stage-2 package, the bare stage-1 folder) over a corpus of the explore data (tiny, untrained)."""
    from scmm.data_pipeline.build import BuildConfig, build_corpus
    from scmm.data_pipeline.store import Corpus
    from scmm.finetune.pairs import PairBuilder, hvg_info
    from scmm.finetune.train import load_config
    from scmm.model.stage2 import Stage2Model
    from scmm.package import package_model
    root.mkdir(parents=True, exist_ok=True)
    source = root / "train.h5ad"
    explore_adata(n_cells=160, seed=1).write_h5ad(source)
    corpus = root / "corpus"
    build_corpus(BuildConfig(inputs=[source], out=corpus, shard_size=64, progress=False))
    stage1 = save_tiny_stage1(corpus, root / "stage1" / "model", d_model=32, num_queries=2, embed_dim=32, max_len=32)
    lm = _tiny_lm(corpus, root / "lm")
    cfg_path = root / "stage2.yaml"
    cfg_path.write_text(yaml.safe_dump({
        "name": "explore-test", "corpus": str(corpus), "stage1": str(stage1), "lm": str(lm), "out": str(root / "s2"),
        "seed": 0,
        "model": {"lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
                  "bridge": {"decoder_hidden": 32}, "max_length": 160},
        "data": {"tasks": ["describe", "cell_type", "tissue"], "n_hvg": 12},
        "loader": {"batch_size": 4, "shuffle_buffer": 64},
        "train": {"steps": 1, "lr": 3e-3, "warmup_steps": 1, "log_every": 1, "save_every": 2, "precision": "fp32"},
        "refit": {"steps": 5, "batch_size": 4, "log_every": 2}}))
    cfg = load_config(str(cfg_path))
    c = Corpus(corpus)
    hvg = hvg_info(c, cfg.data.n_hvg)
    torch.manual_seed(0)
    stage2 = Stage2Model.build(cfg.model, cfg.stage1, cfg.lm, hvg)
    pairs = PairBuilder(c, "train", cfg.data.tasks, 0, np.asarray(hvg["indices"]), stage2.builder)
    stage2.decoder.init_from_profiles(pairs.x)
    stage2.save_pretrained(root / "stage2" / "model")
    metrics = root / "metrics.json"
    metrics.write_text(json.dumps({"annotation": {"accuracy": 0.5, "macro_f1": 0.4, "ontology_score": 0.6,
                                                  "n_cells": 16, "n_classes": 4}}))
    package = package_model(stage1, corpus, root / "package", stage2=root / "stage2" / "model", metrics=metrics)
    return package, stage1
