#!/usr/bin/env python
"""FAISS index kinds for reference mapping at scale: exact (flat) against IVF and HNSW, side by side.

Data: ``--n`` (default 1,000,000) synthetic L2-normalised ``--dim``-d embeddings (default 512) drawn around 2,000
cluster centres (cell types and states look like that in an embedding space), and ``--queries`` (default 10,000)
new points of the same distribution. For each index: build time, query time for all queries at k = 10, and
recall@10 against the exact (flat, inner-product) neighbours. IVF is ``IndexIVFFlat`` with ``nlist = 4 sqrt(N)``,
trained on ``64 nlist`` points, at several ``nprobe``; HNSW is ``IndexHNSWFlat`` (M = 32) at several ``efSearch``.

    python benchmarks/bench_retrieval.py [--n 1000000] [--dim 512] [--queries 10000] [--threads 2]

Prints one table and appends a JSON line to ``benchmarks/results.jsonl``.
"""
from __future__ import annotations

import argparse
import math
import time

import faiss
import numpy as np

from common import record, table

K = 10


def data(n: int, dim: int, queries: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((2000, dim)).astype(np.float32)
    def draw(m: int) -> np.ndarray:
        x = centres[rng.integers(0, len(centres), m)] + 0.6 * rng.standard_normal((m, dim)).astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)
    return draw(n), draw(queries)


def recall(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(e)) / K for f, e in zip(found, exact)]))


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--queries", type=int, default=10_000)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    faiss.omp_set_num_threads(args.threads)
    x, q = data(args.n, args.dim, args.queries)
    rows, results = [], {}

    flat = faiss.IndexFlatIP(args.dim)
    _, t_build = timed(lambda: flat.add(x))
    (_, exact), t_query = timed(lambda: flat.search(q, K))
    results["flat"] = {"build_s": t_build, "query_s": t_query, "recall@10": 1.0}
    rows.append(["flat (exact)", "-", f"{t_build:.1f}", f"{t_query:.1f}", f"{args.queries / t_query:.0f}", "1.000"])
    flat.reset()  # frees its vectors

    nlist = int(min(65_536, round(4 * math.sqrt(args.n))))
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(args.dim), args.dim, nlist, faiss.METRIC_INNER_PRODUCT)
    sample = x[np.random.default_rng(1).choice(args.n, min(args.n, 64 * nlist), replace=False)]
    _, t_train = timed(lambda: ivf.train(sample))
    _, t_add = timed(lambda: ivf.add(x))
    for nprobe in (8, 32, 128):
        ivf.nprobe = nprobe
        (_, found), t_query = timed(lambda: ivf.search(q, K))
        r = recall(found, exact)
        results[f"ivf_nprobe{nprobe}"] = {"build_s": t_train + t_add, "query_s": t_query, "recall@10": r,
                                          "nlist": nlist}
        rows.append([f"IVF-Flat nlist {nlist}", f"nprobe {nprobe}", f"{t_train + t_add:.1f}", f"{t_query:.1f}",
                     f"{args.queries / t_query:.0f}", f"{r:.3f}"])
    ivf.reset()

    hnsw = faiss.IndexHNSWFlat(args.dim, 32, faiss.METRIC_INNER_PRODUCT)
    _, t_build = timed(lambda: hnsw.add(x))
    for ef in (32, 64, 128):
        hnsw.hnsw.efSearch = ef
        (_, found), t_query = timed(lambda: hnsw.search(q, K))
        r = recall(found, exact)
        results[f"hnsw_ef{ef}"] = {"build_s": t_build, "query_s": t_query, "recall@10": r}
        rows.append(["HNSW-Flat M 32", f"efSearch {ef}", f"{t_build:.1f}", f"{t_query:.1f}",
                     f"{args.queries / t_query:.0f}", f"{r:.3f}"])
    print(f"\n{args.n} x {args.dim}-d reference embeddings, {args.queries} queries, k = {K}, {args.threads} threads:")
    print(table(["index", "search", "build s", "query s", "queries/s", "recall@10 vs flat"], rows))
    record("retrieval", {"n": args.n, "dim": args.dim, "queries": args.queries, "threads": args.threads,
                         "results": results})


if __name__ == "__main__":
    main()
