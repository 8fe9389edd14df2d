#!/usr/bin/env python
"""Loader throughput and memory at 1,000,000 cells: scmm's corpus loader vs. annbatch vs. anndata backed mode.

One run, on the same synthetic data (``scmm data synth`` -> one h5ad), each loader reading its own format of it:

* **scmm**: ``CorpusLoader`` over the corpus ``scmm data build`` made (train split), ``num_workers`` 0 and 2.
* **annbatch** (scverse/lamin's minibatch loader): ``Loader(shuffle=True)`` with its default chunk size and preload
  over a ``DatasetCollection`` that annbatch's own preprocessing wrote from the h5ad (pre-shuffled, sharded zarr,
  read through zarrs as annbatch advises). annbatch needs Python >= 3.12, so it runs in its own environment
  (``make bench`` creates ``.venv-annbatch``; ``--annbatch-python``), one process per repetition, timed inside.
* **anndata backed, random batches**: ``anndata.read_h5ad(path, backed='r')``, a random permutation cut into
  batches, each read as ``adata.X[sorted(idx)]``; through a torch ``DataLoader`` with the same workers.

Every loader does the same work per batch: :func:`scmm.data_pipeline.collate.encode_rows` (log1p(count / total x
1e4), scGPT binning into 51 bins, ``<cls>``, padding, one seeded generator per batch), the cell-type labels and the
cells' id, type, type term, tissue and disease as strings (scmm adds each cell's description). Figures are medians
of ``--reps`` interleaved repetitions of ``--batches`` batches, the first batch of each (worker start, first shard
or preload) untimed; files come from a warm page cache. Memory: the whole train split of a small and the large
corpus streamed by scmm in a fresh process (peak RSS of the process and of the process tree), so a flat figure shows
memory does not grow with the corpus.

    python benchmarks/bench_loader.py [--cells 1000000] [--small-cells 100000] [--reps 3] [--out runs/bench]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from common import record, table
from scmm.data_pipeline.collate import encode_rows
from scmm.data_pipeline.encoding import CellEncoding
from scmm.data_pipeline.loader import CorpusLoader, LoaderConfig
from scmm.data_pipeline.store import Corpus
from scmm.data_pipeline.vocab import GeneVocab, map_genes

ROOT = Path(__file__).resolve().parents[1]
ENCODING = CellEncoding(n_bins=51, max_len=1200)
SIDE = Path(__file__).resolve().parent / "annbatch_side.py"
STRINGS = ("cell_type_ontology_term_id", "cell_type", "tissue", "disease")  # with cell_id, as annbatch_side.py


def _cli(*args: str) -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "scmm.cli", *args, "--quiet"], check=True)
    return time.perf_counter() - t


def ensure_data(out: Path, n_cells: int, n_genes: int, shard_size: int) -> tuple[Path, Path, dict]:
    """The synthetic h5ad and scmm's corpus of it (cached in ``out``), with the seconds each took when made."""
    h5ad, corpus, made = out / f"synth_{n_cells}x{n_genes}.h5ad", out / f"corpus_{n_cells}x{n_genes}", {}
    if not h5ad.exists():
        made["synth_seconds"] = _cli("data", "synth", "--cells", str(n_cells), "--genes", str(n_genes),
                                     "--out", str(h5ad))
    if not (corpus / "manifest.json").exists():
        made["scmm_build_seconds"] = _cli("data", "build", str(h5ad), "--out", str(corpus), "--shard-size",
                                          str(shard_size), "--overwrite")
    return h5ad, corpus, made


# --- scmm --------------------------------------------------------------------------------------------------------
def scmm_batches(corpus: Path, batch_size: int, workers: int, seed: int):
    cfg = LoaderConfig(batch_size=batch_size, num_workers=workers, seed=seed)
    for batch in CorpusLoader(str(corpus), "train", cfg, ENCODING, GeneVocab.load()):
        yield batch["gene_ids"].shape[0]


