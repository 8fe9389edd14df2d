#!/usr/bin/env python
"""`scmm annotate` on a large synthetic h5ad: peak memory and cells/s of the whole command.

Steps (data cached in ``--out``; ``--fresh`` rebuilds):

1. ``scmm data synth --cells N --genes G`` (default 100,000 x 2,000; gene symbols from scGPT's census
   vocabulary, so the model's vocabulary covers them).
2. A corpus from the first ``--corpus-cells`` cells of that file (for the model's gene panel and candidate
   labels), an untrained stage-1 model of the chosen size on it (``--size tiny``: d_model 16, 1 layer; ``demo``:
   the demo config, d_model 128, 4 layers, Q-Former 2 layers x 8 queries), packaged with ``scmm package``.
   Weights are untrained: speed and memory do not depend on them.
3. ``scmm annotate IN.h5ad --model PKG --out OUT.h5ad --chunk-size C --batch-size B`` in a subprocess whose
   RSS (summed over the process tree) is polled with psutil every 0.1 s; also the process's own ``VmHWM``.

Reported: peak RSS (target under 4 GB), wall time, cells/s of the whole command (model load and output
included) and the embedding rate the command logs (``embedded N cells in T s (R cells/s)``).

    python benchmarks/bench_annotate.py [--cells 100000] [--genes 2000] [--size tiny|demo] [--out runs/bench]

Writes ``<out>/bench_annotate.json``. The CPU of the machine this ran on may be shared: compare figures from
one run, not across machines.

Precision: ``--precision auto`` is fp32 on CPU (the measurement behind it is in BENCHMARKS.md); pass
``--precision bf16`` to re-check on another machine.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

from common import SIZES, save_untrained_stage1

ROOT = Path(__file__).resolve().parents[1]

def _run(cmd: list[str], env=None) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{r.stderr[-3000:]}")


def prepare(out: Path, cells: int, genes: int, corpus_cells: int, size: str, fresh: bool) -> tuple[Path, Path]:
    import anndata as ad

    from scmm.data_pipeline.build import BuildConfig, build_corpus
    from scmm.package import package_model

    out.mkdir(parents=True, exist_ok=True)
    data = out / f"synth_{cells}x{genes}.h5ad"
    if fresh or not data.exists():
        data.unlink(missing_ok=True)
        _run([sys.executable, "-m", "scmm.cli", "data", "synth", "--cells", str(cells), "--genes", str(genes),
              "--out", str(data), "--quiet"])
    pkg = out / f"annotate_model_{size}_{genes}"
    if fresh or not (pkg / "scmm_model.json").exists():
        import shutil
        small = out / f"synth_head_{corpus_cells}x{genes}.h5ad"
        backed = ad.read_h5ad(data, backed="r")
        backed[:corpus_cells].to_memory().write_h5ad(small)
        corpus = out / f"annotate_corpus_{genes}"
        shutil.rmtree(corpus, ignore_errors=True)
        build_corpus(BuildConfig(inputs=[small], out=corpus, shard_size=1000, progress=False))
        stage1 = out / f"annotate_stage1_{size}" / "model"
        shutil.rmtree(stage1.parent, ignore_errors=True)
        save_untrained_stage1(corpus, stage1, size)
        package_model(stage1, corpus, pkg)
    return data, pkg


def measure(cmd: list[str]) -> dict:
    import psutil
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    ps = psutil.Process(proc.pid)
    peak = {"rss": 0, "hwm": 0}
    stop = threading.Event()

    def poll():
        while not stop.is_set():
            try:
                procs = [ps] + ps.children(recursive=True)
                peak["rss"] = max(peak["rss"], sum(p.memory_info().rss for p in procs))
                with open(f"/proc/{proc.pid}/status") as f:
                    m = re.search(r"VmHWM:\s+(\d+) kB", f.read())
                if m:
                    peak["hwm"] = max(peak["hwm"], int(m.group(1)) * 1024)
            except (psutil.Error, OSError):
                pass
            time.sleep(0.1)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - t0
    stop.set()
    thread.join()
    if proc.returncode != 0:
        raise SystemExit(f"annotate failed ({proc.returncode}):\n{stderr[-3000:]}")
    m = re.search(r"embedded (\d+) cells in ([\d.]+) s \(([\d.]+) cells/s\)", stderr)
    return {"wall_s": round(wall, 1), "peak_rss_bytes": peak["rss"], "peak_vmhwm_bytes": peak["hwm"],
            "embed_cells_per_s": float(m.group(3)) if m else None, "embed_s": float(m.group(2)) if m else None,
            "log": [line for line in stderr.splitlines() if "scmm" in line and "INFO" in line][-8:]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cells", type=int, default=100_000)
    ap.add_argument("--genes", type=int, default=2_000)
    ap.add_argument("--corpus-cells", type=int, default=2_000)
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny")
    ap.add_argument("--chunk-size", type=int, default=10_000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    ap.add_argument("--out", default="runs/bench")
    ap.add_argument("--fresh", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    data, pkg = prepare(out, args.cells, args.genes, args.corpus_cells, args.size, args.fresh)
    result_h5ad = out / "bench_annotated.h5ad"
    result_h5ad.unlink(missing_ok=True)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    cmd = [sys.executable, "-m", "scmm.cli", "annotate", str(data), "--model", str(pkg), "--out", str(result_h5ad),
           "--chunk-size", str(args.chunk_size), "--batch-size", str(args.batch_size), "--precision",
           args.precision, "--quiet"]
    res = measure(cmd)
    res.update({"cells": args.cells, "genes": args.genes, "size": args.size, "chunk_size": args.chunk_size,
                "batch_size": args.batch_size, "precision": args.precision, "threads": args.threads,
                "cells_per_s_total": round(args.cells / res["wall_s"], 1), "input_bytes": data.stat().st_size,
                "machine": f"{platform.machine()} {os.cpu_count()} CPUs (shared), load avg {os.getloadavg()[0]:.1f}",
                "date": time.strftime("%Y-%m-%d %H:%M")})
    result_h5ad.unlink(missing_ok=True)
    (out / "bench_annotate.json").write_text(json.dumps(res, indent=1))
    gb = 1024 ** 3
    print(f"scmm annotate, {args.cells} cells x {args.genes} genes, model '{args.size}', chunk {args.chunk_size}, "
          f"batch {args.batch_size}, {args.threads} threads")
    print(f"  peak RSS (process tree) {res['peak_rss_bytes'] / gb:.2f} GB, VmHWM {res['peak_vmhwm_bytes'] / gb:.2f} GB "
          f"(target < 4 GB)")
    print(f"  wall {res['wall_s']} s = {res['cells_per_s_total']} cells/s end to end; embedding "
          f"{res['embed_cells_per_s']} cells/s")
    print(f"  {res['machine']}")


if __name__ == "__main__":
    main()
