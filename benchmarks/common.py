"""Helpers shared by the benchmarks: an untrained stage-1 model of a chosen size (speed and memory do not depend
on the weights)."""
from __future__ import annotations

from pathlib import Path

import torch

from scmm.data_pipeline.encoding import CellEncoding
from scmm.data_pipeline.store import Corpus
from scmm.data_pipeline.vocab import GeneVocab
from scmm.eval.annotate import corpus_label_texts
from scmm.model.aligner import AlignerConfig, CellTextAligner
from scmm.model.cell_tower import CellTowerConfig
from scmm.model.qformer import QFormerConfig
from scmm.model.text_tower import TextTowerConfig

SIZES = {
    "tiny": dict(cell=dict(d_model=16, nhead=2, d_hid=32, nlayers=1),
                 q=dict(num_queries=2, num_layers=1, embed_dim=16)),
    "small": dict(cell=dict(d_model=64, nhead=4, d_hid=128, nlayers=2, dropout=0.0),
                  q=dict(num_queries=4, num_layers=1, embed_dim=32)),
    "demo": dict(cell=dict(d_model=128, nhead=4, d_hid=256, nlayers=4, attn_dropout=0.0),
                 q=dict(num_queries=8, num_layers=2, embed_dim=128)),
}


def save_untrained_stage1(corpus: Path, folder: Path, size: str, encoding: CellEncoding | None = None) -> Path:
    """An untrained stage-1 model of ``SIZES[size]`` over ``corpus``'s vocabulary, saved at ``folder``."""
    torch.manual_seed(0)
    s = SIZES[size]
    cfg = AlignerConfig(cell_tower=CellTowerConfig(**s["cell"]), text_tower=TextTowerConfig(freeze=True),
                        qformer=QFormerConfig(**s["q"]))
    model = CellTextAligner(cfg, GeneVocab.load(corpus), encoding or CellEncoding(n_bins=0))
    model.set_text_center(corpus_label_texts(Corpus(corpus)))
    model.save_pretrained(folder)
    return folder
