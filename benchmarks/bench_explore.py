#!/usr/bin/env python
"""`scmm explore` at 100k and 1M synthetic cells: time to the first map, search latency, server memory.

Steps per size: ``scmm data synth --cells N`` and an untrained packaged model (:func:`bench_annotate.prepare`;
speed and memory do not depend on the weights); a copy of the synthetic file gets ``obsm['X_scmm']`` (random unit
vectors of the model's width: embedding 1M cells through the cell tower on a 2-core CPU takes hours and is
`scmm embed`'s benchmark, not this one) and ``obsm['X_umap']``, both written chunk by chunk. Then ``scmm explore``
runs in a subprocess and the benchmark times, over HTTP as the page does:

* first map: from the command's start to the page's first three answers (``/api/info``, ``/api/map``, the
  default colour ``/api/colour?obs=...``); also the three requests alone (a reload);
* search: ``POST /api/search`` for five queries (text tower + a similarity for every cell + the top 50), median;
* colour by a gene (one pass over the expression matrix);
* the server's RSS after these, and its peak (VmHWM);
* with ``--browser`` and /usr/bin/chromium: the page in headless chromium (WebGL on SwiftShader, the CPU): time
  until the map is drawn, and the mean time per animation frame while panning (each frame draws every point).

    python benchmarks/bench_explore.py [--cells 100000 1000000] [--browser] [--out runs/bench]

Appends one JSON line to benchmarks/results.jsonl (benchmark ``explore``).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import h5py
import numpy as np
from bench_annotate import prepare

from common import record, table
from scmm.atomic import publish_file

ROOT = Path(__file__).resolve().parents[1]
QUERIES = ["B cell", "monocytes with high interferon response", "natural killer cell from blood", "T cell",
           "a dividing cell"]


def with_map(data: Path, out: Path, dim: int, chunk: int = 100_000) -> Path:
    """A copy of ``data`` with random unit ``obsm['X_scmm']`` [n, dim] and a 2-D ``obsm['X_umap']``."""
    if out.exists():
        return out
    tmp = out.with_suffix(".part")
    shutil.copyfile(data, tmp)
    rng = np.random.default_rng(0)
    with h5py.File(tmp, "r+") as f:
        n = int(f["obs"][f["obs"].attrs["_index"]].shape[0])
        if "obsm" not in f:
            g = f.create_group("obsm")
            g.attrs["encoding-type"], g.attrs["encoding-version"] = "dict", "0.1.0"
        for key, width in (("X_scmm", dim), ("X_umap", 2)):
            ds = f["obsm"].create_dataset(key, shape=(n, width), dtype=np.float32)
            ds.attrs["encoding-type"], ds.attrs["encoding-version"] = "array", "0.2.0"
            for s in range(0, n, chunk):
                x = rng.normal(size=(min(chunk, n - s), width)).astype(np.float32)
                if key == "X_scmm":
                    x /= np.linalg.norm(x, axis=1, keepdims=True)
                else:
                    x *= 3
                ds[s:s + len(x)] = x
    publish_file(tmp, out)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, body: dict | None = None) -> tuple[bytes, float]:
    t0 = time.perf_counter()
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    with urllib.request.urlopen(req, timeout=3600) as r:
        content = r.read()
    return content, time.perf_counter() - t0


def _rss(pid: int) -> tuple[int, int]:
    with open(f"/proc/{pid}/status") as f:
        text = f.read()
    rss = int(re.search(r"VmRSS:\s+(\d+) kB", text).group(1)) * 1024
    hwm = int(re.search(r"VmHWM:\s+(\d+) kB", text).group(1)) * 1024
    return rss, hwm


def measure(data: Path, model: Path, browser: bool) -> dict:
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "scmm.cli", "explore", str(data), "--model", str(model),
                             "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)
    try:
        while True:
            line = proc.stdout.readline()
            if not line:
                raise SystemExit(f"scmm explore stopped: {proc.wait()}")
            if "open http" in line:
                break
        base = f"http://127.0.0.1:{port}/"
        for _ in range(400):
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.05)
        startup = time.perf_counter() - t0
        info, _ = _get(base + "api/info")
        info = json.loads(info)
        _, t_map = _get(base + "api/map")
        _, t_colour = _get(base + f"api/colour?obs={info['default_colour']}")
        first_map = time.perf_counter() - t0
        reload = sum(_get(base + p)[1] for p in ("api/info", "api/map", f"api/colour?obs={info['default_colour']}"))
        searches = [_get(base + "api/search", {"query": q, "top": 50})[1] for q in QUERIES]
        gene = json.loads(_get(base + "api/genes?prefix=G")[0])["genes"][0]
        _, t_gene = _get(base + f"api/colour?gene={gene}")
        rss, hwm = _rss(proc.pid)
        figures = {"n_cells": info["n_cells"], "startup_s": round(startup, 2), "first_map_s": round(first_map, 2),
                   "map_request_s": round(t_map, 3), "colour_request_s": round(t_colour, 3),
                   "reload_s": round(reload, 3), "search_median_s": round(statistics.median(searches), 3),
                   "search_s": [round(s, 3) for s in searches], "gene_colour_s": round(t_gene, 2),
                   "rss_bytes": rss, "peak_rss_bytes": hwm}
        if browser and Path("/usr/bin/chromium").exists():
            figures.update(_browser(base))
        return figures
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def _browser(base: str) -> dict:
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True,
                              args=["--enable-unsafe-swiftshader", "--use-angle=swiftshader", "--no-sandbox",
                                    "--disable-background-networking", "--disable-dev-shm-usage"])
        page = b.new_page(viewport={"width": 1400, "height": 860})
        t0 = time.perf_counter()
        page.goto(base)
        page.wait_for_selector("body[data-ready='1']", timeout=600_000)
        while not page.evaluate("Number(document.body.dataset.drawn) >= 1"):  # (the page's CSP forbids eval)
            time.sleep(0.05)
        first = time.perf_counter() - t0
        # a pan of 40 animation frames, each drawing every point: the mean time per frame (what a person sees)
        frame = page.evaluate("""() => new Promise((done) => {
            const v = window.scmmExplore.view; let k = 0, t0 = 0;
            function step(t) { if (k === 0) t0 = t; v.pan(2, 1); v.draw(); k += 1;
                if (k <= 40) requestAnimationFrame(step); else done((t - t0) / 40); }
            requestAnimationFrame(step); })""")
        b.close()
    return {"browser_first_map_s": round(first, 2), "browser_pan_frame_ms": round(frame, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cells", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--genes", type=int, default=2_000)
    ap.add_argument("--size", default="demo", help="model size of benchmarks/common.py (default demo: 128-d)")
    ap.add_argument("--corpus-cells", type=int, default=2_000)
    ap.add_argument("--browser", action="store_true", help="also time the page in /usr/bin/chromium")
    ap.add_argument("--out", default="runs/bench")
    args = ap.parse_args()
    out = Path(args.out)
    rows, results = [], []
    for n in args.cells:
        data, pkg = prepare(out, n, args.genes, args.corpus_cells, args.size, fresh=False)
        dim = json.loads((pkg / "stage1" / "config.json").read_text())["qformer"]["embed_dim"] \
            if (pkg / "stage1" / "config.json").exists() else None
        if dim is None:
            from scmm.api import load_model
            dim = int(load_model(pkg).aligner.heads.cell_proj.out_features)
        explore = with_map(data, out / f"explore_{n}x{args.genes}.h5ad", dim)
        f = measure(explore, pkg, args.browser)
        results.append(f)
        rows.append([f"{n:,}", f["startup_s"], f["first_map_s"], f["search_median_s"], f["gene_colour_s"],
                     f"{f['rss_bytes'] / 2**20:.0f}", f"{f['peak_rss_bytes'] / 2**20:.0f}",
                     f.get("browser_first_map_s", ""), f.get("browser_pan_frame_ms", "")])
        print(json.dumps(f), flush=True)
    print(table(["cells", "start s", "first map s", "search s (median)", "gene colour s", "RSS MiB",
                 "peak RSS MiB", "browser first map s", "pan frame ms"], rows))
    record("explore", {"genes": args.genes, "size": args.size, "results": results})


if __name__ == "__main__":
    main()
