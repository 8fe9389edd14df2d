"""Property-based tests (hypothesis) of the two doors user data comes in by: the h5ad reader and the YAML config
loader. Whatever the shape, dtype, sparse format, values or YAML tree, the result is either valid (finite model
inputs; a config that validates) or one ScmmError, never another exception and never a NaN.

The examples are derandomised (the same in every CI run; profile ``ci``, see conftest.py); a wider search:
``HYPOTHESIS_PROFILE=thorough pytest tests/test_properties.py``."""
from __future__ import annotations

import math
import tempfile
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import yaml
from hypothesis import given
from hypothesis import strategies as st

from conftest import GENES
from scmm.config import load_yaml
from scmm.data_pipeline.encoding import CellEncoding
from scmm.data_pipeline.reader import detect_scale, iter_batches, open_input, plan_genes
from scmm.data_pipeline.scale import SCALES
from scmm.data_pipeline.vocab import GeneVocab
from scmm.errors import ScmmError
from scmm.pretrain.train import Stage1Config

DTYPES = ["float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "uint16"]
FORMATS = ["csr", "csc", "dense"]
RANGES = {  # value scales a matrix is drawn at: counts, log1p values, extremes, negatives
    "counts": (0, 50), "log1p": (0, 9.5), "tiny": (0, 1e-6), "huge": (0, 1e300), "float32_edge": (0, 3e38),
    "negative": (-5, 5), "large_counts": (0, 2_000_000),
}


VOCAB = GeneVocab.load()


@st.composite
def matrices(draw):
    n_cells = draw(st.integers(1, 12))
    n_genes = draw(st.integers(1, len(GENES)))
    dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    scale = draw(st.sampled_from(sorted(RANGES)))
    density = draw(st.sampled_from([0.0, 0.2, 0.7, 1.0]))
    integral = draw(st.booleans())
    special = draw(st.sampled_from(["none", "nan", "inf", "zero_row"]))
    seed = draw(st.integers(0, 2 ** 16))
    fmt = "dense" if dtype == np.float16 else draw(st.sampled_from(FORMATS))  # scipy.sparse has no float16
    return n_cells, n_genes, dtype, scale, density, integral, special, seed, fmt


def _build(n_cells, n_genes, dtype, scale, density, integral, special, seed, fmt) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    low, high = RANGES[scale]
    x = rng.uniform(low, high, size=(n_cells, n_genes)) * (rng.random((n_cells, n_genes)) < density)
    if integral:
        x = np.round(x)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        x = np.clip(np.round(x), info.min, info.max)
    elif dtype.kind == "f" and special in ("nan", "inf"):
        x[rng.integers(n_cells), rng.integers(n_genes)] = np.nan if special == "nan" else np.inf
    if special == "zero_row":
        x[rng.integers(n_cells)] = 0
    with np.errstate(over="ignore", invalid="ignore"):
        x = x.astype(dtype)
    matrix = {"csr": sp.csr_matrix, "csc": sp.csc_matrix, "dense": np.asarray}[fmt](x)
    var = pd.DataFrame({"feature_name": GENES[:n_genes]}, index=[f"ENSG9{i:010d}" for i in range(n_genes)])
    return ad.AnnData(X=matrix, obs=pd.DataFrame(index=[f"c{i}" for i in range(n_cells)]), var=var)


MAX_MODEL_VALUE = float(np.log1p(1e4))  # log1p(x / cell total * 1e4) of any linear values (continuous encoding)


@given(spec=matrices(), from_file=st.booleans(), input_scale=st.sampled_from(["auto", *SCALES]))
def test_the_reader_gives_finite_inputs_or_one_clear_error(spec, from_file: bool, input_scale: str):
    vocab = VOCAB
    adata = _build(*spec)
    with tempfile.TemporaryDirectory() as tmp:
        data = adata
        if from_file:
            data = Path(tmp) / "x.h5ad"
            adata.write_h5ad(data)
        try:
            source = open_input(data)
            plan = plan_genes(source.var, vocab, min_coverage=0.0)
            scale = detect_scale(source, input_scale)
            batches = list(iter_batches(source, plan, scale, CellEncoding(n_bins=0), vocab, chunk_size=5,
                                        batch_size=4))
        except ScmmError as exc:
            assert str(exc) and "\n" not in str(exc)
            return
    rows = np.concatenate([r for r, _ in batches])
    assert sorted(rows.tolist()) == list(range(adata.n_obs))
    for _, batch in batches:
        values = batch["values"][~batch["padding_mask"]].numpy()
        assert np.isfinite(values).all() and (values >= 0).all() and (values <= MAX_MODEL_VALUE + 1e-5).all()
    x = adata.X.toarray() if sp.issparse(adata.X) else np.asarray(adata.X)
    assert np.isfinite(x.astype(np.float64)).all() and (x >= 0).all()  # else it had to be an error


# --- the config loader -------------------------------------------------------------------------------------
def _valid() -> dict:
    return {"corpus": "runs/demo/corpus", "out": "runs/x",
            "model": {"cell_tower": {"d_model": 32, "nhead": 4, "d_hid": 64, "nlayers": 2},
                      "qformer": {"num_queries": 4, "num_layers": 1}},
            "encoding": {"n_bins": 51, "max_len": 64}, "loader": {"batch_size": 8},
            "train": {"steps": 10, "lr": 1e-4, "betas": [0.9, 0.98], "precision": "fp32"}}


def _paths(tree: dict, prefix: tuple = ()) -> list[tuple]:
    out = []
    for key, value in tree.items():
        out.append((*prefix, key))
        if isinstance(value, dict):
            out += _paths(value, (*prefix, key))
    return out


SCALARS = (st.none() | st.booleans() | st.integers(-10 ** 6, 10 ** 6) | st.floats(allow_nan=True)
           | st.text(max_size=12) | st.sampled_from(["3e-4", "1e-3", "cosine", "bf16", ".nan", ""]))
TREES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3)
                     | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)


