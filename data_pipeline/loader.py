"""Streaming, resumable loader over a corpus: padded cell-tower batches.

Every (rank, dataloader worker) pair is one *stream*. Per epoch the shard order is shuffled with
the seed, shards are dealt to the streams of all ranks round-robin, and each stream's cells are
shuffled inside consecutive windows of `shuffle_buffer` cells, so only the shards overlapping one
window are held in memory. The whole order is a pure function of (manifest, seed, epoch, stream),
which is what makes resuming exact: the loader's state is the epoch, the number of cells each of
its streams has delivered, and which stream delivers next (torch's DataLoader serves workers
round-robin, so on resume the streams are rotated onto the workers to keep that order).

How a cell becomes model input is not the loader's business: the model's
:class:`~scmm.data_pipeline.encoding.CellEncoding` decides it and :func:`~scmm.data_pipeline.encoding.encode_cells`
does it, with one generator per batch (seeded by seed, epoch, stream and position, so resume is exact).
"""
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np
import scipy.sparse as sp
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from scmm.data_pipeline.encoding import CellEncoding, encode_cells
from scmm.data_pipeline.store import Corpus, label_keys
from scmm.data_pipeline.vocab import GeneVocab
from scmm.errors import ScmmError

TEXT_COLUMNS = ("cell_id", "text", "cell_type_ontology_term_id", "cell_type", "tissue", "disease")


@dataclass
class LoaderConfig:
    """How the cells of a split are batched and shuffled (YAML key ``loader``)."""

    batch_size: int = 32
    shuffle: bool = True
    shuffle_buffer: int = 4096
    seed: int = 0
    num_workers: int = 0
    drop_last: bool = True
    even_ranks: bool = True  # every rank yields the same number of batches (needed by data parallelism)
    group_by_length: bool = False  # batches of cells of similar length (less padding), see stream_order

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.shuffle_buffer < 1 or self.num_workers < 0:
            raise ValueError("loader.batch_size and shuffle_buffer must be >= 1, num_workers >= 0")

    @classmethod
    def inference(cls, batch_size: int = 64) -> "LoaderConfig":
        """Every cell once, in corpus order."""
        return cls(batch_size=batch_size, shuffle=False, drop_last=False, even_ranks=False)


def _rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in keys]))


def shard_assignment(n_shards: int, n_streams: int, seed: int, epoch: int, shuffle: bool) -> list[np.ndarray]:
    """Shard indices of each global stream for one epoch."""
    order = _rng(seed, epoch, 0).permutation(n_shards) if shuffle else np.arange(n_shards)
    return [order[s::n_streams] for s in range(n_streams)]


def stream_order(sizes: np.ndarray, shards: np.ndarray, seed: int, epoch: int, stream: int, shuffle: bool,
                 window: int, lengths: list[np.ndarray] | None = None, batch_size: int = 1) -> np.ndarray:
    """(shard index, row) pairs of one stream in delivery order, as an [n, 2] array.

    With ``lengths`` (genes per cell of each shard) the cells of each shuffled window are sorted by length, cut
    into batches of ``batch_size``, and the batches of the window are shuffled: each batch holds cells of similar
    length (little padding), the window's cells and the batches' order stay random, and the order is still a
    pure function of (seed, epoch, stream).
    """
    if len(shards) == 0:
        return np.zeros((0, 2), dtype=np.int64)
    pairs = np.concatenate([np.stack([np.full(sizes[s], s), np.arange(sizes[s])], 1) for s in shards])
    if not shuffle:
        return pairs
    rng = _rng(seed, epoch, 1, stream)
    for start in range(0, len(pairs), window):
        block = pairs[start:start + window][rng.permutation(min(window, len(pairs) - start))]
        if lengths is not None:
            n = np.array([lengths[s][r] for s, r in block])
            block = block[np.argsort(n, kind="stable")]
            batches = [block[i:i + batch_size] for i in range(0, len(block), batch_size)]
            block = np.concatenate([batches[i] for i in rng.permutation(len(batches))])
        pairs[start:start + window] = block
    return pairs


@dataclass
class _Encoder:
    """What a stream needs to turn cells into model input."""

    encoding: CellEncoding
    vocab: GeneVocab
    training: bool