# --- anndata backed mode -----------------------------------------------------------------------------------------
class BackedBatches(Dataset):
    """Random mini-batches read from a backed h5ad, one ``adata.X[sorted(idx)]`` per batch, encoded like scmm's."""

    def __init__(self, h5ad: Path, batch_size: int, n_batches: int, seed: int):
        import anndata

        self.h5ad, self._adata = str(h5ad), None
        adata = anndata.read_h5ad(self.h5ad, backed="r")
        vocab = GeneVocab.load()
        self.cls_id, self.pad_id = vocab.cls_id, vocab.pad_id
        gene_ids = map_genes(adata.var, vocab).gene_ids
        self.keep = np.flatnonzero(gene_ids >= 0)
        self.gene_ids = gene_ids[self.keep]
        types = adata.obs["cell_type_ontology_term_id"].astype("category")
        self.labels = types.cat.codes.to_numpy().astype(np.int64)
        self.strings = {key: adata.obs[key].astype(str).to_numpy(dtype=object) for key in STRINGS}
        self.strings["cell_id"] = adata.obs_names.to_numpy(dtype=object)
        perm = np.random.default_rng(seed).permutation(adata.n_obs)
        self.batches = [np.sort(perm[b * batch_size:(b + 1) * batch_size]) for b in range(n_batches)]
        self.seed = seed
        adata.file.close()

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict:
        import anndata

        if self._adata is None:  # one HDF5 handle per worker process
            self._adata = anndata.read_h5ad(self.h5ad, backed="r")
        idx = self.batches[i]
        x = self._adata.X[idx]
        x = x if len(self.keep) == x.shape[1] else x[:, self.keep]
        batch = encode_rows(x, self.gene_ids, normalization="counts", target_sum=ENCODING.target_sum,
                            n_bins=ENCODING.n_bins, limit=ENCODING.max_len, cls_id=self.cls_id, pad_id=self.pad_id,
                            pad_value=ENCODING.pad_value, rng=np.random.default_rng([self.seed, i]))
        batch = {k: torch.from_numpy(v) for k, v in batch.items()}
        batch["labels"] = torch.from_numpy(self.labels[idx])
        batch.update({key: values[idx].tolist() for key, values in self.strings.items()})
        return batch


def backed_batches(h5ad: Path, batch_size: int, n_batches: int, workers: int, seed: int):
    ds = BackedBatches(h5ad, batch_size, n_batches, seed)
    for batch in DataLoader(ds, batch_size=None, num_workers=workers):
        yield batch["gene_ids"].shape[0]


def timed(batches, n_batches: int) -> dict:
    """Cells/s over ``n_batches`` batches after one untimed warm-up batch."""
    it = iter(batches)
    next(it)
    cells, t0 = 0, time.perf_counter()
    for k, n in enumerate(it):
        cells += n
        if k + 1 >= n_batches:
            break
    seconds = time.perf_counter() - t0
    it.close()  # stops DataLoader workers before the next measurement
    return {"cells": cells, "seconds": seconds, "cells_per_s": cells / seconds}


# --- annbatch ----------------------------------------------------------------------------------------------------
def annbatch_python(given: str | None) -> str | None:
    for candidate in (given, os.environ.get("SCMM_ANNBATCH_PYTHON"), str(ROOT / ".venv-annbatch/bin/python")):
        if candidate and Path(candidate).exists():
            return candidate
    return None


def ensure_collection(python: str, h5ad: Path, out: Path) -> tuple[Path, dict]:
    collection = out / f"annbatch_{h5ad.stem}"
    if (collection / "zarr.json").exists():
        return collection, {}
    proc = subprocess.run([python, str(SIDE), "prepare", str(h5ad), str(collection)], check=True,
                          capture_output=True, text=True)
    return collection, {"annbatch_prepare_seconds": json.loads(proc.stdout.strip().splitlines()[-1])["prepare_seconds"]}


def write_spec(h5ad: Path, corpus: Path, out: Path) -> Path:
    """What annbatch's side needs to encode cells exactly as scmm does, without scmm's torch-side code."""
    import anndata

    adata = anndata.read_h5ad(h5ad, backed="r")
    vocab = GeneVocab.load()
    path = out / "annbatch_encoding.npz"
    np.savez(path, var_names=np.asarray(adata.var_names, dtype=object),
             gene_ids=map_genes(adata.var, vocab).gene_ids, cell_types=np.asarray(Corpus(corpus).cell_types, object),
             cls_id=vocab.cls_id, pad_id=vocab.pad_id, pad_value=ENCODING.pad_value, n_bins=ENCODING.n_bins,
             max_len=ENCODING.max_len, target_sum=ENCODING.target_sum)
    adata.file.close()
    return path


