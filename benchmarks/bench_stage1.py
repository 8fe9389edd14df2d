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

On a GPU (``--device cuda``, one rank, ``make bench-gpu``) the text tower can be BERT-base-sized (``--text-tower
bert-base``: 768 wide, 12 layers, random weights; speed does not depend on them) and the table adds the model FLOPs
utilisation: FLOPs of one training step counted by ``torch.utils.flop_counter`` on the same model and batch (text
embeddings already cached, as in steady-state training of a frozen text tower, so the figure is a lower bound),
times the measured cells/s, over the GPU's dense bf16 peak (``--peak-tflops``; known for A100, H100 and H200).

    python benchmarks/bench_stage1.py [--size human|demo] [--steps 6] [--precisions fp32,autocast-bf16,bf16]
    python benchmarks/bench_stage1.py --device cuda --precisions bf16 --text-tower bert-base --batch-size 32

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

import torch
import yaml
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoTokenizer, BertConfig, BertModel

from common import record, table
from scmm.config import from_dict
from scmm.data_pipeline.loader import CorpusLoader
from scmm.data_pipeline.store import Corpus
from scmm.data_pipeline.vocab import GeneVocab
from scmm.model.aligner import CellTextAligner
from scmm.model.text_tower import default_text_model_path
from scmm.pretrain.train import Stage1Config

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


def bert_base(work: Path) -> Path:
    """A BERT-base-sized text encoder with random weights and the default text tower's tokenizer (cached)."""
    folder = work / "bert_base_random"
    if not (folder / "config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(default_text_model_path(), local_files_only=True)
        torch.manual_seed(0)
        BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                             intermediate_size=3072), add_pooling_layer=False).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return folder


def config(size: str, corpus: Path, out: Path, precision: str, steps: int, batch_size: int,
           text_tower: Path | None) -> dict:
    if size == "demo":
        cfg = yaml.safe_load((ROOT / "configs" / "stage1_demo.yaml").read_text())
        cfg["corpus"] = str(ROOT / cfg["corpus"])
    else:
        cfg = {"corpus": str(corpus),
               "model": {"cell_tower": {"d_model": 512, "nhead": 8, "d_hid": 512, "nlayers": 12, "dropout": 0.0},
                         "text_tower": {"freeze": True, "max_length": 128},
                         "qformer": {"num_queries": 32, "num_layers": 6, "embed_dim": 256, "dropout": 0.0},
                         "loss": {"matching_max_cells": 4}},
               "encoding": {"n_bins": 51, "max_len": 1200}, "loader": {"batch_size": batch_size, "shuffle_buffer": 512}}
    if text_tower is not None:
        cfg["model"]["text_tower"]["path"] = str(text_tower)
    cfg.update(out=str(out), deepspeed=str(ROOT / "configs" / "deepspeed" / "zero2.json"))
    # a long schedule cut short with --stop-at: no export (consolidation, zero-shot evaluation) after the steps
    cfg["train"] = {**cfg.get("train", {}), "precision": precision, "steps": 10 * steps, "log_every": 2,
                    "save_every": 10 ** 6, "warmup_steps": 2}
    return cfg


def run(cfg: dict, ranks: int, work: Path, steps: int, device: str) -> float:
    path = work / f"{Path(cfg['out']).name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TORCH_EXTENSIONS_DIR": str(ROOT / ".cache" / "torch_extensions")}
    if device == "cpu":
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS=str(2 // ranks))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
           str(ROOT / "pretrain" / "train.py"), "--config", str(path), "--stop-at", str(steps)]
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows = [json.loads(line) for line in (Path(cfg["out"]) / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["cells_per_s"] for r in rows[1:]]
    return sum(speeds) / len(speeds)


PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}  # dense, SXM parts


def flops_per_cell(cfg: dict, device: str, precision: str) -> float:
    """Model FLOPs of one training step (forward and backward) per cell, counted on one batch of the run's data."""
    run_cfg = from_dict(Stage1Config, cfg)
    corpus = Corpus(run_cfg.corpus)
    vocab = GeneVocab.load(corpus.path)
    batch = next(iter(CorpusLoader(corpus, "train", run_cfg.loader, run_cfg.encoding, vocab)))
    model = CellTextAligner(run_cfg.model, vocab, run_cfg.encoding).to(device).train()
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=precision != "fp32")
    with autocast:
        model.text_pooled(batch["text"])  # cached, as in steady-state training with a frozen text tower
        with FlopCounterMode(display=False) as counter:
            model(batch)["loss"].backward()
    return counter.get_total_flops() / batch["gene_ids"].shape[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=("human", "demo"), default="human")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--precisions", default="fp32,autocast-bf16,bf16")
    ap.add_argument("--genes-per-cell", type=int, default=790)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--batch-size", type=int, default=8, help="cells per rank per step (human size)")
    ap.add_argument("--text-tower", choices=("minilm", "bert-base"), default="minilm")
    ap.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak (default: known parts)")
    ap.add_argument("--work", default=str(ROOT / "runs" / "bench"))
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    corpus = human_corpus(work, args.genes_per_cell) if args.size == "human" else None
    text_tower = bert_base(work) if args.text_tower == "bert-base" else None
    rank_counts = (1, 2) if args.device == "cpu" else (1,)
    peak = args.peak_tflops
    if args.device == "cuda" and peak is None:
        name = torch.cuda.get_device_name(0)
        peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    results, rows = {}, []
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        for precision in args.precisions.split(","):
            speed = {}
            for ranks in rank_counts:
                out = Path(tmp) / f"{precision}_{ranks}"
                cfg = config(args.size, corpus, out, precision, args.steps, args.batch_size, text_tower)
                speed[ranks] = run(cfg, ranks, Path(tmp), args.steps, args.device)
            result = {"cells_per_s_1_rank": speed[1]}
            row = [precision, f"{speed[1]:.2f}"]
            if 2 in speed:
                result.update(cells_per_s_2_ranks=speed[2], scaling_efficiency=speed[2] / (2 * speed[1]))
                row += [f"{speed[2]:.2f}", f"{result['scaling_efficiency']:.2f}"]
            if args.device == "cuda":
                flops = flops_per_cell(cfg, args.device, precision)
                result.update(gflops_per_cell=flops / 1e9, tflops=flops * speed[1] / 1e12)
                result["mfu"] = result["tflops"] / peak if peak else None
                row += [f"{flops / 1e9:.0f}", f"{result['tflops']:.1f}", f"{result['mfu']:.1%}" if peak else "-"]
            results[precision] = result
            rows.append(row)
    base = results.get("fp32", {}).get("cells_per_s_1_rank")
    for row, precision in zip(rows, results):
        row.append(f"{results[precision]['cells_per_s_1_rank'] / base:.2f}x" if base else "-")
    header = ["precision", "cells/s, 1 process"]
    header += ["cells/s, 2 ranks", "scaling 1 -> 2"] if args.device == "cpu" else \
        ["GFLOP/cell", "TFLOP/s", f"MFU (peak {peak} TFLOP/s)"]
    where = "2 CPU cores" if args.device == "cpu" else torch.cuda.get_device_name(0)
    print(f"\nstage 1, {args.size} size, text tower {args.text_tower}, {args.steps} steps (first window dropped), "
          f"{where}:")
    print(table(header + ["1 process vs fp32"], rows))
    record("stage1", {"size": args.size, "steps": args.steps, "device": args.device, "text_tower": args.text_tower,
                      "batch_size": args.batch_size, "results": results})


if __name__ == "__main__":
    main()
