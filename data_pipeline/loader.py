"""Streaming, resumable loader over a corpus: padded cell-tower batches.

Every (rank, dataloader worker) pair is one *stream*. Per epoch the shard order is shuffled with
the seed, shards are dealt to the streams of all ranks round-robin, and each stream's cells are
shuffled inside consecutive windows of `shuffle_buffer` cells, so only the shards overlapping one
window are held in memory. The whole order is a pure function of (manifest, seed, epoch, stream),
which is what makes resuming exact: the loader's state is the epoch, the number of cells each of
its streams has delivered, and which stream delivers next (torch's DataLoader serves workers
round-robin, so on resume the streams are rotated onto the workers to keep that order). A launch on another
number of ranks or workers continues the epoch from every old rank's state (:meth:`CorpusLoader.reshard`,
:class:`EpochLayout`): the cells not delivered yet are dealt to the new streams, none skipped or repeated.

How a cell becomes model input is not the loader's business: the model's
:class:`~scmm.data_pipeline.encoding.CellEncoding` decides it and :func:`~scmm.data_pipeline.encoding.encode_cells`
does it, with one generator per batch (seeded by seed, epoch, stream and position, so resume is exact).
"""
from collections.abc import Callable, Iterator
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


class EpochLayout:
    """Which cells each stream delivers in one epoch, and in what order: a pure function of the corpus's shard
    sizes, the loader options, the epoch and its ``plan``.

    ``plan`` is ``[{"streams": n0}]`` for an epoch run on one number of streams throughout. A run resumed on
    another number of streams (ranks x workers) mid-epoch appends ``{"streams": n1, "consumed": [...]}``, the
    cells each old stream had delivered: the cells the old streams had not delivered yet, in the old streams'
    order, are cut into batches dealt round-robin to the new streams. So no cell of the epoch is skipped or seen
    twice, the new streams' orders are again pure functions of the state, and a run may be re-sharded again.
    """

    def __init__(self, sizes: np.ndarray, cfg: "LoaderConfig", epoch: int, plan: list[dict],
                 lengths: Callable[[int], np.ndarray] | None = None):
        self.sizes, self.cfg, self.epoch, self.plan, self.lengths = sizes, cfg, epoch, plan, lengths

    @property
    def streams(self) -> int:
        return int(self.plan[-1]["streams"])

    @property
    def level(self) -> int:
        """How many times this epoch was re-sharded (0: never)."""
        return len(self.plan) - 1

    def counts(self, level: int | None = None) -> np.ndarray:
        """Cells of each stream at ``level`` (default: the last), computed from sizes alone."""
        level = self.level if level is None else level
        n = int(self.plan[level]["streams"])
        if level == 0:
            assignment = shard_assignment(len(self.sizes), n, self.cfg.seed, self.epoch, self.cfg.shuffle)
            return np.array([int(self.sizes[a].sum()) for a in assignment], dtype=np.int64)
        rest = int((self.counts(level - 1) - np.asarray(self.plan[level]["consumed"])).sum())
        owner = np.arange(-(-rest // self.cfg.batch_size)) % n  # stream of each batch of the remainder
        per_batch = np.full(len(owner), self.cfg.batch_size, dtype=np.int64)
        if len(per_batch) and rest % self.cfg.batch_size:
            per_batch[-1] = rest % self.cfg.batch_size
        return np.bincount(owner, weights=per_batch, minlength=n).astype(np.int64)

    def pairs(self, stream: int, level: int | None = None) -> np.ndarray:
        """(shard index, row) pairs of ``stream`` at ``level`` (default: the last) in delivery order, [n, 2]."""
        level = self.level if level is None else level
        cfg = self.cfg
        if level == 0:
            shards = shard_assignment(len(self.sizes), int(self.plan[0]["streams"]), cfg.seed, self.epoch,
                                      cfg.shuffle)[stream]
            lengths = None
            if cfg.group_by_length and self.lengths is not None:
                mine = set(shards.tolist())
                lengths = [self.lengths(i) if i in mine else None for i in range(len(self.sizes))]
            return stream_order(self.sizes, shards, cfg.seed, self.epoch, stream, cfg.shuffle, cfg.shuffle_buffer,
                                lengths, cfg.batch_size)
        consumed = self.plan[level]["consumed"]
        rest = [self.pairs(t, level - 1)[consumed[t]:] for t in range(int(self.plan[level - 1]["streams"]))]
        rest = np.concatenate(rest) if rest else np.zeros((0, 2), dtype=np.int64)
        owner = (np.arange(len(rest)) // cfg.batch_size) % int(self.plan[level]["streams"])
        return rest[owner == stream]

    def batch_rng(self, stream: int, position: int) -> np.random.Generator:
        """The encoding's generator of the batch that starts at ``position`` of ``stream``."""
        return _rng(self.cfg.seed, self.epoch, 2, stream, position, *([self.level] if self.level else []))


@dataclass
class _Encoder:
    """What a stream needs to turn cells into model input."""

    encoding: CellEncoding
    vocab: GeneVocab
    training: bool


class CorpusStream(IterableDataset):
    """The cells of one split for this rank, as batches; iterated by a DataLoader's workers."""

    def __init__(self, corpus_path: str, split: str, cfg: LoaderConfig, encoder: _Encoder, rank: int,
                 epoch: int, plan: list[dict], start: list[int], rotation: int):
        self.corpus_path, self.split, self.cfg, self.encoder = corpus_path, split, cfg, encoder
        self.rank, self.epoch, self.plan, self.start, self.rotation = rank, epoch, plan, start, rotation

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        n_workers = max(self.cfg.num_workers, 1)
        worker = info.id if info is not None else 0
        local = (worker + self.rotation) % n_workers
        corpus = Corpus(self.corpus_path)
        entries = corpus.shards(self.split)
        sizes = np.array([e["n_cells"] for e in entries])
        stream = self.rank * n_workers + local
        layout = EpochLayout(sizes, self.cfg, self.epoch, self.plan,
                             lambda i: corpus.cell_lengths(entries[i]["name"]))
        order = layout.pairs(stream)
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
                                     rng=layout.batch_rng(stream, pos))
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
        self.plan: list[dict] = []  # the current epoch's re-shardings (EpochLayout); [] while there is none

    # --- sizes ------------------------------------------------------------------------------------
    def layout(self, epoch: int | None = None) -> EpochLayout:
        """Which cells each stream delivers in ``epoch`` (default: the current one)."""
        epoch = self.epoch if epoch is None else epoch
        plan = self.plan if (self.plan and epoch == self.epoch) else [{"streams": self.world_size * self.n_workers}]
        return EpochLayout(self._sizes, self.cfg, epoch, plan)

    def _stream_batches(self, rank: int, epoch: int, layout: EpochLayout | None = None) -> list[int]:
        counts = (layout or self.layout(epoch)).counts()
        mine = counts[rank * self.n_workers:(rank + 1) * self.n_workers]
        bs = self.cfg.batch_size
        return [int(n // bs if self.cfg.drop_last else -(-n // bs)) for n in mine]

    def batches_in_epoch(self, epoch: int | None = None) -> int:
        """Batches this rank yields in an epoch (the minimum over ranks when `even_ranks`)."""
        layout = self.layout(epoch)
        mine = sum(self._stream_batches(self.rank, layout.epoch, layout))
        if not self.cfg.even_ranks:
            return mine
        return min(sum(self._stream_batches(r, layout.epoch, layout)) for r in range(self.world_size))

    def __len__(self) -> int:
        return self.batches_in_epoch()

    # --- iteration --------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict]:
        """The rest of the current epoch; afterwards the loader stands at the start of the next one."""
        total = self.batches_in_epoch()
        stream_len = self._stream_batches(self.rank, self.epoch)
        if self.batches_done < total:
            dataset = CorpusStream(str(self.corpus.path), self.split, self.cfg, self.encoder, self.rank,
                                   self.epoch, self.layout().plan, list(self.consumed), self.next_stream)
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
        self.batches_done, self.consumed, self.next_stream, self.plan = 0, [0] * self.n_workers, 0, []

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
                "plan": self.plan, "config": asdict(self.cfg), "encoding": asdict(self.encoder.encoding),
                "split": self.split}

    def _check_state(self, state: dict) -> None:
        """A state of this split, seed, batching and encoding (what the order of the cells depends on)."""
        if state.get("split") != self.split:
            raise ScmmError(f"cannot resume the loader: split was {state.get('split')}, now {self.split}")
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

    def same_streams(self, state: dict) -> bool:
        """Whether ``state`` was written by a loader with this one's ranks and workers (else: :meth:`reshard`)."""
        return state.get("world_size") == self.world_size and state.get("num_workers") == self.n_workers

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where this rank's loader of a launch with the same ranks and workers stood."""
        if not self.same_streams(state):
            raise ScmmError(f"cannot resume the loader: it ran on {state.get('world_size')} ranks x "
                            f"{state.get('num_workers')} workers, now {self.world_size} x {self.n_workers}")
        self._check_state(state)
        self.epoch, self.batches_done = int(state["epoch"]), int(state["batches_done"])
        self.consumed, self.next_stream = list(state["consumed"]), int(state["next_stream"])
        self.plan = [dict(level) for level in state.get("plan", [])]

    def reshard(self, states: list[dict]) -> None:
        """Continue the epoch of a launch on another number of ranks or workers: ``states`` holds the state of
        every rank of that launch, in rank order. The cells its streams had not delivered are dealt to this
        launch's streams (:class:`EpochLayout`); none is skipped or delivered twice."""
        first = states[0]
        for state in states:
            self._check_state(state)
        old_world, old_workers = int(first["world_size"]), int(first["num_workers"])
        if len(states) != old_world or any(
                (s["world_size"], s["num_workers"], s["epoch"], s.get("plan", [])) !=
                (old_world, old_workers, first["epoch"], first.get("plan", [])) for s in states):
            raise ScmmError("cannot resume the loader: the ranks' checkpointed states disagree")
        epoch = int(first["epoch"])
        plan = [dict(level) for level in first.get("plan", [])] or [{"streams": old_world * old_workers}]
        counts = EpochLayout(self._sizes, self.cfg, epoch, plan).counts()
        bs = self.cfg.batch_size
        per_stream = counts // bs if self.cfg.drop_last else -(-counts // bs)
        per_rank = per_stream.reshape(old_world, old_workers).sum(1)
        due = np.full(old_world, per_rank.min()) if self.cfg.even_ranks else per_rank
        self.batches_done, self.consumed, self.next_stream = 0, [0] * self.n_workers, 0
        if all(int(s["batches_done"]) >= d for s, d in zip(states, due)):  # that epoch was over
            self.epoch, self.plan = epoch + 1, []
            return
        consumed = [int(c) for s in states for c in s["consumed"]]
        self.epoch, self.plan = epoch, plan + [{"streams": self.world_size * self.n_workers, "consumed": consumed}]
