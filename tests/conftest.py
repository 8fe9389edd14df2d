"""Shared fixtures: small CELLxGENE-schema h5ad files and corpora built from them."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from hypothesis import settings

settings.register_profile("ci", max_examples=100, deadline=None, derandomize=True, database=None)
settings.register_profile("thorough", max_examples=3000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# `make test` runs two workers, one file each at a time (pytest-xdist --dist loadfile --no-loadscope-reorder), in
# collection order: the files that take longest (measured: test durations of the full suite) go first, so that
# neither worker is left alone on a long file at the end
LONGEST_FILES_FIRST = ("test_inference.py", "test_pretrain.py", "test_workflow_slurm.py", "test_stage2.py",
                       "test_workflow.py", "test_kill_resume.py", "test_explore_api.py", "test_stop_signal.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's tests keep their order


@pytest.fixture(scope="module", autouse=True)
def _free_module_folders(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """Remove the folders a file's module fixtures made once the file is done, unless one of its tests failed.

    Without it they stay until the session ends (pytest's own retention only frees function `tmp_path`s), and the
    suite's checkpoints outgrow a shared disk. Session fixtures' folders are kept: they are named in SESSION_FOLDERS.
    """
    root = tmp_path_factory.getbasetemp()
    before, failed = set(root.iterdir()), request.session.testsfailed
    yield
    if request.session.testsfailed > failed:
        return
    for folder in set(root.iterdir()) - before - SESSION_FOLDERS:
        shutil.rmtree(folder, ignore_errors=True)


SESSION_FOLDERS: set[Path] = set()

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

GENES = ["CD3D", "CD3E", "CD8A", "CD4", "MS4A1", "CD79A", "NKG7", "GNLY", "LYZ", "CD14", "FCGR3A", "PPBP",
         "HBB", "IL7R", "CCR7", "S100A8", "S100A9", "FCER1A", "CST3", "GZMB"]
CELL_TYPES = ["CL:0000084", "CL:0000236", "CL:0000623", "CL:0001054"]  # T, B, NK, CD14 monocyte


def make_adata(n_cells: int = 120, donors: int = 6, seed: int = 0, genes: list[str] = GENES) -> ad.AnnData:
    """Counts with a marker program per cell type, CELLxGENE obs columns, Ensembl-like index + feature_name."""
    rng = np.random.default_rng(seed)
    types = np.array(CELL_TYPES)[np.arange(n_cells) % len(CELL_TYPES)]
    base = rng.gamma(1.0, 1.0, size=(len(CELL_TYPES), len(genes)))
    for t in range(len(CELL_TYPES)):
        base[t, (np.arange(3) + 4 * t) % len(genes)] += 8.0
    lam = base[[CELL_TYPES.index(t) for t in types]]
    counts = rng.poisson(lam).astype(np.float32)
    counts[:, 0] += 1  # no empty cells
    obs = pd.DataFrame({
        "cell_type_ontology_term_id": pd.Categorical(types),
        "tissue_ontology_term_id": "UBERON:0000178",
        "disease_ontology_term_id": "PATO:0000461",
        "donor_id": pd.Categorical([f"donor_{i % donors}" for i in range(n_cells)]),
        "dataset_id": "ds1",
        "sex": "female",
    }, index=[f"cell_{i}" for i in range(n_cells)])
    var = pd.DataFrame({"feature_name": genes}, index=[f"ENSG9{i:010d}" for i in range(len(genes))])
    return ad.AnnData(X=sp.csr_matrix(counts), obs=obs, var=var)


@pytest.fixture
def h5ad_path(tmp_path: Path) -> Path:
    path = tmp_path / "small.h5ad"
    make_adata().write_h5ad(path)
    return path


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    """A corpus of 400 cells in shards of 16 (many shards, for loader tests)."""
    from scmm.data_pipeline.build import BuildConfig, build_corpus
    tmp = tmp_path_factory.mktemp("corpus")
    SESSION_FOLDERS.add(tmp)
    path = tmp / "in.h5ad"
    make_adata(n_cells=400, donors=10).write_h5ad(path)
    build_corpus(BuildConfig(inputs=[path], out=tmp / "corpus", shard_size=16, chunk_size=50, progress=False))
    return tmp / "corpus"


def split_cell_ids(corpus: Path, split: str = "train") -> list[str]:
    """The cell IDs of one split of a corpus, in shard order."""
    from scmm.data_pipeline.store import Corpus
    c = Corpus(corpus)
    return [i for e in c.shards(split) for i in c.read_shard(e["name"], columns=("cell_id",)).obs["cell_id"]]


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run `scmm ...` in a subprocess, as a user would."""
    return subprocess.run([sys.executable, "-m", "scmm.cli", *args], capture_output=True, text=True, cwd=cwd)


def save_tiny_stage1(corpus: Path, folder: Path, d_model: int = 16, num_queries: int = 2, embed_dim: int = 16,
                     corpus_facts: bool = False, **encoding) -> Path:
    """An untrained but complete stage-1 model folder over ``corpus``'s gene vocabulary (continuous values);
    ``corpus_facts``: with the corpus's gene panel and labels in it, as the trainer writes them."""
    import torch

    from scmm.data_pipeline.encoding import CellEncoding
    from scmm.data_pipeline.store import Corpus
    from scmm.data_pipeline.vocab import GeneVocab
    from scmm.eval.annotate import corpus_label_texts
    from scmm.model.aligner import AlignerConfig, CellTextAligner
    from scmm.model.cell_tower import CellTowerConfig
    from scmm.model.qformer import QFormerConfig
    from scmm.model.text_tower import TextTowerConfig
    torch.manual_seed(0)
    cfg = AlignerConfig(cell_tower=CellTowerConfig(d_model=d_model, nhead=2, d_hid=2 * d_model, nlayers=1),
                        text_tower=TextTowerConfig(freeze=True, max_length=64),
                        qformer=QFormerConfig(num_queries=num_queries, num_layers=1, embed_dim=embed_dim))
    model = CellTextAligner(cfg, GeneVocab.load(corpus), CellEncoding(**{"n_bins": 0, "max_len": 256, **encoding}))
    model.set_text_center(corpus_label_texts(Corpus(corpus)))
    model.save_pretrained(folder, **({"corpus": Corpus(corpus)} if corpus_facts else {}))
    return folder


ROOT = Path(__file__).resolve().parents[1]


def launch_ranks(script: str, config: Path, nproc: int, *extra: str, zero: int = 2, fault: str | None = None,
                 check: bool = True, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run a training script (``pretrain/train.py``, ``finetune/train.py``, ``tests/faults.py`` with ``fault`` as
    its SCMM_FAULT and ``env`` added) on ``nproc`` CPU ranks with torchrun; ``check``: the launch must succeed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu",
           "TORCH_EXTENSIONS_DIR": str(ROOT / ".cache" / "torch_extensions"), "TOKENIZERS_PARALLELISM": "false",
           **({"SCMM_FAULT": fault} if fault else {}), **(env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(ROOT / script), "--config", str(config),
           "--deepspeed_config", str(ROOT / "configs" / "deepspeed" / f"zero{zero}.json"), *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    if check:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return r


def read_metrics(out: Path) -> list[dict]:
    """The lines of a run's ``metrics.jsonl``."""
    import json
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
