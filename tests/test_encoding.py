"""CellEncoding and encode_cells: exact values on hand-computed cells, the length policy, seeding, the saved file."""
from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.sparse as sp

from scmm.data_pipeline.collate import bin_rows, pad_rows
from scmm.data_pipeline.encoding import CellEncoding, cell_rng, encode_cells, log1p_normalize
from scmm.data_pipeline.vocab import GeneVocab
from scmm.errors import ScmmError

VOCAB = GeneVocab({"A": 0, "B": 1, "C": 2, "D": 3})  # <pad> 4, <cls> 5, <eoc> 6 appended
COUNTS = sp.csr_matrix(np.array([[1.0, 0.0, 3.0, 0.0], [0.0, 2.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]))
GENES = np.array([0, 1, 2, 3])


GENES_WIDE = np.array([0, 1, 2, 3, 0, 1])  # six columns (genes repeat: only ids matter here)


def _encode(matrix=COUNTS, training=True, normalization="counts", rng=None, **enc):
    encoding = CellEncoding(**{"n_bins": 0, **enc})
    rng = rng if rng is not None else np.random.default_rng(0)
    genes = GENES if matrix.shape[1] == 4 else GENES_WIDE
    return encode_cells(matrix, genes, VOCAB, encoding, normalization=normalization, training=training, rng=rng)


def test_continuous_values_cls_and_padding_by_hand():
    batch = _encode()
    assert (VOCAB.pad_id, VOCAB.cls_id) == (4, 5)
    assert batch["gene_ids"].tolist() == [[5, 0, 2], [5, 1, 4], [5, 4, 4]]
    expect = [[0.0, np.log1p(1 / 4 * 1e4), np.log1p(3 / 4 * 1e4)], [0.0, np.log1p(1e4), -2.0], [0.0, -2.0, -2.0]]
    np.testing.assert_allclose(batch["values"].numpy(), expect, rtol=1e-6)
    assert batch["padding_mask"].tolist() == [[False, False, False], [False, False, True], [False, True, True]]


def test_log1p_input_is_used_as_given_and_explicit_zeros_are_not_genes():
    m = sp.csr_matrix((np.array([0.5, 0.0, 2.0]), np.array([0, 1, 3]), np.array([0, 3])), shape=(1, 4))
    batch = _encode(m, normalization="log1p", pad_value=-9.0)
    assert batch["gene_ids"].tolist() == [[5, 0, 3]]
    assert batch["values"].tolist() == [[0.0, 0.5, 2.0]]
    with pytest.raises(ValueError, match="normalization"):
        log1p_normalize(m, "cp10k")


def test_length_limit_in_training_and_none_at_inference():
    wide = sp.csr_matrix(np.arange(1, 5, dtype=float)[None].repeat(3, 0))
    trained = _encode(wide, training=True, max_len=3)
    assert trained["gene_ids"].shape == (3, 3) and not trained["padding_mask"].any()
    kept = trained["gene_ids"][:, 1:]
    assert (kept[:, :1] < kept[:, 1:]).all()  # the sample keeps column order
    assert _encode(wide, training=False, max_len=3)["gene_ids"].shape == (3, 5)  # every gene at inference
    assert _encode(wide, training=False, max_len=3, inference_max_len=2)["gene_ids"].shape == (3, 2)


def test_binned_values_and_per_cell_generators_make_results_independent_of_batching():
    rng = np.random.default_rng(3)
    m = sp.random(6, 4, density=0.9, random_state=1, data_rvs=lambda n: rng.integers(1, 9, n)).tocsr()
    rngs = [cell_rng(0, r) for r in range(6)]
    whole = _encode(m, n_bins=5, rng=rngs)
    values = whole["values"][~whole["padding_mask"]][1:]
    assert set(values[values != 0].tolist()) <= {1.0, 2.0, 3.0, 4.0}
    for r in range(6):  # the same cell, alone, with its own generator: the same row
        alone = _encode(m[r], n_bins=5, rng=[cell_rng(0, r)])
        n = alone["gene_ids"].shape[1]
        assert alone["gene_ids"][0].tolist() == whole["gene_ids"][r, :n].tolist()
        assert alone["values"][0].tolist() == whole["values"][r, :n].tolist()


def test_encoding_file_round_trip_and_errors(tmp_path):
    enc = CellEncoding(n_bins=21, max_len=300, pad_value=-3.0)
    enc.save(tmp_path)
    assert CellEncoding.load(tmp_path) == enc
    with pytest.raises(ScmmError, match="no cell_encoding.json"):
        CellEncoding.load(tmp_path / "missing")
    (tmp_path / "cell_encoding.json").write_text(json.dumps({"n_binz": 3}))
    with pytest.raises(ScmmError, match="encoding.n_binz"):
        CellEncoding.load(tmp_path)
    with pytest.raises(ValueError, match="pad_value and mask_value"):
        CellEncoding(pad_value=-1.0, mask_value=-1.0)


def test_loader_refuses_a_corpus_of_another_gene_vocabulary(small_corpus):
    from scmm.data_pipeline.loader import CorpusLoader, LoaderConfig
    shifted = GeneVocab({g: i + 1 for g, i in GeneVocab.load(small_corpus).token_to_id.items()})
    with pytest.raises(ScmmError, match="another gene vocabulary"):
        CorpusLoader(small_corpus, "train", LoaderConfig(), CellEncoding(), shifted)


def _digitize_definition(values: np.ndarray, n_bins: int, u: np.ndarray) -> np.ndarray:
    """Upstream scGPT's binning of one cell: np.quantile edges, the two np.digitize sides, ties spread by u."""
    edges = np.quantile(values, np.linspace(0, 1, n_bins - 1))
    left, right = np.digitize(values, edges), np.digitize(values, edges, right=True)
    return np.ceil(u * (right - left) + left)


@pytest.mark.parametrize("n_bins", [2, 5, 51])
def test_bin_rows_bins_every_row_as_upstream_bins_each_cell(n_bins):
    """One call over a batch with empty rows, single values, ties and wide rows equals the per-cell definition."""
    data = np.random.default_rng(n_bins)
    counts = [0, 1, 2, 7, 0, 50, 333, 3, 1]
    rows = [np.round(data.lognormal(size=c), int(data.integers(0, 3))) + 0.1 for c in counts]
    rows[7] = np.array([2.0, 2.0, 2.0])  # one value on every edge
    values = np.concatenate(rows)
    indptr = np.concatenate([[0], np.cumsum(counts)])
    u = data.random(values.size)
    expect = [_digitize_definition(r, n_bins, u[lo:hi]) for r, lo, hi in zip(rows, indptr[:-1], indptr[1:]) if len(r)]
    np.testing.assert_array_equal(bin_rows(values, indptr, n_bins, u), np.concatenate(expect))
    assert bin_rows(np.zeros(0), np.array([0, 0]), n_bins, np.zeros(0)).shape == (0,)


def test_pad_rows_by_hand():
    out = pad_rows(np.array([7, 8, 9]), np.array([1.0, 2.0, 3.0]), np.array([0, 2, 2, 3]), cls_id=5, pad_id=4,
                   pad_value=-2.0)
    assert out["gene_ids"].tolist() == [[5, 7, 8], [5, 4, 4], [5, 9, 4]]
    assert out["values"].tolist() == [[0.0, 1.0, 2.0], [0.0, -2.0, -2.0], [0.0, 3.0, -2.0]]
    assert out["padding_mask"].tolist() == [[False, False, False], [False, True, True], [False, False, True]]


def test_a_batch_generator_draws_binning_first_then_length_samples_in_row_order():
    """With one generator per batch, the binning draws of all cells come first, then the samples of long cells: the
    documented order that a resumed loader replays."""
    m = sp.csr_matrix(np.arange(1, 13, dtype=float).reshape(2, 6) ** 2)
    gen = np.random.default_rng(9)
    got = _encode(m, rng=np.random.default_rng(9), n_bins=5, max_len=4)
    data = log1p_normalize(m, "counts").data
    bins = bin_rows(data, np.array([0, 6, 12]), 5, gen.random(12))
    for r in range(2):
        keep = np.sort(gen.choice(6, 3, replace=False))
        assert got["gene_ids"][r, 1:].tolist() == GENES_WIDE[keep].tolist()
        assert got["values"][r, 1:].tolist() == bins[6 * r:6 * r + 6][keep].tolist()


def test_explicit_zeros_in_any_row_are_dropped_before_normalising():
    m = sp.csr_matrix((np.array([0.0, 2.0, 0.0, 1.0, 0.0]), np.array([0, 1, 0, 3, 2]), np.array([0, 2, 2, 4, 5])),
                      shape=(4, 4))
    out = log1p_normalize(m, "counts", target_sum=1.0)
    assert out.indptr.tolist() == [0, 1, 1, 2, 2] and out.indices.tolist() == [1, 3]
    np.testing.assert_allclose(out.data, np.log1p([1.0, 1.0]))
