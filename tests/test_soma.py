"""`scmm data build --soma URI`: a TileDB-SOMA experiment (the CELLxGENE Census format) gives the corpus the h5ad
it was written from gives (tiledbsoma.io.from_h5ad), with or without filters and for any --jobs."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import make_adata, run_cli
from scmm.data_pipeline.build import BuildConfig, build_corpus
from scmm.data_pipeline.store import Corpus

tiledbsoma_io = pytest.importorskip("tiledbsoma.io")

SOURCE_SPECIFIC = ("source_file",)  # the file name or the experiment's name


def _comparable(manifest: dict) -> dict:
    m = json.loads(json.dumps(manifest))
    for key in ("created", "soma"):
        m.pop(key, None)
    for f in m["gene_coverage"]["files"]:
        f.pop("file"), f.pop("element")
    for shard in m["shards"]:
        for key in SOURCE_SPECIFIC:
            shard["checksums"].pop(key)
    return m


def assert_same_corpus(a: Path, b: Path) -> None:
    ca, cb = Corpus(a), Corpus(b)
    assert _comparable(ca.manifest) == _comparable(cb.manifest)
    for entry in ca.shards():
        sa, sb = ca.read_shard(entry["name"]), cb.read_shard(entry["name"])
        assert (sa.matrix != sb.matrix).nnz == 0 and np.array_equal(sa.matrix.indptr, sb.matrix.indptr)
        for key in sa.obs:
            if key not in SOURCE_SPECIFIC:
                assert np.array_equal(sa.obs[key], sb.obs[key]), key


@pytest.fixture(scope="module")
def experiment(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("soma")
    adata = make_adata(n_cells=240, donors=6, seed=7)
    adata.obs["assay"] = np.where(np.arange(adata.n_obs) % 3 == 0, "10x 3' v3", "Smart-seq2")
    h5ad = tmp / "cells.h5ad"
    adata.write_h5ad(h5ad)
    uri = tiledbsoma_io.from_h5ad(str(tmp / "exp"), str(h5ad), "RNA")
    return h5ad, Path(uri)


def test_soma_build_equals_h5ad_build(experiment, tmp_path: Path):
    h5ad, uri = experiment
    opts = dict(shard_size=50, chunk_size=37, progress=False)
    build_corpus(BuildConfig(inputs=[h5ad], out=tmp_path / "h5ad", **opts))
    m = build_corpus(BuildConfig(inputs=[], soma=str(uri), out=tmp_path / "soma", **opts))
    assert m["soma"]["uri"] == str(uri) and m["n_cells"] > 200
    assert_same_corpus(tmp_path / "h5ad", tmp_path / "soma")
    build_corpus(BuildConfig(inputs=[], soma=str(uri), out=tmp_path / "soma2", jobs=2, **opts))
    assert_same_corpus(tmp_path / "soma", tmp_path / "soma2")


def test_soma_filters_equal_the_subset_h5ad(experiment, tmp_path: Path):
    import anndata as ad
    h5ad, uri = experiment
    adata = ad.read_h5ad(h5ad)
    donors = ["donor_0", "donor_2", "donor_3", "donor_5"]
    sub = adata[adata.obs["donor_id"].isin(donors).to_numpy(), adata.var["feature_name"] != "CD3D"].copy()
    sub.write_h5ad(tmp_path / "sub.h5ad")
    opts = dict(shard_size=40, chunk_size=29, progress=False)
    build_corpus(BuildConfig(inputs=[tmp_path / "sub.h5ad"], out=tmp_path / "h5ad", **opts))
    obs_filter = "donor_id in [" + ", ".join(f"'{d}'" for d in donors) + "]"
    build_corpus(BuildConfig(inputs=[], soma=str(uri), obs_filter=obs_filter, var_filter="feature_name != 'CD3D'",
                             out=tmp_path / "soma", **opts))
    assert_same_corpus(tmp_path / "h5ad", tmp_path / "soma")
    assert Corpus(tmp_path / "soma").n_cells == sub.n_obs


def test_soma_errors_are_one_line(experiment, tmp_path: Path):
    _, uri = experiment
    for args, word in ((["--soma", str(tmp_path / "nothing")], "--soma"),
                       (["--soma", str(uri), "--obs-filter", "donor_id === 'x' and"], "--obs-filter"),
                       (["--soma", str(uri), "--var-filter", "no_such_column == 1"], "--var-filter"),
                       (["--soma", str(uri), "--obs-filter", "donor_id == 'nobody'"], "0 cells")):
        r = run_cli("data", "build", *args, "--out", str(tmp_path / "c"), "--quiet")
        assert r.returncode == 2, r.stderr
        lines = r.stderr.strip().splitlines()
        assert lines[-1].startswith("error:") and word in lines[-1] and "Traceback" not in r.stderr, r.stderr
        assert not (tmp_path / "c").exists()
