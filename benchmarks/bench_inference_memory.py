#!/usr/bin/env python
"""Peak memory of `scmm embed|annotate|describe` at two input sizes, or of `scmm generate` at two ``--n``: bounded by
the chunk size, not the file.

The output is written chunk by chunk (``obsm['X_scmm']`` filled per chunk, the new obs columns held as compact
arrays: about 15 bytes per cell for annotate), the input's obs table is never read and its expression matrix is
copied byte for byte, so the peak RSS should not grow with the number of cells (goal: the two peaks within 10 %).

Steps: the synthetic inputs and the packaged untrained model of :mod:`bench_annotate` (``scmm data synth
--cells N --genes G``, cached in ``--out``; ``--data-dir`` reuses existing ``synth_NxG.h5ad`` files), then
``scmm <command> IN --model PKG --out OUT`` at each size in a subprocess whose process-tree RSS is polled every
0.1 s (:func:`bench_annotate.measure`).

    python benchmarks/bench_inference_memory.py [--cells 100000 1000000] [--command annotate] [--out runs/bench]
    python benchmarks/bench_inference_memory.py --command embed --model runs/demo/stage2/model   # the demo model
    python benchmarks/bench_inference_memory.py --command generate --model runs/demo/stage2/model --cells 100000 1000000

``--model``: run that model folder instead of the packaged untrained one (``describe`` and ``generate`` need a
stage-2 model). ``generate`` writes ``--cells`` pseudo-cells from one text (no input file).

Appends one JSON line to benchmarks/results.jsonl (benchmark ``inference_memory``).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from bench_annotate import measure, prepare

from common import SIZES, record


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cells", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--genes", type=int, default=2_000)
    ap.add_argument("--command", choices=("embed", "annotate", "describe", "generate"), default="annotate")
    ap.add_argument("--model", default=None, help="a model folder to run (default: the packaged untrained model)")
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny")
    ap.add_argument("--corpus-cells", type=int, default=2_000)
    ap.add_argument("--chunk-size", type=int, default=10_000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    ap.add_argument("--out", default="runs/bench")
    ap.add_argument("--data-dir", default=None, help="a folder already holding synth_<cells>x<genes>.h5ad files")
    args = ap.parse_args()
    if args.command in ("describe", "generate") and not args.model:
        ap.error(f"--command {args.command} needs --model (a stage-2 model folder)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.data_dir:  # reuse inputs made before: link them where prepare() looks
        for n in args.cells:
            name = f"synth_{n}x{args.genes}.h5ad"
            if not (out / name).exists():
                (out / name).symlink_to(Path(args.data_dir).resolve() / name)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    runs = {}
    for n in args.cells:
        result = out / f"bench_memory_{n}.h5ad"
        result.unlink(missing_ok=True)
        if args.command == "generate":
            cmd = ["generate", "--model", str(args.model), "--text", "A natural killer cell from the blood.", "--n",
                   str(n), "--out", str(result)]
        else:
            data, pkg = prepare(out, n, args.genes, args.corpus_cells, args.size, False)
            cmd = [args.command, str(data), "--model", str(args.model or pkg), "--out", str(result),
                   "--chunk-size", str(args.chunk_size), "--batch-size", str(args.batch_size), "--quiet"]
        res = measure([sys.executable, "-m", "scmm.cli", *cmd])
        result.unlink(missing_ok=True)
        res.pop("log", None)
        runs[str(n)] = {**res, "load_1min_after": round(os.getloadavg()[0], 2)}
        print(f"{args.command} {n} cells: peak RSS {res['peak_rss_bytes'] / 2**20:.0f} MiB, VmHWM "
              f"{res['peak_vmhwm_bytes'] / 2**20:.0f} MiB, {res['wall_s']} s", flush=True)
    peaks = [r["peak_rss_bytes"] for r in runs.values()]
    ratio = max(peaks) / min(peaks)
    print(f"largest / smallest peak RSS: {ratio:.3f} (goal <= 1.10)")
    record("inference_memory", {"command": args.command, "genes": args.genes, "size": args.size,
                                "model": args.model or "packaged untrained (--size)",
                                "chunk_size": args.chunk_size, "batch_size": args.batch_size,
                                "threads": args.threads, "runs": runs, "peak_ratio": round(ratio, 4)})


if __name__ == "__main__":
    main()