def _load(tree) -> Stage1Config | None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.yaml"
        path.write_text(yaml.safe_dump(tree))
        try:
            return load_yaml(path, Stage1Config)
        except ScmmError as exc:
            assert str(exc) and "\n" not in str(exc)
            return None


def _finite_numbers(obj) -> bool:
    if isinstance(obj, float):
        return math.isfinite(obj)
    if isinstance(obj, (list, tuple)):
        return all(map(_finite_numbers, obj))
    if hasattr(obj, "__dataclass_fields__"):
        return all(_finite_numbers(getattr(obj, f)) for f in obj.__dataclass_fields__)
    return True


@given(data=st.data())
def test_a_changed_config_value_validates_or_is_one_error(data):
    tree = _valid()
    path = data.draw(st.sampled_from(_paths(tree)))
    node = tree
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = data.draw(TREES)
    cfg = _load(tree)
    assert cfg is None or _finite_numbers(cfg)


@given(tree=TREES)
def test_any_yaml_tree_validates_or_is_one_error(tree):
    cfg = _load(tree)
    assert cfg is None or _finite_numbers(cfg)


def test_the_valid_config_loads():
    cfg = _load(_valid())
    assert cfg is not None and cfg.train.betas == (0.9, 0.98) and cfg.model.cell_tower.d_model == 32


def _float_fields(cls, prefix: tuple = ()) -> list[tuple]:
    import dataclasses
    import typing
    out = []
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            out += _float_fields(tp, (*prefix, f.name))
        elif tp is float or tp == (float | None):
            out.append((*prefix, f.name))
    return out


def test_no_float_key_takes_nan_or_infinity():
    keys = _float_fields(Stage1Config)
    assert ("train", "lr") in keys and ("encoding", "target_sum") in keys and len(keys) >= 8
    for key in keys:
        for value in (float("nan"), float("inf"), "-inf"):
            tree = _valid()
            node = tree
            for part in key[:-1]:
                node = node.setdefault(part, {})
            node[key[-1]] = value
            assert _load(tree) is None, (key, value)
