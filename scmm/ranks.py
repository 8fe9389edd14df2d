"""Several processes under torchrun (``WORLD_SIZE`` > 1): the cells split into one contiguous block per rank, each
rank's embeddings (and labels) written to a part file beside the output, and rank 0 merging the parts, in row
order and chunk by chunk, into the one output, equal to a single process's (:func:`cells_on_ranks`)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import torch.distributed as tdist

from scmm.annotation import Labeller
from scmm.errors import ScmmError
from scmm.h5ad_writer import ObsColumns, Sink
from scmm.inference import PreparedInput, fill_rows, labels_at_end
from scmm.output_names import EMBEDDING_KEY

__all__ = ["world_size", "cells_on_ranks"]


def world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def _part_path(out: Path, rank: int) -> Path:
    run = os.environ.get("TORCHELASTIC_RUN_ID", os.environ.get("MASTER_PORT", "0"))
    return out.parent / f".{out.name}.{run}.rank{rank}.part"


def _rank_rows(n: int, world: int, rank: int) -> tuple[int, int]:
    """The contiguous block of rows rank ``rank`` of ``world`` embeds (sizes differ by at most one)."""
    return n * rank // world, n * (rank + 1) // world


class _PartSink:
    """One rank's share of the embeddings, written chunk by chunk to an HDF5 part file beside the output."""

    def __init__(self, path: Path, n: int, dim: int):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.file = h5py.File(path, "w")
        self.emb = self.file.create_dataset(EMBEDDING_KEY, shape=(n, dim), dtype=np.float32)

    def put(self, start: int, emb: np.ndarray) -> None:
        self.emb[start:start + len(emb)] = emb

    def finish(self, obs: pd.DataFrame | None, empty: np.ndarray) -> None:
        self.file.create_dataset("empty", data=empty)
        if obs is not None:
            ad.io.write_elem(self.file, "obs", obs)
        self.file.close()


def cells_on_ranks(data: Any, inp: PreparedInput, out: Path, dim: int,
                    labeller: Labeller | None, whole: bool) -> Path:
    """torchrun: each rank embeds (and, unless ``whole``, labels) a contiguous block of rows into its part file;
    after a barrier rank 0 merges the parts, in row order and chunk by chunk, into the one output (atomic, as
    with one process: the same values, labels and categories), removes the parts; a last barrier, then every
    rank leaves the process group. The ranks only synchronise and share their errors (gloo; no tensor is
    exchanged), so the GPU or CPU that computes does not matter; when a rank fails, rank 0's error names it and
    its message (the command prints rank 0's error only). Every rank prepared the same inputs, calibration and
    candidates, and the cells' draws are seeded by their rows, so the result equals a one-process run's."""
    own = not tdist.is_initialized()
    if own:
        tdist.init_process_group("gloo")
    rank, world = tdist.get_rank(), tdist.get_world_size()
    if inp.opts.device == "cuda":  # one GPU per process on a node
        inp.opts.device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    begin, end = _rank_rows(inp.n_obs, world, rank)
    part = _part_path(out, rank)
    error: BaseException | None = None
    result: Path = out
    try:
        try:
            sink = _PartSink(part, end - begin, dim)
            try:
                cols, empty = fill_rows(inp, sink, begin, end, None if whole else labeller)
                sink.finish(cols.frame() if labeller is not None and not whole else None, empty)
            finally:
                sink.file.close()
        except Exception as exc:  # every rank learns below that one failed, instead of waiting at a barrier
            error = exc
        if not any(_failures(error)) and rank == 0:
            try:
                result = _merge_parts(data, inp, out, dim, labeller, whole, world)
            except Exception as exc:
                error = exc
        failures = _failures(error)
        if error is None and any(failures):  # rank 0 says what failed (the command prints rank 0's error only)
            first = next(r for r, message in enumerate(failures) if message)
            error = ScmmError(f"{failures[first]} (on rank {first} of {world}; no output was written)")
    finally:
        part.unlink(missing_ok=True)
        if own:
            tdist.barrier()
            tdist.destroy_process_group()
    if error is not None:
        raise error
    return result


def _failures(error: BaseException | None) -> list[str | None]:
    """Every rank's error message (None where it has none), on every rank (a collective: every rank calls it)."""
    messages: list[str | None] = [None] * tdist.get_world_size()
    own = None if error is None else str(error) if isinstance(error, ScmmError) else \
        f"{type(error).__name__}: {error}"
    tdist.all_gather_object(messages, own)
    return messages


def _merge_parts(data: Any, inp: PreparedInput, out: Path, dim: int, labeller: Labeller | None,
                 whole: bool, world: int) -> Path:
    n, step = inp.n_obs, inp.opts.chunk_size
    cols, empty = ObsColumns(n), np.zeros(n, dtype=bool)
    try:
        with Sink(data, out, n, dim) as sink:
            for rank in range(world):
                begin, end = _rank_rows(n, world, rank)
                with h5py.File(_part_path(out, rank), "r") as f:
                    for a in range(0, end - begin, step):
                        sink.put(begin + a, f[EMBEDDING_KEY][a:a + step])
                    empty[begin:end] = f["empty"][...]
                    if labeller is not None and not whole:
                        cols.put(begin, ad.io.read_elem(f["obs"]).reset_index(drop=True))
            return sink.finish(labels_at_end(sink, cols, empty, labeller, whole))
    finally:
        for rank in range(1, world):
            _part_path(out, rank).unlink(missing_ok=True)
