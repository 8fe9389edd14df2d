"""Streaming, resumable loader over a corpus: scGPT-style padded batches.

Every (rank, dataloader worker) pair is one *stream*. Per epoch the shard order is shuffled with
the seed, shards are dealt to the streams of all ranks round-robin, and each stream's cells are
shuffled inside consecutive windows of `shuffle_buffer` cells, so only the shards overlapping one
window are held in memory. The whole order is a pure function of (manifest, seed, epoch, stream),
which is what makes resuming exact: the loader's state is the epoch, the number of cells each of
its streams has delivered, and which stream delivers next (torch's DataLoader serves workers
round-robin, so on resume the streams are rotated onto the workers to keep that order).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from scmm.data_pipeline.store import Corpus, label_keys
from scmm.errors import ScmmError

TEXT_COLUMNS = ("cell_id", "text", "cell_type_ontology_term_id", "cell_type", "tissue", "disease")


@dataclass
class LoaderConfig:
    """How cells become batches. `n_bins` > 0 gives scGPT value binning, 0 continuous log1p values."""

    batch_size: int = 32
    max_len: int = 1200  # including <cls>
    n_bins: int = 51
    pad_value: float = -2.0
    shuffle: bool = True
    shuffle_buffer: int = 4096
    seed: int = 0
    num_workers: int = 0
    drop_last: bool = True
    even_ranks: bool = True  # every rank yields the same number of batches (needed by data parallelism)
    target_sum: float = 1e4


_BIN_PLANS: dict[tuple[int, int], tuple] = {}


def binning(values: np.ndarray, n_bins: int, rng: np.random.Generator) -> np.ndarray:
    """scGPT value binning of one cell's non-zero values into 1..n_bins-1 by the cell's own quantiles.

    Same result as upstream's `np.quantile` edges + two `np.digitize` calls, computed from one sort
    (numpy's linear-interpolation quantile formula, with its interpolation weights cached per cell
    size). Ties between bin edges are spread uniformly as upstream does, but with a seeded generator.
    """
    n = values.size
    if n == 0:
        return values.astype(np.float32)
    plan = _BIN_PLANS.get((n, n_bins))
    if plan is None:
        position = np.linspace(0, 1, n_bins - 1) * (n - 1)
        lo = np.floor(position).astype(np.intp)
        frac = position - lo
        plan = (lo, np.minimum(lo + 1, n - 1), frac, frac >= 0.5)
        if len(_BIN_PLANS) < 100_000:  # one small entry per distinct number of expressed genes
            _BIN_PLANS[(n, n_bins)] = plan
    lo, hi, frac, upper = plan
    ordered = np.sort(values)
    a, b = ordered[lo], ordered[hi]
    edges = np.where(upper, b - (b - a) * (1 - frac), a + (b - a) * frac)  # numpy's own lerp
    left = np.searchsorted(edges, values, side="right")  # np.digitize(values, edges)
    right = np.searchsorted(edges, values, side="left")  # np.digitize(values, edges, right=True)
    return np.ceil(rng.random(n) * (right - left) + left).astype(np.float32)


def _rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in keys]))


def shard_assignment(n_shards: int, n_streams: int, seed: int, epoch: int, shuffle: bool) -> list[np.ndarray]:
    """Shard indices of each global stream for one epoch."""
    order = _rng(seed, epoch, 0).permutation(n_shards) if shuffle else np.arange(n_shards)
    return [order[s::n_streams] for s in range(n_streams)]


def stream_order(sizes: np.ndarray, shards: np.ndarray, seed: int, epoch: int, stream: int, shuffle: bool,
                 window: int) -> np.ndarray:
    """(shard index, row) pairs of one stream in delivery order, as an [n, 2] array."""
    if len(shards) == 0:
        return np.zeros((0, 2), dtype=np.int64)
    pairs = np.concatenate([np.stack([np.full(sizes[s], s), np.arange(sizes[s])], 1) for s in shards])
    if shuffle:
        rng = _rng(seed, epoch, 1, stream)
        for start in range(0, len(pairs), window):
            block = pairs[start:start + window]
            pairs[start:start + window] = block[rng.permutation(len(block))]
    return pairs


class _Collator:
    """Cells -> scGPT inputs: `<cls>` + expressed genes (sampled down to max_len - 1), values, padding."""

    def __init__(self, cfg: LoaderConfig, gene_vocab_ids: np.ndarray, cls_id: int, pad_id: int,
                 normalization: str, label_index: dict[str, int]):
        self.cfg, self.gene_vocab_ids, self.cls_id, self.pad_id = cfg, gene_vocab_ids, cls_id, pad_id
        self.normalization, self.label_index = normalization, label_index

    def cell(self, indices: np.ndarray, data: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        values = data.astype(np.float64)
        if self.normalization == "counts":
            values = np.log1p(values / max(values.sum(), 1e-12) * self.cfg.target_sum)
        if self.cfg.n_bins > 0:
            values = binning(values, self.cfg.n_bins, rng)
        keep = self.cfg.max_len - 1
        if len(indices) > keep:
            pick = np.sort(rng.choice(len(indices), keep, replace=False))
            indices, values = indices[pick], values[pick]
        genes = np.concatenate([[self.cls_id], self.gene_vocab_ids[indices]])
        return genes, np.concatenate([[0.0], values]).astype(np.float32)

    def batch(self, cells: list[tuple[np.ndarray, np.ndarray]], obs: list[dict]) -> dict:
        length = max(len(g) for g, _ in cells)
        n = len(cells)
        gene_ids = np.full((n, length), self.pad_id, dtype=np.int64)
        values = np.full((n, length), self.cfg.pad_value, dtype=np.float32)
        for i, (g, v) in enumerate(cells):
            gene_ids[i, :len(g)], values[i, :len(v)] = g, v
        gene_ids_t = torch.from_numpy(gene_ids)
        out = {"gene_ids": gene_ids_t, "values": torch.from_numpy(values), "padding_mask": gene_ids_t == self.pad_id,
               "labels": torch.tensor([self.label_index.get(k, -1) for k in label_keys(
                   [o["cell_type_ontology_term_id"] for o in obs], [o["cell_type"] for o in obs])])}
        for key in TEXT_COLUMNS:
            out[key] = [o[key] for o in obs]
        return out


class CorpusStream(IterableDataset):
    """The cells of one split for this rank, as batches; iterated by a DataLoader's workers."""

    def __init__(self, corpus_path: str, split: str, cfg: LoaderConfig, rank: int, world_size: int,
                 epoch: int, start: list[int], rotation: int, vocab_ids: tuple[int, int]):
        self.corpus_path, self.split, self.cfg = corpus_path, split, cfg
        self.rank, self.world_size, self.epoch, self.start, self.rotation = rank, world_size, epoch, start, rotation
        self.cls_id, self.pad_id = vocab_ids

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        n_workers = max(self.cfg.num_workers, 1)
        worker = info.id if info is not None else 0
        local = (worker + self.rotation) % n_workers
        corpus = Corpus(self.corpus_path)
        entries = corpus.shards(self.split)
        sizes = np.array([e["n_cells"] for e in entries])
        stream = self.rank * n_workers + local
        shards = shard_assignment(len(entries), self.world_size * n_workers, self.cfg.seed, self.epoch,
                                  self.cfg.shuffle)[stream]
        order = stream_order(sizes, shards, self.cfg.seed, self.epoch, stream, self.cfg.shuffle,
                             self.cfg.shuffle_buffer)
        collator = _Collator(self.cfg, corpus.gene_vocab_ids, self.cls_id, self.pad_id,
                             corpus.manifest["normalization"], {c: i for i, c in enumerate(corpus.cell_types)})
        pos = self.start[local]
        remaining = np.bincount(order[pos:, 0], minlength=len(entries))  # cells still due, per shard
        cache: dict[int, object] = {}
        bs = self.cfg.batch_size
        while pos < len(order):
            end = min(pos + bs, len(order))
            if end - pos < bs and self.cfg.drop_last:
                return
            cells, obs = [], []
            rng = _rng(self.cfg.seed, self.epoch, 2, stream, pos)  # one generator per batch: resume starts at batches
            for shard_idx, row in order[pos:end]:
                if shard_idx not in cache:
                    cache[shard_idx] = corpus.read_shard(entries[shard_idx]["name"], columns=TEXT_COLUMNS)
                shard = cache[shard_idx]
                lo, hi = shard.matrix.indptr[row], shard.matrix.indptr[row + 1]
                cells.append(collator.cell(shard.matrix.indices[lo:hi], shard.matrix.data[lo:hi], rng))
                obs.append({k: shard.obs[k][row] for k in TEXT_COLUMNS})
                remaining[shard_idx] -= 1
                if remaining[shard_idx] == 0:
                    del cache[shard_idx]  # every cell of it delivered: memory stays bounded
            batch = collator.batch(cells, obs)
            batch["stream"], batch["position"] = local, end
            pos = end
            yield batch


