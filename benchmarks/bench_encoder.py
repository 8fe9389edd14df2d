#!/usr/bin/env python
"""The cell tower against upstream scGPT's encoder, side by side in one run: cells/s and agreement.

Both sides hold the same weights: an upstream ``TransformerModel`` (scgpt 0.2.4, the test suite's reference, with
its own eval path: torch's nested-tensor fast path) is written as an scGPT checkpoint folder and loaded into scmm's
``CellTower`` with ``tower_from_scgpt``. The workload is what a user's data looks like: batches of 32 cells with
real-length expression (``<cls>`` + about 790 genes on average, drawn from a normal distribution with sd 250,
clipped to 200-1199 genes, one cell at the full 1199), padded to 1200 tokens, as a loader delivers them.

Variants, timed interleaved (A B C ..., repeated) so that a busy machine slows all of them alike:

* ``upstream``: ``TransformerModel._encode`` in fp32 (its ``<cls>`` state is the cell embedding);
* ``scmm fp32``: ``CellTower.cell_embedding`` under ``torch.inference_mode`` (cells grouped by length, no work on
  padding);
* ``scmm bf16``: the same with bf16 weights (``tower.to(torch.bfloat16)``), what ``scmm embed --precision auto``
  runs on a CPU or GPU with native bf16 products.

Reported per size: cells/s (median over repetitions), the ratio to upstream, and the smallest per-cell cosine
similarity of each variant's embeddings to scmm fp32's (and of scmm fp32's to upstream's).

    python benchmarks/bench_encoder.py [--sizes human,demo] [--repeats 3] [--threads 2] [--device cpu]

Appends one JSON line to ``benchmarks/results.jsonl`` (see ``benchmarks/common.py``).
"""
from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import record, table

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import scgpt_reference as ref
from scmm.model.scgpt import tower_from_scgpt

SIZES = {"human": dict(d_model=512, nhead=8, d_hid=512, nlayers=12), "demo": dict(d_model=128, nhead=4, d_hid=256,
                                                                                      nlayers=4)}
N_GENES = 20_000
BATCH = 32
WIDTH = 1200


def workload(vocab: dict[str, int], seed: int = 0):
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.normal(790, 250, BATCH).round().astype(int), 200, WIDTH - 1) + 1
    lengths[0] = WIDTH
    return ref.make_batch(vocab, lengths=tuple(int(x) for x in lengths), max_len=WIDTH, seed=seed + 1), lengths


def run_size(name: str, repeats: int, device: torch.device) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        upstream, _, vocab = ref.make_scgpt_checkpoint(Path(tmp), n_genes=N_GENES, dropout=0.2, **SIZES[name])
        tower, _ = tower_from_scgpt(tmp, allow_missing_heads=True)
    upstream, tower = upstream.to(device).eval(), tower.to(device).eval()
    tower_bf16 = copy.deepcopy(tower).to(torch.bfloat16)
    (gene_ids, values, padding), lengths = workload(vocab)
    gene_ids, values, padding = gene_ids.to(device), values.to(device), padding.to(device)
    variants = {
        "upstream": lambda: upstream._encode(gene_ids, values, padding)[:, 0],
        "scmm fp32": lambda: tower.cell_embedding(gene_ids, values, padding),
        "scmm bf16": lambda: tower_bf16.cell_embedding(gene_ids, values, padding),
    }
    outputs, times = {}, {k: [] for k in variants}
    with torch.inference_mode():
        for rep in range(repeats + 1):  # the first round warms up and is not timed
            for key, fn in variants.items():
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t = time.perf_counter()
                out = fn()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if rep:
                    times[key].append(time.perf_counter() - t)
                outputs[key] = out.float().cpu()
    cos = {k: float(torch.nn.functional.cosine_similarity(v, outputs["scmm fp32"], dim=-1).min()) for k, v in
           outputs.items()}
    rate = {k: BATCH / float(np.median(v)) for k, v in times.items()}
    return {"size": name, **SIZES[name], "mean_tokens": float(lengths.mean()), "padded_to": WIDTH,
            "cells_per_s": rate, "ratio_to_upstream": {k: rate[k] / rate["upstream"] for k in rate},
            "min_cosine_to_scmm_fp32": cos}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="human,demo")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    results = []
    for name in args.sizes.split(","):
        r = run_size(name, args.repeats, device)
        results.append(r)
        rows = [[k, f"{r['cells_per_s'][k]:.2f}", f"{r['ratio_to_upstream'][k]:.2f}x",
                 f"{r['min_cosine_to_scmm_fp32'][k]:.6f}"] for k in r["cells_per_s"]]
        print(f"\n{name} tower (d_model {r['d_model']}, {r['nlayers']} layers), {BATCH} cells of "
              f"{r['mean_tokens']:.0f} tokens on average padded to {WIDTH}, {args.threads} threads, {device}:")
        print(table(["variant", "cells/s", "vs upstream", "min cosine to scmm fp32"], rows))
    record("encoder", {"device": str(device), "threads": args.threads, "batch": BATCH, "results": results})


if __name__ == "__main__":
    main()
