"""Streaming loader: sharding over ranks and workers, deterministic shuffle, exact resume, collation."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import split_cell_ids
from scmm.data_pipeline.encoding import CellEncoding, binning
from scmm.data_pipeline.loader import CorpusLoader, LoaderConfig
from scmm.data_pipeline.store import Corpus
from scmm.data_pipeline.vocab import GeneVocab
from scmm.errors import ScmmError

VOCAB = GeneVocab.load()


def _loader(corpus: Path, rank: int = 0, world: int = 1, max_len: int = 12, n_bins: int = 51,
            **kw) -> CorpusLoader:
    cfg = LoaderConfig(**{"batch_size": 8, "num_workers": 2, "shuffle_buffer": 40, **kw})
    return CorpusLoader(corpus, "train", cfg, CellEncoding(max_len=max_len, n_bins=n_bins), VOCAB, rank=rank,
                        world_size=world)


def _ids(loader: CorpusLoader, limit: int | None = None) -> list[tuple[str, ...]]:
    out = []
    for batch in loader:
        out.append(tuple(batch["cell_id"]))
        if limit is not None and len(out) == limit:
            break
    return out


def test_ranks_partition_the_split_and_epochs_reshuffle(small_corpus: Path):
    per_rank = [_ids(_loader(small_corpus, r, 2)) for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) > 0  # even across ranks
    cells = [c for rank in per_rank for b in rank for c in b]
    assert len(cells) == len(set(cells))  # no cell twice in an epoch
    n_train = Corpus(small_corpus).manifest["splits"]["train"]
    assert len(cells) > 0.6 * n_train
    loader = _loader(small_corpus, 0, 2)
    e0, e1 = _ids(loader), _ids(loader)
    assert e0 == per_rank[0] and e0 != e1 and sorted(map(sorted, e0)) != sorted(map(sorted, e1))
    assert _ids(_loader(small_corpus, 0, 2, seed=1)) != e0


@pytest.mark.parametrize("stop", [1, 5, 8])
def test_resume_is_exact_across_2_ranks_x_2_workers(small_corpus: Path, stop: int):
    for rank in range(2):
        full = _ids(_loader(small_corpus, rank, 2)) + _ids(_loader_at_epoch(small_corpus, rank, 1))
        first = _loader(small_corpus, rank, 2)
        head = _ids(first, stop)
        state = first.state_dict()
        resumed = _loader(small_corpus, rank, 2)
        resumed.load_state_dict(state)
        tail = _ids(resumed) + _ids(resumed)  # rest of epoch 0, then all of epoch 1
        assert head + tail == full


def _loader_at_epoch(corpus: Path, rank: int, epoch: int) -> CorpusLoader:
    loader = _loader(corpus, rank, 2)
    for _ in range(epoch):
        _ids(loader)
    return loader


def test_resume_rejects_changed_layout(small_corpus: Path):
    state = _loader(small_corpus, 0, 2).state_dict()
    with pytest.raises(ScmmError, match="2 ranks x 2 workers, now 2 x 1"):  # that is `reshard`'s work
        _loader(small_corpus, 0, 2, num_workers=1).load_state_dict(state)
    with pytest.raises(ScmmError, match="batch_size"):
        _loader(small_corpus, 0, 2, batch_size=4).load_state_dict(state)


def test_batches_are_scgpt_inputs(small_corpus: Path):
    corpus = Corpus(small_corpus)
    batch = next(iter(_loader(small_corpus, num_workers=0, n_bins=0, max_len=64)))
    gene_ids, values, pad = batch["gene_ids"], batch["values"], batch["padding_mask"]
    assert (gene_ids[:, 0] == VOCAB.cls_id).all() and (values[:, 0] == 0).all()
    assert (values[pad] == -2.0).all() and (gene_ids[pad] == VOCAB.pad_id).all()
    assert not pad[:, : (~pad).sum(1).min()].any()  # padding only at the end
    assert pad.sum(1).min() == 0  # padded to the longest cell, not to max_len
    # continuous values are log1p(count / total * 1e4) of the cell's expressed genes
    cid = batch["cell_id"][0]
    for entry in corpus.shards("train"):
        shard = corpus.read_shard(entry["name"])
        hit = np.flatnonzero(shard.obs["cell_id"] == cid)
        if hit.size:
            row = shard.matrix[hit[0]]
            break
    expect = np.log1p(row.data / row.data.sum() * 1e4)
    n = int((~pad[0]).sum()) - 1
    assert n == row.nnz
    np.testing.assert_allclose(values[0, 1:n + 1].numpy(), expect, rtol=1e-6)
    assert gene_ids[0, 1:n + 1].tolist() == corpus.gene_vocab_ids[row.indices].tolist()
    labels = [corpus.cell_types[i] for i in batch["labels"]]
    assert labels == batch["cell_type_ontology_term_id"]


def test_long_cells_are_sampled_to_max_len(small_corpus: Path):
    batch = next(iter(_loader(small_corpus, num_workers=0, max_len=5)))
    assert batch["gene_ids"].shape[1] == 5 and not batch["padding_mask"].any()
    again = next(iter(_loader(small_corpus, num_workers=0, max_len=5)))
    assert (again["gene_ids"] == batch["gene_ids"]).all()  # the sample is seeded


def test_binning_matches_scgpt_definition():
    rng = np.random.default_rng(0)
    values = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    # edges at the quantiles 0, 1/3, 2/3, 1 are 1, 2.33, 3.67, 5; a value is in bin i when
    # edge[i-1] <= x < edge[i]; the top edge itself goes to the last bin (right-side digitize)
    bins = binning(values, 5, rng)
    assert bins.tolist() == [1.0, 1.0, 2.0, 3.0, 4.0]
    big = binning(rng.lognormal(size=1000), 51, rng)
    assert big.min() >= 1 and big.max() <= 50 and len(np.unique(big)) == 50


def test_memory_stays_bounded_by_the_shuffle_window(small_corpus: Path, monkeypatch):
    """Each shard is read once per epoch and dropped when its last cell is delivered."""
    reads: list[str] = []
    original = Corpus.read_shard
    monkeypatch.setattr(Corpus, "read_shard",
                        lambda self, name, columns=None: reads.append(name) or original(self, name, columns))
    loader = _loader(small_corpus, num_workers=0, drop_last=False, even_ranks=False, shuffle_buffer=32)
    n = sum(len(b) for b in _ids(loader))
    assert n == Corpus(small_corpus).manifest["splits"]["train"]
    assert len(reads) == len(set(reads)) == len(Corpus(small_corpus).shards("train"))


def test_binning_equals_the_quantile_digitize_definition():
    """The one-sort implementation gives upstream's edges (np.quantile) and digitize sides exactly."""
    data = np.random.default_rng(1)
    for n in (1, 2, 7, 50, 333):
        values = np.round(data.lognormal(size=n), 1)  # rounding makes ties
        edges = np.quantile(values, np.linspace(0, 1, 50))
        left, right = np.digitize(values, edges), np.digitize(values, edges, right=True)
        u = np.random.default_rng(5).random(n)
        expect = np.ceil(u * (right - left) + left)
        np.testing.assert_array_equal(binning(values, 51, np.random.default_rng(5)), expect)