def _as_is(batch: dict) -> dict:
    """Batches are complete when a stream yields them; skip DataLoader's walk over every string."""
    return batch


class CorpusLoader:
    """Batches of one split for one rank, with `state_dict()`/`load_state_dict()` for exact resume."""

    def __init__(self, corpus: str | Corpus, split: str, cfg: LoaderConfig, cls_id: int, pad_id: int,
                 rank: int = 0, world_size: int = 1):
        self.corpus = corpus if isinstance(corpus, Corpus) else Corpus(corpus)
        self.split, self.cfg, self.rank, self.world_size = split, cfg, rank, world_size
        self.vocab_ids = (cls_id, pad_id)
        self.n_workers = max(cfg.num_workers, 1)
        self._sizes = np.array([e["n_cells"] for e in self.corpus.shards(split)])
        if self._sizes.sum() == 0:
            raise ScmmError(f"split '{split}' of corpus {self.corpus.path} is empty")
        self.epoch, self.batches_done = 0, 0
        self.consumed = [0] * self.n_workers
        self.next_stream = 0

    # --- sizes ------------------------------------------------------------------------------------
    def _stream_batches(self, rank: int, epoch: int) -> list[int]:
        n_streams = self.world_size * self.n_workers
        assignment = shard_assignment(len(self._sizes), n_streams, self.cfg.seed, epoch, self.cfg.shuffle)
        out = []
        for local in range(self.n_workers):
            n = int(self._sizes[assignment[rank * self.n_workers + local]].sum())
            out.append(n // self.cfg.batch_size if self.cfg.drop_last else -(-n // self.cfg.batch_size))
        return out

    def batches_in_epoch(self, epoch: int | None = None) -> int:
        """Batches this rank yields in an epoch (the minimum over ranks when `even_ranks`)."""
        epoch = self.epoch if epoch is None else epoch
        mine = sum(self._stream_batches(self.rank, epoch))
        if not self.cfg.even_ranks:
            return mine
        return min(sum(self._stream_batches(r, epoch)) for r in range(self.world_size))

    def __len__(self) -> int:
        return self.batches_in_epoch()

    # --- iteration --------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict]:
        """The rest of the current epoch; afterwards the loader stands at the start of the next one."""
        total = self.batches_in_epoch()
        stream_len = self._stream_batches(self.rank, self.epoch)
        if self.batches_done < total:
            dataset = CorpusStream(str(self.corpus.path), self.split, self.cfg, self.rank, self.world_size,
                                   self.epoch, list(self.consumed), self.next_stream, self.vocab_ids)
            loader = DataLoader(dataset, batch_size=None, num_workers=self.cfg.num_workers,
                                persistent_workers=False, collate_fn=_as_is,
                                # its own generator: starting an iterator must not draw from the global
                                # RNG, or a resumed run's dropout masks would shift
                                generator=torch.Generator().manual_seed(self.cfg.seed + self.epoch))
            for batch in loader:
                s = batch.pop("stream")
                self.consumed[s] = batch.pop("position")
                self.batches_done += 1
                self.next_stream = self._after(s, stream_len)
                yield batch
                if self.batches_done >= total:
                    break
            del loader
        self.epoch += 1
        self.batches_done, self.consumed, self.next_stream = 0, [0] * self.n_workers, 0

    def _after(self, s: int, stream_len: list[int]) -> int:
        bs = self.cfg.batch_size
        for k in range(1, self.n_workers + 1):
            t = (s + k) % self.n_workers
            if self.consumed[t] // bs < stream_len[t]:
                return t
        return 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches_done": self.batches_done, "consumed": list(self.consumed),
                "next_stream": self.next_stream, "world_size": self.world_size, "num_workers": self.n_workers,
                "config": asdict(self.cfg), "split": self.split}

    def load_state_dict(self, state: dict) -> None:
        mine = {"world_size": self.world_size, "num_workers": self.n_workers, "split": self.split}
        for key, value in mine.items():
            if state.get(key) != value:
                raise ScmmError(f"cannot resume the loader: {key} was {state.get(key)}, now {value}")
        for key in ("seed", "batch_size", "shuffle", "shuffle_buffer", "max_len", "n_bins"):
            if state["config"].get(key) != getattr(self.cfg, key):
                raise ScmmError(f"cannot resume the loader: loader option {key} changed "
                                f"({state['config'].get(key)} -> {getattr(self.cfg, key)})")
        self.epoch, self.batches_done = int(state["epoch"]), int(state["batches_done"])
        self.consumed, self.next_stream = list(state["consumed"]), int(state["next_stream"])
