"""Every input scale read right (data_pipeline/scale.py) and Ensembl-only genes (the offline gene table).

The same real cells (scanpy's pbmc68k_reduced, counts rebuilt from ``.raw.X``) are written as counts, CP10k, CPM,
TPM-like values (counts over per-gene length factors, renormalised to 1e6), log1p(CP10k) and log2(CPM + 1); each
must be detected as what it is, and give the model input of the counts:

* encoded values (continuous, ``n_bins=0``): within 1e-4 of the counts' (float32 storage of the logs, then expm1:
  the measured worst case is about 1e-6);
* embeddings of a small untrained model: within 1e-4 (fp32);
* TPM-like: only the decision is tested: per-gene length factors do not cancel in the per-cell renormalisation,
  so its model input differs from the counts' by construction.
"""
from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from conftest import run_cli, save_tiny_stage1
from scmm.data_pipeline.encoding import CellEncoding
from scmm.data_pipeline.reader import detect_scale, iter_batches, open_input, plan_genes
from scmm.data_pipeline.scale import ScaleDecision, decide, sample_ranges, to_linear
from scmm.data_pipeline.vocab import GeneVocab, ensembl_symbol_table, map_genes
from scmm.errors import ScmmError

VOCAB = GeneVocab.load()
ATOL = 1e-4


@pytest.fixture(scope="module")
def pbmc() -> ad.AnnData:
    from scmm.data_pipeline.demo_data import pbmc_demo_adata
    return pbmc_demo_adata()


def _scaled(counts: sp.csr_matrix, how: str) -> sp.csr_matrix:
    x = np.asarray(counts.toarray(), dtype=np.float64)
    total = x.sum(1, keepdims=True)
    if how == "counts":
        out = x
    elif how == "cp10k":
        out = x / total * 1e4
    elif how == "cpm":
        out = x / total * 1e6
    elif how == "tpm":
        length = np.random.default_rng(0).uniform(0.5, 5.0, x.shape[1])  # per-gene length factors (kb)
        out = x / length
        out = out / out.sum(1, keepdims=True) * 1e6
    elif how == "log1p_cp10k":
        out = np.log1p(x / total * 1e4)
    elif how == "log2_cpm":
        out = np.log2(x / total * 1e6 + 1)
    else:
        raise ValueError(how)
    return sp.csr_matrix(out.astype(np.float32))


TRUTH = {"counts": "counts", "cp10k": "normalized", "cpm": "normalized", "tpm": "normalized",
         "log1p_cp10k": "log1p", "log2_cpm": "log2p1"}


