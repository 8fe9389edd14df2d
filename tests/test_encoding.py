"""CellEncoding and encode_cells: exact values on hand-computed cells, the length policy, seeding, the saved file."""
from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.sparse as sp

from scmm.data_pipeline.encoding import CellEncoding, cell_rng, encode_cells, log1p_normalize
from scmm.data_pipeline.vocab import GeneVocab
from scmm.errors import ScmmError

VOCAB = GeneVocab({"A": 0, "B": 1, "C": 2, "D": 3})  # <pad> 4, <cls> 5, <eoc> 6 appended
COUNTS = sp.csr_matrix(np.array([[1.0, 0.0, 3.0, 0.0], [0.0, 2.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]))
GENES = np.array([0, 1, 2, 3])


def _encode(matrix=COUNTS, training=True, normalization="counts", rng=None, **enc):
    encoding = CellEncoding(**{"n_bins": 0, **enc})
    rng = rng if rng is not None else np.random.default_rng(0)
    return encode_cells(matrix, GENES, VOCAB, encoding, normalization=normalization, training=training, rng=rng)


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
