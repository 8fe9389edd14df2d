#!/usr/bin/env python
"""Loader throughput and memory: scmm's streaming corpus loader vs. a hand-written anndata loader.

One run, on the same synthetic data (``scmm data synth`` -> ``scmm data build``), measures cells/s
from storage to padded ``[B, L]`` torch batches:

* **scmm**: ``CorpusLoader`` over the built corpus (train split), ``num_workers`` 0 and 2.
* **baseline, random batches** (the headline comparison): what a competent user writes without
  scmm -- ``anndata.read_h5ad(path, backed='r')``, shuffled mini-batches read as
  ``adata.X[sorted(idx)]``, per cell log1p(count / total * 1e4), scGPT binning with 51 bins (the
  *same* ``binning`` function scmm uses), ``<cls>`` + expressed genes sampled to ``max_len``,
  numpy padding, torch tensors plus the cell-type labels; in-process or through a torch
  ``DataLoader`` with the same number of workers.
* **baseline, block-shuffled chunks**: the same, but reading contiguous chunks of
  ``shuffle_buffer`` cells in random chunk order and shuffling inside each chunk -- the same
  shuffle quality as scmm's window shuffle (labelled; not the headline).
* **baseline, sequential chunks**: contiguous rows, no shuffling at all (labelled; not usable for
  training as is, shown as the upper bound of backed reads).

Every figure is the median of ``--reps`` interleaved repetitions of ``--batches`` batches; the first batch of
each repetition (worker start-up, first shard/chunk) is a warm-up and is not timed. Files are read
from a warm page cache in all cases.

Memory: the whole train split of a small and a large corpus (same genes) is streamed in a fresh
subprocess, with cells/s. Reported: the peak RSS of that process (``VmHWM``; ``ru_maxrss`` would
not do, Linux carries it over from the parent across fork + exec), the sampled peak RSS of its
DataLoader workers, and the sampled peak of the summed RSS and PSS of the process tree (psutil).

    python benchmarks/bench_loader.py [--cells 200000] [--small-cells 20000] [--genes 2000] [--out runs/bench]

Prints a table and writes ``<out>/bench_loader.json``. Built data are cached in ``<out>``
(``--fresh`` rebuilds them).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402


# --------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------
def _scmm_cli() -> list[str]:
    exe = Path(sys.executable).parent / "scmm"
    return [str(exe)] if exe.exists() else [sys.executable, "-c", "from scmm.cli import main; main()"]


def ensure_data(out: Path, n_cells: int, n_genes: int, fresh: bool, shard_size: int) -> tuple[Path, Path]:
    """The synthetic h5ad and its built corpus, created with the CLI unless cached."""
    h5ad = out / f"synth_{n_cells}x{n_genes}.h5ad"
    corpus = out / f"corpus_{n_cells}x{n_genes}"
    if fresh:
        h5ad.unlink(missing_ok=True)
        shutil.rmtree(corpus, ignore_errors=True)
    if not h5ad.exists():
        t = time.perf_counter()
        subprocess.run(_scmm_cli() + ["data", "synth", "--cells", str(n_cells), "--genes", str(n_genes),
                                      "--out", str(h5ad), "--quiet"], check=True)
        print(f"  synthesised {h5ad} in {time.perf_counter() - t:.1f} s", flush=True)
    if not (corpus / "manifest.json").exists():
        t = time.perf_counter()
        subprocess.run(_scmm_cli() + ["data", "build", str(h5ad), "--out", str(corpus), "--quiet",
                                      "--shard-size", str(shard_size), "--overwrite"], check=True)
        print(f"  built {corpus} in {time.perf_counter() - t:.1f} s", flush=True)
    return h5ad, corpus


# --------------------------------------------------------------------------------------------------
# scmm
# --------------------------------------------------------------------------------------------------
def scmm_batches(corpus: Path, batch_size: int, max_len: int, num_workers: int, seed: int, shuffle_buffer: int):
    from scmm.data_pipeline.encoding import CellEncoding
    from scmm.data_pipeline.loader import CorpusLoader, LoaderConfig
    from scmm.data_pipeline.vocab import GeneVocab

    cfg = LoaderConfig(batch_size=batch_size, num_workers=num_workers, seed=seed, shuffle_buffer=shuffle_buffer)
    loader = CorpusLoader(str(corpus), "train", cfg, CellEncoding(max_len=max_len, n_bins=51), GeneVocab.load())
    for batch in loader:
        yield batch["gene_ids"].shape[0], batch


# --------------------------------------------------------------------------------------------------
# baseline: what a user writes with anndata backed mode
# --------------------------------------------------------------------------------------------------
class BackedBaseline:
    """Backed h5ad -> scGPT-style padded batches, written the straightforward way.

    Reads rows with ``adata.X[idx]`` (sorted indices), normalises each cell to log1p(count / total
    * 1e4), bins it with scmm's own ``binning`` (so the numeric work is identical), keeps ``<cls>`` +
    the expressed, vocabulary-mapped genes (sampled down to ``max_len - 1``), pads with numpy and
    returns torch tensors and the cell-type labels.
    """

    def __init__(self, h5ad: Path, batch_size: int, max_len: int, n_bins: int = 51, pad_value: float = -2.0,
                 target_sum: float = 1e4, block_chunk: int = 4096):
        import anndata

        from scmm.data_pipeline.vocab import GeneVocab, map_genes

        self.h5ad, self.batch_size, self.max_len, self.n_bins = str(h5ad), batch_size, max_len, n_bins
        self.pad_value, self.target_sum, self.block_chunk = pad_value, target_sum, block_chunk
        vocab = GeneVocab.load()
        self.cls_id, self.pad_id = vocab.cls_id, vocab.pad_id
        adata = anndata.read_h5ad(self.h5ad, backed="r")
        self.n_obs = adata.n_obs
        self.gene_ids = map_genes(adata.var, vocab).gene_ids  # vocab id per column, -1 = unmapped
        self.mapped = self.gene_ids >= 0
        ct = adata.obs["cell_type_ontology_term_id"].astype("category")
        self.label_codes = ct.cat.codes.to_numpy().astype(np.int64)
        self.label_names = np.asarray(ct.to_numpy(), dtype=object)
        adata.file.close()
        self._adata = None

    @property
    def adata(self):
        if self._adata is None:  # opened lazily so that every DataLoader worker has its own HDF5 handle
            import anndata
            self._adata = anndata.read_h5ad(self.h5ad, backed="r")
        return self._adata

    def close(self) -> None:
        """Close this process's HDF5 handle (before forking DataLoader workers: HDF5 is not fork-safe)."""
        if self._adata is not None:
            self._adata.file.close()
            self._adata = None

    def make_batch(self, idx: np.ndarray, rng: np.random.Generator) -> dict:
        """Read the cells `idx` (sorted) from the backed file and collate them."""
        contiguous = len(idx) > 0 and idx[-1] - idx[0] + 1 == len(idx)
        rows = slice(int(idx[0]), int(idx[-1]) + 1) if contiguous else idx  # a slice reads one range
        return self.collate(self.adata.X[rows], idx, rng)  # backed read -> scipy CSR

    def collate(self, X, idx: np.ndarray, rng: np.random.Generator) -> dict:
        """CSR rows of the cells `idx` -> padded scGPT-style batch."""
        from scmm.data_pipeline.encoding import binning

        keep = self.max_len - 1
        genes_list, values_list = [], []
        for r in range(X.shape[0]):
            lo, hi = X.indptr[r], X.indptr[r + 1]
            cols, data = X.indices[lo:hi], X.data[lo:hi].astype(np.float64)
            m = self.mapped[cols]
            cols, data = cols[m], data[m]
            values = np.log1p(data / max(data.sum(), 1e-12) * self.target_sum)
            values = binning(values, self.n_bins, rng)
            if len(cols) > keep:
                pick = np.sort(rng.choice(len(cols), keep, replace=False))
                cols, values = cols[pick], values[pick]
            genes_list.append(np.concatenate([[self.cls_id], self.gene_ids[cols]]))
            values_list.append(np.concatenate([[0.0], values]).astype(np.float32))
        length = max(len(g) for g in genes_list)
        gene_ids = np.full((len(genes_list), length), self.pad_id, dtype=np.int64)
        vals = np.full((len(genes_list), length), self.pad_value, dtype=np.float32)
        for i, (g, v) in enumerate(zip(genes_list, values_list)):
            gene_ids[i, :len(g)], vals[i, :len(v)] = g, v
        gene_ids_t = torch.from_numpy(gene_ids)
        return {"gene_ids": gene_ids_t, "values": torch.from_numpy(vals), "padding_mask": gene_ids_t == self.pad_id,
                "labels": torch.from_numpy(self.label_codes[idx]),
                "cell_type_ontology_term_id": self.label_names[idx].tolist()}

    # --- orders of cells ------------------------------------------------------------------------
    def random_batches(self, n_batches: int, seed: int) -> list[np.ndarray]:
        """Fully shuffled mini-batches (a random permutation of all cells), indices sorted per batch."""
        perm = np.random.default_rng(seed).permutation(self.n_obs)
        return [np.sort(perm[b * self.batch_size:(b + 1) * self.batch_size]) for b in range(n_batches)]

    def sequential_batches(self, n_batches: int, seed: int) -> list[np.ndarray]:
        """Contiguous rows from a random starting chunk, no shuffling."""
        start = int(np.random.default_rng(seed).integers(0, max(self.n_obs - n_batches * self.batch_size, 1)))
        return [np.arange(start + b * self.batch_size, start + (b + 1) * self.batch_size) for b in range(n_batches)]