@pytest.fixture(scope="module")
def variants(pbmc, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("scales")
    out = {}
    for how in TRUTH:
        a = pbmc.copy()
        a.X = _scaled(pbmc.X, how)
        out[how] = root / f"{how}.h5ad"
        a.write_h5ad(out[how])
    return out


@pytest.mark.parametrize("how", list(TRUTH))
def test_each_scale_is_detected_as_its_truth(variants, how: str):
    decision = detect_scale(open_input(variants[how]))
    assert decision.scale == TRUTH[how], decision.describe()
    assert decision.source == "detected" and decision.evidence["cells_sampled"] == 700
    assert decision.describe().startswith(f"values read as {TRUTH[how]} (700 cells sampled")


def test_scanpys_own_log1p_values_rounded_to_3_decimals_are_log1p(pbmc):
    import scanpy as sc
    raw = sc.datasets.pbmc68k_reduced().raw.X  # log1p(CP10k over the original genes), 3 decimals
    assert decide(sp.csr_matrix(raw), "raw").scale == "log1p"


def _encoded(path: Path, scale: ScaleDecision | None = None) -> list[np.ndarray]:
    source = open_input(path)
    plan = plan_genes(source.var, VOCAB, min_coverage=0.0)
    scale = scale or detect_scale(source)
    values = {}
    for rows, batch in iter_batches(source, plan, scale, CellEncoding(n_bins=0), VOCAB, chunk_size=256,
                                    batch_size=64):
        for r, v, m in zip(rows, batch["values"].numpy(), batch["padding_mask"].numpy()):
            values[int(r)] = v[~m]
    return [values[r] for r in range(len(values))]


@pytest.mark.parametrize("how", ["cp10k", "cpm", "log1p_cp10k", "log2_cpm"])
def test_every_scale_gives_the_model_input_of_the_counts(variants, how: str):
    ref = _encoded(variants["counts"])
    got = _encoded(variants[how])
    assert len(ref) == len(got) == 700
    worst = max(float(np.abs(a - b).max()) for a, b in zip(ref, got))
    assert worst < ATOL


def test_the_override_wins_and_a_wrong_one_changes_the_input(variants):
    assert detect_scale(open_input(variants["cp10k"]), "log1p").source == "given"
    ref = _encoded(variants["counts"])
    # log2(CPM + 1) read as log1p: a different input, as asked
    wrong = _encoded(variants["log2_cpm"], detect_scale(open_input(variants["log2_cpm"]), "log1p"))
    assert max(float(np.abs(a - b).max()) for a, b in zip(ref, wrong)) > 0.1
    # counts read as log1p undo beyond float32: an error, not infinities
    with pytest.raises(ScmmError, match="too large for float32"):
        _encoded(variants["counts"], detect_scale(open_input(variants["counts"]), "log1p"))
    with pytest.raises(ScmmError, match="--input-scale must be"):
        detect_scale(open_input(variants["counts"]), "cp10k")


def test_the_sample_is_bounded_and_spread():
    assert sample_ranges(500) == [(0, 500)]
    ranges = sample_ranges(1_000_000)
    assert len(ranges) == 8 and sum(b - a for a, b in ranges) == 2000
    assert ranges[0][0] == 0 and ranges[-1][1] == 1_000_000


def test_ambiguous_and_contradicted_inputs_are_errors(pbmc):
    counts = pbmc.X
    rng = np.random.default_rng(1)
    # integer CPM: totals all at 1e6
    cpm = _scaled(counts, "cpm")
    cpm.data = np.round(cpm.data)
    with pytest.raises(ScmmError, match=r"sums to 1e\+06.*--input-scale \{counts,normalized,log1p,log2p1\}"):
        decide(cpm, "x")
    # ambient-corrected counts: fractional, no lattice, no constant totals; above every log's range they can only
    # be linear (next test), but scaled into a log's range nothing tells them from a log of such values
    soup = counts.copy().astype(np.float64)
    soup.data = np.maximum(soup.data - rng.uniform(0, 0.9, soup.data.size), 0.01)
    assert decide(soup, "x").scale == "normalized" and soup.data.max() > 30
    low = soup.copy()
    low.data = low.data / low.data.max() * 15.0
    with pytest.raises(ScmmError, match="fit no linear normalisation nor log of one.*--input-scale"):
        decide(low, "x")
    # values the sample did not see must agree with the decision
    d = decide(counts, "x")
    with pytest.raises(ScmmError, match="mixes scales; give --input-scale"):
        to_linear(sp.csr_matrix(soup, dtype=np.float32), d, "rows from 5000")
    d = decide(_scaled(counts, "log1p_cp10k"), "x")
    with pytest.raises(ScmmError, match="beyond any log1p value"):
        to_linear(sp.csr_matrix(counts, dtype=np.float32), d, "rows from 5000")
    # a given scale is not second-guessed: counts given as normalized read as they are
    given = ScaleDecision("normalized", source="given")
    soup32 = sp.csr_matrix(soup, dtype=np.float32)
    np.testing.assert_array_equal(to_linear(soup32, given, "x").toarray(), soup32.toarray())


def test_linear_values_beyond_every_log_fit_no_lattice_yet_read_as_linear(pbmc, tmp_path: Path):
    """TPM of a gene subset (totals not constant, no count lattice): non-integers whose maximum exceeds every
    log's range can only be linear, and are read so with that evidence; the file through the reader too."""
    tpm = _scaled(pbmc.X, "tpm")
    genes = np.sort(np.random.default_rng(3).permutation(tpm.shape[1])[: tpm.shape[1] // 2])
    subset = sp.csr_matrix(tpm[:, genes])
    sums = np.asarray(subset.sum(axis=1)).ravel()
    assert (sums.max() - sums.min()) / np.median(sums) > 0.5 and subset.data.max() > 30  # no constant totals
    d = decide(subset, "tpm_subset.h5ad")
    assert d.scale == "normalized" and d.source == "detected" and d.evidence["rule"] == "beyond every log"
    assert not d.evidence["candidates"]["normalized"]["consistent"] and set(d.evidence["candidates"]) == {"normalized"}
    assert "above every log's range" in d.describe() and "TPM of a gene subset" in d.describe()
    np.testing.assert_array_equal(to_linear(subset, d, "x").toarray(), subset.toarray())  # kept as they are
    a = pbmc[:, genes].copy()
    a.X = subset
    a.write_h5ad(tmp_path / "tpm_subset.h5ad")
    read = detect_scale(open_input(tmp_path / "tpm_subset.h5ad"))
    assert read.scale == "normalized" and read.evidence["rule"] == "beyond every log"
    # the same file at a log's scale stays ambiguous (nothing in the values says linear)
    low = subset.copy()
    low.data = low.data / low.data.max() * 15.0
    with pytest.raises(ScmmError, match="--input-scale"):
        decide(low, "x")


def test_ambiguous_input_through_the_cli_and_the_override(pbmc, tmp_path: Path):
    a = pbmc[:200].copy()
    soup = a.X.copy().astype(np.float64)
    soup.data = np.maximum(soup.data - np.random.default_rng(2).uniform(0, 0.9, soup.data.size), 0.01)
    soup.data = soup.data / soup.data.max() * 15.0  # within a log's range: truly ambiguous
    a.X = sp.csr_matrix(soup, dtype=np.float32)
    a.write_h5ad(tmp_path / "soup.h5ad")
    r = run_cli("data", "build", str(tmp_path / "soup.h5ad"), "--out", str(tmp_path / "c"), "--quiet")
    assert r.returncode == 2 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--input-scale" in lines[0], r.stderr
    assert not (tmp_path / "c").exists() and list(tmp_path.iterdir()) == [tmp_path / "soup.h5ad"]
    r = run_cli("data", "build", str(tmp_path / "soup.h5ad"), "--out", str(tmp_path / "c"), "--quiet",
                "--input-scale", "normalized")
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert m["normalization"] == "normalized"
    assert m["gene_coverage"]["files"][0]["input_scale"]["source"] == "given"


# --- the corpus build and inference ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def built(variants, tmp_path_factory) -> dict[str, Path]:
    from scmm.data_pipeline.build import BuildConfig, build_corpus
    root = tmp_path_factory.mktemp("built")
    out = {}
    for how in ("counts", "log1p_cp10k", "log2_cpm"):
        out[how] = root / how
        build_corpus(BuildConfig(inputs=[variants[how]], out=out[how], shard_size=256, progress=False))
    return out


def _loader_values(corpus: Path) -> dict[str, np.ndarray]:
    from scmm.data_pipeline.encoding import encode_cells
    from scmm.data_pipeline.store import Corpus
    c = Corpus(corpus)
    out = {}
    for e in c.shards():
        shard = c.read_shard(e["name"], columns=("cell_id",))
        batch = encode_cells(shard.matrix, c.gene_vocab_ids, VOCAB, CellEncoding(n_bins=0),
                             normalization=c.manifest["normalization"], training=False,
                             rng=np.random.default_rng(0))
        for cell, v, m in zip(shard.obs["cell_id"], batch["values"].numpy(), batch["padding_mask"].numpy()):
            out[cell] = v[~m]
    return out


def test_the_build_records_each_scale_and_stores_linear_values(built):
    manifests = {k: json.loads((p / "manifest.json").read_text()) for k, p in built.items()}
    assert manifests["counts"]["normalization"] == "counts"
    for how in ("log1p_cp10k", "log2_cpm"):
        m = manifests[how]
        assert m["normalization"] == "normalized"
        assert m["gene_coverage"]["files"][0]["input_scale"]["scale"] == TRUTH[how]
    ref = _loader_values(built["counts"])
    for how in ("log1p_cp10k", "log2_cpm"):
        got = _loader_values(built[how])
        assert got.keys() == ref.keys()
        assert max(float(np.abs(ref[k] - got[k]).max()) for k in ref) < ATOL


@pytest.fixture(scope="module")
def tiny_model(built, tmp_path_factory):
    from scmm.api import load_model
    return load_model(save_tiny_stage1(built["counts"], tmp_path_factory.mktemp("m") / "model"))


def test_embeddings_agree_across_scales(tiny_model, variants):
    from scmm.api import embed
    ref = embed(variants["counts"], tiny_model, precision="fp32").obsm["X_scmm"]
    for how in ("cp10k", "cpm", "log1p_cp10k", "log2_cpm"):
        got = embed(variants[how], tiny_model, precision="fp32").obsm["X_scmm"]
        np.testing.assert_allclose(got, ref, atol=ATOL, err_msg=how)


# --- Ensembl-only genes -----------------------------------------------------------------------------------
def _ensembl_only(pbmc) -> tuple[ad.AnnData, ad.AnnData]:
    """(symbols, Ensembl IDs only) versions of the same cells over the genes the offline table names uniquely."""
    table = ensembl_symbol_table()
    assert table is not None, "celltypist (the Ensembl -> symbol table) is not installed: make setup"
    ids = pd.Series(list(table.symbols.keys()), index=list(table.symbols.values()))
    ids = ids[~ids.index.duplicated(keep=False)]
    keep = np.array([g in ids.index for g in pbmc.var_names])
    sym = pbmc[:, keep].copy()
    ens = sym.copy()
    ens.var = pd.DataFrame(index=[f"{ids[g]}.{i % 7 + 1}" for i, g in enumerate(sym.var_names)])  # versioned IDs
    return sym, ens


def test_ensembl_ids_map_through_the_table_like_symbols(pbmc):
    sym, ens = _ensembl_only(pbmc)
    assert "feature_name" not in ens.var and sym.n_vars >= 700  # of 765
    a, b = map_genes(sym.var, VOCAB), map_genes(ens.var, VOCAB)
    np.testing.assert_array_equal(a.gene_ids, b.gene_ids)
    assert b.column == "var_names" and b.via_table == b.n_mapped > 0.9 * ens.n_vars
    assert b.report()["id_table"]["version"] == "1.7.1" and a.id_table is None


def test_ensembl_only_input_at_build_and_inference(pbmc, tiny_model, tmp_path: Path):
    from scmm.api import embed
    from scmm.data_pipeline.build import BuildConfig, build_corpus
    sym, ens = _ensembl_only(pbmc)
    sym.write_h5ad(tmp_path / "sym.h5ad")
    ens.write_h5ad(tmp_path / "ens.h5ad")
    m_sym = build_corpus(BuildConfig(inputs=[tmp_path / "sym.h5ad"], out=tmp_path / "cs", progress=False))
    m_ens = build_corpus(BuildConfig(inputs=[tmp_path / "ens.h5ad"], out=tmp_path / "ce", progress=False))
    assert m_sym["gene_id_table"] is None
    assert m_ens["gene_id_table"]["package"] == "celltypist" and m_ens["gene_id_table"]["version"] == "1.7.1"
    assert m_ens["gene_id_table"]["file"] == "data/samples/GENCODEv44_Gene_id2name.csv"
    assert m_ens["n_genes"] == m_sym["n_genes"] and m_ens["nnz"] == m_sym["nnz"]
    assert _loader_values(tmp_path / "ce").keys() == _loader_values(tmp_path / "cs").keys()
    a = embed(sym, tiny_model, precision="fp32").obsm["X_scmm"]
    b = embed(tmp_path / "ens.h5ad", tiny_model, precision="fp32").obsm["X_scmm"]
    np.testing.assert_allclose(a, b, atol=1e-6)