@pytest.mark.parametrize("stop", [2, 7])
def test_length_grouped_batches_hold_similar_cells_and_resume_exactly(small_corpus: Path, stop: int):
    """group_by_length: within each shuffled window, batches of cells of similar length, in a random order; an
    epoch still delivers every cell once and a resumed loader the same batches."""
    corpus = Corpus(small_corpus)
    lengths = {}
    for entry in corpus.shards("train"):
        ids = corpus.read_shard(entry["name"], columns=("cell_id",)).obs["cell_id"]
        lengths.update(zip(ids, corpus.cell_lengths(entry["name"])))
    grouped = _ids(_loader(small_corpus, 0, 2, group_by_length=True, shuffle_buffer=64))
    plain = _ids(_loader(small_corpus, 0, 2, shuffle_buffer=64))
    assert sorted(c for b in grouped for c in b) == sorted(c for b in plain for c in b)  # the same cells

    def spread(batches):  # mean range of lengths inside a batch
        return np.mean([np.ptp([lengths[c] for c in b]) for b in batches])
    assert spread(grouped) < 0.5 * spread(plain)
    head = _ids(first := _loader(small_corpus, 0, 2, group_by_length=True, shuffle_buffer=64), stop)
    resumed = _loader(small_corpus, 0, 2, group_by_length=True, shuffle_buffer=64)
    resumed.load_state_dict(first.state_dict())
    assert head + _ids(resumed) == grouped


