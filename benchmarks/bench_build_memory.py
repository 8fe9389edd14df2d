"""Peak memory of `scmm data build` against the input's size: bounded by the chunk and shard size, not the file.

Synthesises (once, cached in --work) a `scmm data synth` h5ad per size, builds a corpus from each in a fresh
process and reads that process's peak resident memory (``getrusage(RUSAGE_CHILDREN).ru_maxrss`` of a wrapper
that runs only the build). The goal (issue 18): peaks at 100k and 1M cells within 10% of each other.

    python benchmarks/bench_build_memory.py --cells 100000 1000000 --genes 2000 --work /tmp/bench_build
    python benchmarks/bench_build_memory.py ... --jobs 1 2      # also the cells/s of --jobs N (interleaved)
    python benchmarks/bench_build_memory.py ... --timeline      # also the largest build's RSS peak per half
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

_WRAPPER = ("import json, resource, subprocess, sys, time; t = time.perf_counter(); "
            "r = subprocess.run(sys.argv[1:]); "
            "print(json.dumps({'rc': r.returncode, 'seconds': time.perf_counter() - t, "
            "'peak_rss_kib': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))")


def scmm_exe() -> str:
    return str(Path(sys.executable).with_name("scmm"))


def synth(path: Path, cells: int, genes: int) -> None:
    if path.exists():
        return
    subprocess.run([scmm_exe(), "data", "synth", "--cells", str(cells), "--genes", str(genes), "--out", str(path),
                    "--quiet"], check=True)


def rss_timeline(h5ad: Path, out: Path, every: float = 0.5) -> dict:
    """One build (--jobs 1) with its resident memory polled from /proc: the peak over the
    first and the second half of the run. Bounded memory: the second half's peak is not above the first's (the
    first half reaches the steady state of the three split buffers; a growth per cell would show after)."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [scmm_exe(), "data", "build", str(h5ad), "--out", str(out), "--quiet"]
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stderr=subprocess.DEVNULL)
    t0, samples = time.perf_counter(), []
    while proc.poll() is None:
        try:
            with open(f"/proc/{proc.pid}/status") as f:
                kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
            samples.append((time.perf_counter() - t0, kib / 1024))
        except (OSError, StopIteration):
            pass
        time.sleep(every)
    total = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)
    first = [m for t, m in samples if t < total / 2]
    second = [m for t, m in samples if t >= total / 2]
    return {"seconds": round(total, 1), "peak_first_half_mib": round(max(first), 1),
            "peak_second_half_mib": round(max(second), 1), "samples": len(samples)}


def build(h5ad: Path, out: Path, jobs: int | None) -> dict:
    """One build in a fresh process: seconds, peak RSS (MiB), cells/s."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [scmm_exe(), "data", "build", str(h5ad), "--out", str(out), "--quiet"]
    if jobs is not None:
        cmd += ["--jobs", str(jobs)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    line = subprocess.run([sys.executable, "-c", _WRAPPER, *cmd], capture_output=True, text=True, env=env,
                          check=True).stdout.strip().splitlines()[-1]
    res = json.loads(line)
    if res["rc"] != 0:
        raise SystemExit(f"build of {h5ad} failed (exit {res['rc']})")
    n = json.loads((out / "manifest.json").read_text())["n_cells"]
    shutil.rmtree(out, ignore_errors=True)
    return {"n_cells": n, "seconds": round(res["seconds"], 1), "peak_rss_mib": round(res["peak_rss_kib"] / 1024, 1),
            "cells_per_s": round(n / res["seconds"]), "load_1min": round(os.getloadavg()[0], 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--genes", type=int, default=2000)
    p.add_argument("--work", type=Path, default=Path("/tmp/bench_build_memory"))
    p.add_argument("--jobs", type=int, nargs="*", default=[], help="also time --jobs N builds (interleaved)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--timeline", action="store_true", help="also poll the largest build's RSS: peak per half")
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    inputs = {}
    for n in args.cells:
        inputs[n] = args.work / f"synth_{n}_{args.genes}.h5ad"
        synth(inputs[n], n, args.genes)
    memory = {}
    for n, h5ad in inputs.items():
        memory[str(n)] = build(h5ad, args.work / "corpus", None)
        print(f"{n:>9} cells: {memory[str(n)]}", flush=True)
    peaks = [m["peak_rss_mib"] for m in memory.values()]
    figures: dict = {"genes": args.genes, "builds": memory,
                     "peak_ratio_max_over_min": round(max(peaks) / min(peaks), 3)}
    if args.timeline:
        figures["rss_timeline"] = {"n_cells": max(inputs), **rss_timeline(inputs[max(inputs)], args.work / "corpus")}
        print(f"rss timeline: {figures['rss_timeline']}", flush=True)
    if args.jobs:
        largest = inputs[max(inputs)]
        runs: dict[str, list] = {str(j): [] for j in args.jobs}
        for _ in range(args.repeats):  # interleaved, so that a change of load hits every N alike
            for j in args.jobs:
                runs[str(j)].append(build(largest, args.work / "corpus", j))
                print(f"--jobs {j}: {runs[str(j)][-1]}", flush=True)
        figures["jobs"] = {"n_cells": max(inputs), "runs": runs}
    print(json.dumps(figures, indent=1))
    if not args.no_record:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from benchmarks.common import record
        record("build_memory", {**figures, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})


if __name__ == "__main__":
    main()