def annbatch_run(python: str, collection: Path, spec: Path, batch_size: int, n_batches: int, seed: int) -> dict:
    proc = subprocess.run([python, str(SIDE), "run", str(collection), str(spec), "--batches", str(n_batches),
                           "--batch-size", str(batch_size), "--seed", str(seed)], check=True, capture_output=True,
                          text=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- memory ------------------------------------------------------------------------------------------------------
def _child(corpus: str, batch_size: int, workers: int) -> None:
    cells, t0 = 0, time.perf_counter()
    for n in scmm_batches(Path(corpus), batch_size, workers, 0):
        cells += n
    with open("/proc/self/status") as f:  # VmHWM: this process's peak RSS (ru_maxrss would include the parent's)
        hwm = int(next(line.split()[1] for line in f if line.startswith("VmHWM")))
    print(json.dumps({"cells": cells, "cells_per_s": cells / (time.perf_counter() - t0), "peak_rss_mib": hwm / 1024}))


def stream_memory(corpus: Path, batch_size: int, workers: int) -> dict:
    """Stream the whole train split in a fresh process; its peak RSS and the sampled peak RSS of the process tree."""
    import psutil

    proc = subprocess.Popen([sys.executable, __file__, "--_child", str(corpus), "--batch-size", str(batch_size),
                             "--workers", str(workers)], stdout=subprocess.PIPE, text=True)
    ps, tree = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            tree = max(tree, sum(p.memory_info().rss for p in [ps] + ps.children(recursive=True)))
        except psutil.Error:
            pass
        time.sleep(0.05)
    out, _ = proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"memory subprocess failed ({proc.returncode})")
    return {**json.loads(out.strip().splitlines()[-1]), "peak_tree_rss_mib": tree / 2**20}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cells", type=int, default=1_000_000)
    p.add_argument("--small-cells", type=int, default=100_000, help="the small corpus of the memory comparison")
    p.add_argument("--genes", type=int, default=2000)
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--batches", type=int, default=300, help="timed batches per repetition")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--workers", default="0,2", help="DataLoader workers of scmm and the backed baseline")
    p.add_argument("--shard-size", type=int, default=10_000)
    p.add_argument("--annbatch-python", help="python of an environment with annbatch (default .venv-annbatch)")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--_child", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    workers = [int(w) for w in a.workers.split(",")]
    if a._child:
        _child(a._child, a.batch_size, workers[0])
        return 0
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    h5ad, corpus, made = ensure_data(out, a.cells, a.genes, a.shard_size)
    variants = {}
    for w in workers:
        variants[f"scmm CorpusLoader, workers={w}"] = lambda rep, w=w: timed(
            scmm_batches(corpus, a.batch_size, w, rep), a.batches)
        variants[f"anndata backed, random batches, workers={w}"] = lambda rep, w=w: timed(
            backed_batches(h5ad, a.batch_size, a.batches + 1, w, rep), a.batches)
    python = annbatch_python(a.annbatch_python)
    if python is None:
        print("annbatch: no environment found (make bench creates .venv-annbatch; or --annbatch-python): skipped")
    else:
        collection, prepared = ensure_collection(python, h5ad, out)
        made.update(prepared)
        spec = write_spec(h5ad, corpus, out)
        variants["annbatch Loader (in-process, zarrs threads)"] = lambda rep: annbatch_run(
            python, collection, spec, a.batch_size, a.batches, rep)

    runs: dict[str, list[float]] = {name: [] for name in variants}
    load = os.getloadavg()[0]
    for rep in range(a.reps):  # interleaved, so that load from elsewhere hits every variant alike
        for name, run in variants.items():
            runs[name].append(run(rep)["cells_per_s"])
            print(f"  rep {rep}  {name:<48} {runs[name][-1]:9.0f} cells/s", flush=True)
    median = {name: statistics.median(v) for name, v in runs.items()}
    best_scmm = max(v for k, v in median.items() if k.startswith("scmm"))
    rows = [[name, f"{v:,.0f}", f"{best_scmm / v:.2f}x"] for name, v in median.items()]
    print(f"\n{a.cells:,} cells, batch {a.batch_size}, median of {a.reps} interleaved repetitions of {a.batches} "
          f"batches (load {load:.1f} at the start)")
    print(table(["loader", "cells/s", "best scmm / this"], rows))

    memory = {}
    if not a.skip_memory:
        small_h5ad, small_corpus, _ = ensure_data(out, a.small_cells, a.genes, a.shard_size)
        for w in workers:
            for n, c in ((a.small_cells, small_corpus), (a.cells, corpus)):
                memory[f"{n} cells, workers={w}"] = r = stream_memory(c, a.batch_size, w)
                print(f"  memory {n:>9,} cells, workers={w}: {r['cells']:,} train cells at {r['cells_per_s']:,.0f} "
                      f"cells/s, peak RSS {r['peak_rss_mib']:.0f} MiB, process tree {r['peak_tree_rss_mib']:.0f} MiB",
                      flush=True)
        print(table(["corpus", "cells/s", "peak RSS main (MiB)", "peak RSS tree (MiB)"],
                    [[k, f"{v['cells_per_s']:,.0f}", f"{v['peak_rss_mib']:.0f}", f"{v['peak_tree_rss_mib']:.0f}"]
                     for k, v in memory.items()]))
    record("loader", {"cells": a.cells, "batch_size": a.batch_size, "reps": a.reps, "timed_batches": a.batches,
                      "cells_per_s": median, "runs": runs, "one_off_seconds": made, "memory": memory})
    return 0


if __name__ == "__main__":
    sys.exit(main())