class CorpusStream(IterableDataset):
    """The cells of one split for this rank, as batches; iterated by a DataLoader's workers."""

    def __init__(self, corpus_path: str, split: str, cfg: LoaderConfig, encoder: _Encoder, rank: int,
                 world_size: int, epoch: int, start: list[int], rotation: int):
        self.corpus_path, self.split, self.cfg, self.encoder = corpus_path, split, cfg, encoder
        self.rank, self.world_size, self.epoch, self.start, self.rotation = rank, world_size, epoch, start, rotation

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
        lengths = None
        if self.cfg.group_by_length:
            mine = set(shards.tolist())
            lengths = [corpus.cell_lengths(e["name"]) if i in mine else None for i, e in enumerate(entries)]
        order = stream_order(sizes, shards, self.cfg.seed, self.epoch, stream, self.cfg.shuffle,
                             self.cfg.shuffle_buffer, lengths, self.cfg.batch_size)
        labels = {c: i for i, c in enumerate(corpus.cell_types)}
        pos = self.start[local]
        shards = _ShardCache(corpus, entries, labels, order[pos:])
        bs = self.cfg.batch_size
        try:
            while pos < len(order):
                end = min(pos + bs, len(order))
                if end - pos < bs and self.cfg.drop_last:
                    return
                part = order[pos:end]
                cells, obs, label_ids = _gather(shards, part, corpus.n_genes)
                enc = self.encoder
                batch = encode_cells(cells, corpus.gene_vocab_ids, enc.vocab, enc.encoding,
                                     normalization=corpus.manifest["normalization"], training=enc.training,
                                     # one generator per batch: a resumed run starts at a batch
                                     rng=_rng(self.cfg.seed, self.epoch, 2, stream, pos))
                batch["labels"] = torch.from_numpy(label_ids)
                batch.update({key: obs[key].tolist() for key in TEXT_COLUMNS})
                batch["stream"], batch["position"] = local, end
                shards.delivered(part)
                pos = end
                yield batch
        finally:
            shards.close()


@dataclass
class _Shard:
    """A shard in a stream's memory: its expression, strings, and each cell's label index."""

    matrix: sp.csr_matrix
    obs: dict[str, np.ndarray]
    labels: np.ndarray

    @classmethod
    def read(cls, corpus: Corpus, name: str, labels: dict[str, int]) -> "_Shard":
        shard = corpus.read_shard(name, columns=TEXT_COLUMNS)
        keys = label_keys(shard.obs["cell_type_ontology_term_id"], shard.obs["cell_type"])
        return cls(shard.matrix, shard.obs, np.array([labels.get(k, -1) for k in keys], dtype=np.int64))


class _ShardCache:
    """The shards of one stream: each read once, one ahead of need in a thread (zarr's decoding and the checksums
    release the GIL, so the read overlaps the encoding of the batches before it), dropped when its last cell is
    delivered, so memory holds the shards of one shuffle window plus one."""

    def __init__(self, corpus: Corpus, entries: list[dict], labels: dict[str, int], order: np.ndarray):
        self._read = lambda s: _Shard.read(corpus, entries[s]["name"], labels)
        self._due = np.bincount(order[:, 0], minlength=len(entries))  # cells still to deliver, per shard
        _, first = np.unique(order[:, 0], return_index=True)
        self._queue = order[np.sort(first), 0].tolist()  # shards in the order they are first needed
        self._place = {s: k for k, s in enumerate(self._queue)}
        self._submitted = 0
        self._held: dict[int, Future] = {}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="scmm-shard")

    def __getitem__(self, s: int) -> _Shard:
        ahead = min(self._place[s] + 2, len(self._queue))  # this shard and the next one in flight
        while self._submitted < ahead:
            nxt = self._queue[self._submitted]
            self._held[nxt] = self._pool.submit(self._read, nxt)
            self._submitted += 1
        return self._held[s].result()

    def delivered(self, part: np.ndarray) -> None:
        self._due -= np.bincount(part[:, 0], minlength=len(self._due))
        for s in [s for s in self._held if self._due[s] == 0]:
            del self._held[s]

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """``concatenate([arange(a, a + n) for a, n in zip(starts, counts)])`` without a Python loop."""
    return np.repeat(starts - np.cumsum(counts) + counts, counts) + np.arange(counts.sum())