def test_a_shard_that_fails_to_read_ahead_stops_the_loader_with_its_error(small_corpus: Path, monkeypatch):
    """Shards are read one ahead in a thread; a read that fails there is the loader's error when the shard is
    needed, and the batches before it are delivered."""
    names = [e["name"] for e in Corpus(small_corpus).shards("train")]
    original = Corpus.read_shard

    def read(self, name, columns=None):
        if name == names[-1]:
            raise ScmmError(f"corpus shard '{name}' is corrupted (test)")
        return original(self, name, columns)

    monkeypatch.setattr(Corpus, "read_shard", read)
    delivered = []
    with pytest.raises(ScmmError, match=names[-1]):
        for batch in _loader(small_corpus, num_workers=0, shuffle=False, shuffle_buffer=8):
            delivered.append(batch["cell_id"])
    assert delivered  # the shards before the broken one were delivered


def _cells(batches: list[tuple[str, ...]]) -> list[str]:
    return [c for b in batches for c in b]


def _launch(corpus: Path, world: int, workers: int, **kw) -> list[CorpusLoader]:
    return [_loader(corpus, r, world, num_workers=workers, **kw) for r in range(world)]


@pytest.mark.parametrize("old, new, stop", [((2, 2), (1, 1), 3), ((1, 1), (2, 2), 5), ((2, 1), (3, 2), 1),
                                            ((1, 2), (1, 1), 4)])
def test_resume_on_other_ranks_delivers_each_cell_of_the_epoch_once(small_corpus: Path, old, new, stop):
    """A launch of `old` (ranks, workers) stopped after `stop` batches per rank, resumed on `new`: the cells
    delivered before and after are exactly the split's, once each; the epoch after is the new layout's own."""
    every = {"drop_last": False, "even_ranks": False}  # every cell of the split (no cut batch, no cut rank)
    before = _launch(small_corpus, *old, **every)
    head = [c for loader in before for c in _cells(_ids(loader, stop))]
    states = [loader.state_dict() for loader in before]
    after = _launch(small_corpus, *new, **every)
    for loader in after:
        loader.reshard(states)
    tail = [_cells(_ids(loader)) for loader in after]
    train = split_cell_ids(small_corpus)
    cells = head + [c for part in tail for c in part]
    assert len(cells) == len(set(cells)) and set(cells) == set(train)
    assert all(tail)  # every new rank had a share of the rest
    fresh = _launch(small_corpus, *new, **every)
    for loader in fresh:
        _ids(loader)
    assert [_ids(loader) for loader in after] == [_ids(loader) for loader in fresh]


def test_resharded_training_loader_is_even_exact_on_resume_and_chains(small_corpus: Path):
    """With the training defaults (whole batches, the same number on every rank): 2 ranks -> 1 -> 3 delivers no
    cell twice, every rank the same number of batches; a re-sharded loader resumes exactly on its own layout."""
    before = _launch(small_corpus, 2, 2)
    head = [c for loader in before for c in _cells(_ids(loader, 2))]
    middle = _launch(small_corpus, 1, 1)
    middle[0].reshard([loader.state_dict() for loader in before])
    head += _cells(_ids(middle[0], 3))
    after = _launch(small_corpus, 3, 2)
    for loader in after:
        loader.reshard([middle[0].state_dict()])
    tails = [_ids(loader) for loader in after]
    assert len({len(t) for t in tails}) == 1 and tails[0]  # even ranks
    cells = head + [c for t in tails for c in _cells(t)]
    assert len(cells) == len(set(cells))
    assert all(len(b) == 8 for t in tails for b in t)
    # a checkpoint in the middle of the re-sharded epoch resumes exactly
    again = _launch(small_corpus, 3, 2)
    for loader in again:
        loader.reshard([middle[0].state_dict()])
    part = _ids(again[1], 1)
    resumed = _loader(small_corpus, 1, 3, num_workers=2)
    resumed.load_state_dict(again[1].state_dict())
    assert part + _ids(resumed) == tails[1]


def test_reshard_after_the_last_batch_of_an_epoch_starts_the_next(small_corpus: Path):
    before = _launch(small_corpus, 2, 2)
    for loader in before:
        n = len(loader)
        _ids(loader, n)  # every batch, but the epoch not closed yet (as a checkpoint right after its last step)
    after = _launch(small_corpus, 1, 1)
    after[0].reshard([loader.state_dict() for loader in before])
    assert after[0].epoch == 1 and after[0].plan == []
