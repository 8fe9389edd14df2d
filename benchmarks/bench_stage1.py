#!/usr/bin/env python
"""Stage-1 training throughput under DeepSpeed: cells/s per precision, on 1 process and on 2 ranks.

The run is a real `pretrain/train.py` launch (torchrun, gloo on CPU) of the stage-1 model at one of two sizes:

* ``human``: the scGPT-human cell tower (512 wide, 12 layers, 8 heads), the MiniLM text tower (frozen) and a
  32-query, 6-layer Q-Former; cells of a synthetic corpus with about ``--genes-per-cell`` expressed genes, at most
  1,200 tokens; batches of 8 cells per rank;
* ``demo``: `configs/stage1_demo.yaml` on the demo corpus.

Each configuration trains ``--steps`` steps; cells/s comes from ``metrics.jsonl`` (summed over ranks), the first
window (warm-up) dropped. Precisions: ``fp32``, ``autocast-bf16`` (fp32 weights, bf16 matmuls) and ``bf16``
(DeepSpeed's bf16 weights). The scaling efficiency from 1 to 2 ranks is (cells/s on 2 ranks) / (2 x cells/s on 1),
each rank on its own core (``OMP_NUM_THREADS=1`` with 2 ranks, 2 threads with 1).

    python benchmarks/bench_stage1.py [--size human|demo] [--steps 6] [--precisions fp32,autocast-bf16,bf16]

Prints a table and appends a JSON line to ``benchmarks/results.jsonl``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from common import record, table

ROOT = Path(__file__).resolve().parents[1]


def human_corpus(work: Path, genes_per_cell: int) -> Path:
    """A synthetic corpus whose cells express about ``genes_per_cell`` genes (cached in ``work``)."""
    corpus = work / f"corpus_{genes_per_cell}"
    if (corpus / "manifest.json").is_file():
        return corpus
    h5ad = work / f"synth_{genes_per_cell}.h5ad"
    n_genes = int(genes_per_cell * 10)  # scmm data synth expresses about a tenth of the genes per cell
    scmm = [sys.executable, "-m", "scmm.cli"]
    subprocess.run([*scmm, "data", "synth", "--cells", "3000", "--genes", str(n_genes), "--out", str(h5ad),
                    "--overwrite", "--quiet"], check=True)
    subprocess.run([*scmm, "data", "build", str(h5ad), "--out", str(corpus), "--shard-size", "1000", "--quiet",
                    "--overwrite"], check=True, stdout=subprocess.DEVNULL)
    return corpus


def config(size: str, corpus: Path, out: Path, precision: str, steps: int) -> dict:
    if size == "demo":
        cfg = yaml.safe_load((ROOT / "configs" / "stage1_demo.yaml").read_text())
        cfg["corpus"] = str(ROOT / cfg["corpus"])
    else:
        cfg = {"corpus": str(corpus),
               "model": {"cell_tower": {"d_model": 512, "nhead": 8, "d_hid": 512, "nlayers": 12, "dropout": 0.0},
                         "text_tower": {"freeze": True, "max_length": 128},
                         "qformer": {"num_queries": 32, "num_layers": 6, "embed_dim": 256, "dropout": 0.0},
                         "loss": {"matching_max_cells": 4}},
               "encoding": {"n_bins": 51, "max_len": 1200}, "loader": {"batch_size": 8, "shuffle_buffer": 512}}
    cfg.update(out=str(out), deepspeed=str(ROOT / "configs" / "deepspeed" / "zero2.json"))
    # a long schedule cut short with --stop-at: no export (consolidation, zero-shot evaluation) after the steps
    cfg["train"] = {**cfg.get("train", {}), "precision": precision, "steps": 10 * steps, "log_every": 2,
                    "save_every": 10 ** 6, "warmup_steps": 2}
    return cfg


def run(cfg: dict, ranks: int, work: Path, steps: int) -> float:
    path = work / f"{Path(cfg['out']).name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": str(2 // ranks),
           "TORCH_EXTENSIONS_DIR": str(ROOT / ".cache" / "torch_extensions")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
           str(ROOT / "pretrain" / "train.py"), "--config", str(path), "--stop-at", str(steps)]
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows = [json.loads(line) for line in (Path(cfg["out"]) / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["cells_per_s"] for r in rows[1:]]
    return sum(speeds) / len(speeds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=("human", "demo"), default="human")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--precisions", default="fp32,autocast-bf16,bf16")
    ap.add_argument("--genes-per-cell", type=int, default=790)
    ap.add_argument("--work", default=str(ROOT / "runs" / "bench"))
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    corpus = human_corpus(work, args.genes_per_cell) if args.size == "human" else None
    results, rows = {}, []
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        for precision in args.precisions.split(","):
            speed = {}
            for ranks in (1, 2):
                out = Path(tmp) / f"{precision}_{ranks}"
                speed[ranks] = run(config(args.size, corpus, out, precision, args.steps), ranks, Path(tmp), args.steps)
            eff = speed[2] / (2 * speed[1])
            results[precision] = {"cells_per_s_1_rank": speed[1], "cells_per_s_2_ranks": speed[2],
                                  "scaling_efficiency": eff}
            rows.append([precision, f"{speed[1]:.2f}", f"{speed[2]:.2f}", f"{eff:.2f}"])
    base = results.get("fp32", {}).get("cells_per_s_1_rank")
    for row, precision in zip(rows, results):
        row.append(f"{results[precision]['cells_per_s_1_rank'] / base:.2f}x" if base else "-")
    print(f"\nstage 1, {args.size} size, {args.steps} steps (first window dropped), 2 CPU cores:")
    print(table(["precision", "cells/s, 1 process", "cells/s, 2 ranks", "scaling 1 -> 2", "1 process vs fp32"],
                rows))
    record("stage1", {"size": args.size, "steps": args.steps, "results": results})


if __name__ == "__main__":
    main()