def _gather(shards: _ShardCache, part: np.ndarray, n_genes: int) -> tuple[sp.csr_matrix, dict[str, np.ndarray],
                                                                         np.ndarray]:
    """The cells ``part`` ((shard, row) pairs) as one CSR matrix in that order, their strings and labels."""
    n = len(part)
    counts = np.empty(n, dtype=np.int64)
    pieces = [(s, np.flatnonzero(part[:, 0] == s)) for s in np.unique(part[:, 0])]
    for s, mine in pieces:
        indptr = shards[s].matrix.indptr
        counts[mine] = indptr[part[mine, 1] + 1] - indptr[part[mine, 1]]
    indptr = np.concatenate([[0], np.cumsum(counts)])
    like = shards[pieces[0][0]].matrix
    data, indices = np.empty(indptr[-1], dtype=like.data.dtype), np.empty(indptr[-1], dtype=like.indices.dtype)
    obs = {key: np.empty(n, dtype=object) for key in TEXT_COLUMNS}
    label_ids = np.empty(n, dtype=np.int64)
    for s, mine in pieces:
        shard, rows = shards[s], part[mine, 1]
        src = _ranges(shard.matrix.indptr[rows], counts[mine])
        dst = slice(None) if len(pieces) == 1 else _ranges(indptr[mine], counts[mine])
        data[dst], indices[dst] = shard.matrix.data[src], shard.matrix.indices[src]
        for key in TEXT_COLUMNS:
            obs[key][mine] = shard.obs[key][rows]
        label_ids[mine] = shard.labels[rows]
    return sp.csr_matrix((data, indices, indptr), shape=(n, n_genes)), obs, label_ids


def _as_is(batch: dict) -> dict:
    """Batches are complete when a stream yields them; skip DataLoader's walk over every string."""
    return batch


class CorpusLoader:
    """Batches of one split for one rank, encoded as the model reads cells; `state_dict()`/`load_state_dict()`
    resume exactly. ``training`` picks the encoding's length limit (training or inference)."""

    def __init__(self, corpus: str | Corpus, split: str, cfg: LoaderConfig, encoding: CellEncoding,
                 vocab: GeneVocab, rank: int = 0, world_size: int = 1, training: bool = True):
        self.corpus = corpus if isinstance(corpus, Corpus) else Corpus(corpus)
        vocab.check_panel(self.corpus.gene_symbols, self.corpus.gene_vocab_ids, f"the corpus {self.corpus.path}")
        self.split, self.cfg, self.rank, self.world_size = split, cfg, rank, world_size
        self.encoder = _Encoder(encoding, vocab, training)
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
            dataset = CorpusStream(str(self.corpus.path), self.split, self.cfg, self.encoder, self.rank,
                                   self.world_size, self.epoch, list(self.consumed), self.next_stream)
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
                "config": asdict(self.cfg), "encoding": asdict(self.encoder.encoding), "split": self.split}

    def load_state_dict(self, state: dict) -> None:
        mine = {"world_size": self.world_size, "num_workers": self.n_workers, "split": self.split}
        for key, value in mine.items():
            if state.get(key) != value:
                raise ScmmError(f"cannot resume the loader: {key} was {state.get(key)}, now {value}")
        if "encoding" not in state:
            raise ScmmError("cannot resume the loader: the checkpoint was written by an older scmm")
        for section, now, keys in (("config", self.cfg, ("seed", "batch_size", "shuffle", "shuffle_buffer",
                                                          "group_by_length")),
                                   ("encoding", self.encoder.encoding, ("max_len", "n_bins"))):
            for key in keys:
                was = state[section].get(key, getattr(type(now)(), key))  # a key added later: its default
                if was != getattr(now, key):
                    raise ScmmError(f"cannot resume the loader: {section} option {key} changed "
                                    f"({was} -> {getattr(now, key)})")
        self.epoch, self.batches_done = int(state["epoch"]), int(state["batches_done"])
        self.consumed, self.next_stream = list(state["consumed"]), int(state["next_stream"])