class _BatchDataset(Dataset):
    """Map-style dataset whose items are whole batches (used with batch_size=None)."""

    def __init__(self, baseline: BackedBaseline, batches: list[np.ndarray], seed: int):
        self.baseline, self.batches, self.seed = baseline, batches, seed

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict:
        return self.baseline.make_batch(self.batches[i], np.random.default_rng([self.seed, i]))


def baseline_batches(baseline: BackedBaseline, order: str, n_batches: int, num_workers: int, seed: int):
    """Batches of one baseline variant; 'random' and 'sequential' read one batch per adata.X call,
    'block' reads chunks of `chunk` contiguous cells and shuffles within the chunk."""
    if order == "block":
        yield from _block_batches(baseline, n_batches, num_workers, seed)
        return
    batches = (baseline.random_batches if order == "random" else baseline.sequential_batches)(n_batches, seed)
    ds = _BatchDataset(baseline, batches, seed)
    if num_workers == 0:
        for i in range(len(ds)):
            yield len(batches[i]), ds[i]
    else:
        baseline.close()
        for i, batch in enumerate(DataLoader(ds, batch_size=None, shuffle=False, num_workers=num_workers)):
            yield len(batches[i]), batch


class _BlockStream(torch.utils.data.IterableDataset):
    """Contiguous chunks in random order, shuffled inside the chunk; chunks dealt to workers round-robin."""

    def __init__(self, baseline: BackedBaseline, chunk: int, n_batches: int, seed: int):
        self.baseline, self.chunk, self.n_batches, self.seed = baseline, chunk, n_batches, seed

    def __iter__(self):
        from torch.utils.data import get_worker_info

        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        rng = np.random.default_rng([self.seed, wid])
        n_chunks = -(-self.baseline.n_obs // self.chunk)
        chunks = np.random.default_rng(self.seed).permutation(n_chunks)[wid::nw]
        bs, produced, limit = self.baseline.batch_size, 0, -(-self.n_batches // nw)
        for c in chunks:
            lo, hi = int(c) * self.chunk, min((int(c) + 1) * self.chunk, self.baseline.n_obs)
            X = self.baseline.adata.X[lo:hi]  # one contiguous read of the whole chunk
            order = rng.permutation(hi - lo)
            for b in range(0, len(order) - bs + 1, bs):
                rows = np.sort(order[b:b + bs])
                yield self.baseline.collate(X[rows], lo + rows, rng)
                produced += 1
                if produced >= limit:
                    return


def _block_batches(baseline: BackedBaseline, n_batches: int, num_workers: int, seed: int):
    ds = _BlockStream(baseline, baseline.block_chunk, n_batches, seed)
    if num_workers:
        baseline.close()
    it = iter(ds) if num_workers == 0 else iter(DataLoader(ds, batch_size=None, num_workers=num_workers))
    for batch in it:
        yield batch["gene_ids"].shape[0], batch


# --------------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------------
def time_stream(batches, n_batches: int) -> dict:
    """Cells/s over `n_batches` batches after one untimed warm-up batch."""
    it = iter(batches)
    next(it)  # warm-up: worker start-up, first shard or chunk, imports
    cells, t0 = 0, time.perf_counter()
    for k, (n, batch) in enumerate(it):
        assert batch["gene_ids"].shape == batch["values"].shape
        cells += n
        if k + 1 >= n_batches:
            break
    dt = time.perf_counter() - t0
    close = getattr(batches, "close", None)
    if close is not None:
        close()  # shuts DataLoader workers down before the next measurement
    return {"cells": cells, "seconds": dt, "cells_per_s": cells / dt}


def measure_all(variants: dict, n_batches: int, reps: int) -> dict:
    """Median cells/s of each variant; repetitions are interleaved (A B C, A B C, ...) so that load
    from other processes on a shared machine affects every variant alike."""
    runs: dict[str, list] = {name: [] for name in variants}
    for rep in range(reps):
        for name, factory in variants.items():
            r = time_stream(factory(rep), n_batches)
            runs[name].append(r)
            print(f"    rep {rep}  {name:<58} {r['cells_per_s']:8.0f} cells/s "
                  f"({r['cells']} cells, {r['seconds']:.2f} s)", flush=True)
    return {name: {"cells_per_s": statistics.median(r["cells_per_s"] for r in rs),
                   "min": min(r["cells_per_s"] for r in rs), "max": max(r["cells_per_s"] for r in rs), "runs": rs}
            for name, rs in runs.items()}


# --------------------------------------------------------------------------------------------------
# memory: stream a whole split in a fresh process
# --------------------------------------------------------------------------------------------------
def _vm_hwm_kib() -> int:
    """Peak RSS of this process since its exec (VmHWM). Unlike ru_maxrss it is not inherited from
    the parent across fork + exec."""
    with open("/proc/self/status") as f:
        return int(next(line.split()[1] for line in f if line.startswith("VmHWM")))


def _child_stream(corpus: str, batch_size: int, max_len: int, num_workers: int, shuffle_buffer: int) -> None:
    """Entry point of the memory subprocess: stream the whole train split, print one JSON line."""
    hwm_start = _vm_hwm_kib()
    cells, batches, t0 = 0, 0, time.perf_counter()
    for n, _ in scmm_batches(Path(corpus), batch_size, max_len, num_workers, 0, shuffle_buffer):
        cells += n
        batches += 1
    dt = time.perf_counter() - t0
    print(json.dumps({"cells": cells, "batches": batches, "seconds": dt, "cells_per_s": cells / dt,
                      "main_hwm_after_imports_kib": hwm_start, "main_hwm_kib": _vm_hwm_kib()}))


def stream_memory(corpus: Path, batch_size: int, max_len: int, num_workers: int, shuffle_buffer: int) -> dict:
    """Stream a whole split in a fresh process; peak RSS of the process (VmHWM), and of its workers and
    of the whole tree sampled with psutil (RSS every 20 ms; PSS, which counts pages shared between the
    forked workers and their parent once, every ~200 ms)."""
    import psutil

    cmd = [sys.executable, str(Path(__file__).resolve()), "--_child", str(corpus), "--batch-size", str(batch_size),
           "--max-len", str(max_len), "--_workers", str(num_workers), "--shuffle-buffer", str(shuffle_buffer)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    ps = psutil.Process(proc.pid)
    peak_tree_rss = peak_tree_pss = peak_worker_rss = 0
    tick = 0
    while proc.poll() is None:
        try:
            kids = ps.children(recursive=True)
            rss = [k.memory_info().rss for k in kids]
            peak_worker_rss = max([peak_worker_rss] + rss)
            peak_tree_rss = max(peak_tree_rss, ps.memory_info().rss + sum(rss))
            if tick % 10 == 0:
                peak_tree_pss = max(peak_tree_pss, sum(p.memory_full_info().pss for p in [ps] + kids))
        except psutil.Error:
            pass
        tick += 1
        time.sleep(0.02)
    out, _ = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"memory subprocess failed ({proc.returncode})")
    res = json.loads(out.strip().splitlines()[-1])
    res["peak_rss_main_mib"] = res["main_hwm_kib"] / 1024
    res["rss_main_after_imports_mib"] = res["main_hwm_after_imports_kib"] / 1024
    res["peak_rss_worker_mib"] = peak_worker_rss / 2**20
    res["peak_tree_rss_mib"] = peak_tree_rss / 2**20
    res["peak_tree_pss_mib"] = peak_tree_pss / 2**20
    return res


# --------------------------------------------------------------------------------------------------
def machine() -> dict:
    try:
        cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                    if line.startswith("model name")), "")
    except OSError:
        cpu = platform.processor()
    try:
        mem = int(next(line.split()[1] for line in open("/proc/meminfo") if line.startswith("MemTotal"))) / 2**20
    except OSError:
        mem = float("nan")
    from importlib.metadata import version

    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem, 1), "gpu": torch.cuda.is_available(),
            "python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "anndata": version("anndata"), "zarr": version("zarr"), "h5py": version("h5py")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cells", type=int, default=200_000, help="cells of the large corpus (throughput and memory)")
    p.add_argument("--small-cells", type=int, default=20_000, help="cells of the small corpus (memory)")
    p.add_argument("--genes", type=int, default=2000)
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-len", type=int, default=1200)
    p.add_argument("--batches", type=int, default=300, help="timed batches per repetition")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--workers", default="0,2", help="comma-separated num_workers to measure")
    p.add_argument("--shuffle-buffer", type=int, default=4096, help="scmm window = baseline block chunk")
    p.add_argument("--shard-size", type=int, default=10_000)
    p.add_argument("--fresh", action="store_true", help="rebuild the synthetic data")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--_child", help=argparse.SUPPRESS)
    p.add_argument("--_workers", type=int, default=0, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a._child:
        _child_stream(a._child, a.batch_size, a.max_len, a._workers, a.shuffle_buffer)
        return 0

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    workers = [int(w) for w in a.workers.split(",") if w.strip()]
    print(f"data ({a.cells} and {a.small_cells} cells x {a.genes} genes) in {out}", flush=True)
    h5ad, corpus = ensure_data(out, a.cells, a.genes, a.fresh, a.shard_size)
    small_h5ad, small_corpus = ensure_data(out, a.small_cells, a.genes, a.fresh, a.shard_size)
    from scmm.data_pipeline.store import Corpus
    same_genes = bool(np.array_equal(Corpus(corpus).gene_vocab_ids, Corpus(small_corpus).gene_vocab_ids))

    baseline = BackedBaseline(h5ad, a.batch_size, a.max_len, block_chunk=a.shuffle_buffer)
    load_before = os.getloadavg()
    print(f"throughput: batch {a.batch_size}, max_len {a.max_len}, {a.batches} timed batches "
          f"({a.batches * a.batch_size} cells) x {a.reps} interleaved reps, median", flush=True)
    variants = {}
    for nw in workers:
        variants[f"scmm CorpusLoader, workers={nw}"] = (
            lambda rep, nw=nw: scmm_batches(corpus, a.batch_size, a.max_len, nw, rep, a.shuffle_buffer))
        for order, label in (("random", "random batches"), ("block", "block-shuffled chunks"),
                             ("sequential", "sequential (unshuffled)")):
            variants[f"baseline backed, {label}, workers={nw}"] = (
                lambda rep, nw=nw, order=order: baseline_batches(baseline, order, a.batches + 1, nw, rep))
    throughput = measure_all(variants, a.batches, a.reps)

    ratios = {}
    for nw in workers:
        s = throughput[f"scmm CorpusLoader, workers={nw}"]["cells_per_s"]
        for variant in ("random batches", "block-shuffled chunks", "sequential (unshuffled)"):
            ratios[f"scmm / baseline {variant}, workers={nw}"] = s / throughput[
                f"baseline backed, {variant}, workers={nw}"]["cells_per_s"]

    memory = {}
    if not a.skip_memory:
        print("memory: whole train split streamed in a fresh process", flush=True)
        for nw in workers:
            for n, c in ((a.small_cells, small_corpus), (a.cells, corpus)):
                r = stream_memory(c, a.batch_size, a.max_len, nw, a.shuffle_buffer)
                memory[f"{n} cells, workers={nw}"] = {"corpus_cells": n, "num_workers": nw, **r}
                print(f"    {n:>7} cells workers={nw}: {r['cells']} train cells, {r['cells_per_s']:.0f} cells/s, "
                      f"peak RSS main {r['peak_rss_main_mib']:.0f} MiB, worker {r['peak_rss_worker_mib']:.0f} MiB, "
                      f"tree RSS {r['peak_tree_rss_mib']:.0f} MiB, tree PSS {r['peak_tree_pss_mib']:.0f} MiB",
                      flush=True)

    result = {"date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
              "command": " ".join([Path(sys.executable).name, "benchmarks/bench_loader.py"] + sys.argv[1:]),
              "machine": machine(),
              "load_average_1_5_15min": {"start": load_before, "end": os.getloadavg()},
              "config": {"cells": a.cells, "small_cells": a.small_cells, "genes": a.genes, "batch_size": a.batch_size,
                         "max_len": a.max_len, "n_bins": 51, "timed_batches": a.batches, "reps": a.reps,
                         "shuffle_buffer": a.shuffle_buffer, "shard_size": a.shard_size, "workers": workers,
                         "same_genes_small_and_large": same_genes,
                         "h5ad": str(h5ad), "corpus": str(corpus), "small_corpus": str(small_corpus)},
              "throughput": throughput, "ratios": ratios, "memory": memory}
    (out / "bench_loader.json").write_text(json.dumps(result, indent=2))

    print()
    print(f"{f'loader (same data, batch {a.batch_size}, max_len {a.max_len})':<58} {'cells/s':>9}")
    for k, v in throughput.items():
        print(f"{k:<58} {v['cells_per_s']:9.0f}")
    print()
    for k, v in ratios.items():
        print(f"{k:<58} {v:8.2f}x")
    if memory:
        print()
        print(f"{'memory (whole train split)':<28} {'cells':>8} {'cells/s':>8} {'main MiB':>9} {'worker MiB':>11} "
              f"{'tree RSS':>9} {'tree PSS':>9}   (peaks; main after imports)")
        for k, v in memory.items():
            print(f"{k:<28} {v['cells']:8d} {v['cells_per_s']:8.0f} {v['peak_rss_main_mib']:9.0f} "
                  f"{v['peak_rss_worker_mib']:11.0f} {v['peak_tree_rss_mib']:9.0f} {v['peak_tree_pss_mib']:9.0f}"
                  f"   ({v['rss_main_after_imports_mib']:.0f})")
    print(f"\nwrote {out / 'bench_loader.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
