"""The annbatch side of ``bench_loader.py``, run in its own Python >= 3.12 environment (annbatch needs it).

    annbatch_side.py prepare H5AD COLLECTION          # annbatch's preprocessing: a pre-shuffled, sharded zarr store
    annbatch_side.py run COLLECTION ENCODING.npz ...  # time batches; prints one JSON line

Each batch gets exactly the work scmm's loader does: :func:`scmm.data_pipeline.collate.encode_rows` (normalise, bin,
``<cls>``, pad; one seeded generator per batch), the cells' type labels and five of the six string columns scmm's
batches carry (the h5ad has no ``text``; scmm's corpus stores each cell's description). That environment has no CPU
build of torch offline, so the last step stops at numpy arrays; ``torch.from_numpy``, which scmm's loader adds, does
not copy.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import anndata as ad
import numpy as np
import zarr

from scmm.data_pipeline.collate import encode_rows

OBS = ["cell_type_ontology_term_id", "cell_type", "tissue", "disease"]  # strings a batch carries, as scmm's


def _with_obs(load):
    """annbatch's loading of each input, keeping only the obs columns the batches carry."""
    def loader(path):
        adata = load(path)
        return ad.AnnData(X=adata.X, obs=adata.obs[OBS], var=adata.var[[]])
    return loader


def prepare(h5ad: str, collection: str) -> None:
    from annbatch import DatasetCollection
    from annbatch.io import _default_load_adata

    t = time.perf_counter()
    DatasetCollection(collection).add_adatas([h5ad], load_adata=_with_obs(_default_load_adata), shuffle=True,
                                             rng=np.random.default_rng(0))
    print(json.dumps({"prepare_seconds": time.perf_counter() - t}))


def run(collection: str, encoding: str, batches: int, batch_size: int, seed: int) -> None:
    from annbatch import DatasetCollection, Loader

    spec = np.load(encoding, allow_pickle=True)
    loader = Loader(batch_size=batch_size, shuffle=True, preload_to_gpu=False, rng=np.random.default_rng(seed))
    loader.use_collection(DatasetCollection(collection))
    column_ids = dict(zip(spec["var_names"].tolist(), spec["gene_ids"].tolist()))
    gene_ids = np.array([column_ids.get(g, -1) for g in loader.var.index], dtype=np.int64)
    keep = np.flatnonzero(gene_ids >= 0)
    every_column = len(keep) == len(gene_ids)
    label_of = {t: i for i, t in enumerate(spec["cell_types"].tolist())}
    limit, n_bins = int(spec["max_len"]), int(spec["n_bins"])
    cells, t0 = 0, None
    for k, out in enumerate(loader):
        x = out["X"] if every_column else out["X"][:, keep]
        batch = encode_rows(x, gene_ids[keep], normalization="counts", target_sum=float(spec["target_sum"]),
                            n_bins=n_bins, limit=limit, cls_id=int(spec["cls_id"]), pad_id=int(spec["pad_id"]),
                            pad_value=float(spec["pad_value"]), rng=np.random.default_rng([seed, k]))
        obs = out["obs"]
        batch["labels"] = np.array([label_of.get(t, -1) for t in obs[OBS[0]]], dtype=np.int64)
        batch.update({key: obs[key].tolist() for key in OBS}, cell_id=obs.index.tolist())
        if k == 0:  # warm-up, as for every variant: first fetch of preload_nchunks chunks
            t0 = time.perf_counter()
            continue
        cells += batch["gene_ids"].shape[0]
        if k >= batches:
            break
    seconds = time.perf_counter() - t0
    print(json.dumps({"cells": cells, "seconds": seconds, "cells_per_s": cells / seconds}))


def main(argv: list[str] | None = None) -> int:
    zarr.config.set({"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"})  # annbatch's advice for local disks
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("prepare")
    pp.add_argument("h5ad")
    pp.add_argument("collection")
    pr = sub.add_parser("run")
    pr.add_argument("collection")
    pr.add_argument("encoding")
    pr.add_argument("--batches", type=int, default=300)
    pr.add_argument("--batch-size", type=int, default=64)
    pr.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.cmd == "prepare":
        prepare(a.h5ad, a.collection)
    else:
        run(a.collection, a.encoding, a.batches, a.batch_size, a.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
