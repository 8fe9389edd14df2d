"""Helpers shared by the benchmarks: recording results, printing tables, and an untrained stage-1 model of a chosen
size (speed and memory do not depend on the weights)."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import time
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

RESULTS = Path(__file__).resolve().parent / "results.jsonl"


def machine() -> dict:
    """What the figures were measured on: CPU model, cores, load, GPU."""
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "load_1min": round(os.getloadavg()[0], 2), "gpu": gpu,
            "torch": torch.__version__}


def _head() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=RESULTS.parent).stdout.strip() or None
    except OSError:
        return None


STARTED_ON = _head()  # the commit the benchmark's code came from: read when it starts (commits may land meanwhile)


def record(benchmark: str, figures: dict) -> dict:
    """Append one JSON line (date, commit, machine, figures) to benchmarks/results.jsonl; returns it."""
    line = {"benchmark": benchmark, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "commit": STARTED_ON, "machine": machine(), **figures}
    with RESULTS.open("a") as f:
        f.write(json.dumps(line) + "\n")
    return line


def table(header: list[str], rows: list[list]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


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
