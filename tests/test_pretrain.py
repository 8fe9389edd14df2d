"""Stage-1 training under real DeepSpeed engines on CPU: 2 ranks (gloo), ZeRO-2 and ZeRO-3, resume, export."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import launch_ranks, read_metrics, split_cell_ids


def _config(tmp_path: Path, corpus: Path, out: str, steps: int, **train) -> Path:
    cfg = {
        "name": "test", "corpus": str(corpus), "out": str(tmp_path / out), "seed": 0,
        "model": {"cell_tower": {"d_model": 32, "nhead": 2, "d_hid": 64, "nlayers": 2, "dropout": 0.1},
                  "text_tower": {"max_length": 64, "freeze": True},
                  "qformer": {"num_queries": 4, "num_layers": 1, "embed_dim": 32},
                  "loss": {"matching": 0.5, "matching_max_length": 32}},
        "encoding": {"max_len": 16, "n_bins": 0},
        "loader": {"batch_size": 8, "shuffle_buffer": 64},
        "train": {"steps": steps, "lr": 2e-3, "warmup_steps": 3, "log_every": 1, "save_every": 3,
                  "precision": "fp32", **train},
    }
    path = tmp_path / f"{out}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _launch(config: Path, nproc: int, *extra: str, zero: int = 2) -> subprocess.CompletedProcess:
    return launch_ranks("pretrain/train.py", config, nproc, *extra, zero=zero)


@pytest.mark.slow
@pytest.mark.parametrize("zero", [2, 3])
def test_two_ranks_loss_goes_down_and_model_exports(tmp_path: Path, small_corpus: Path, zero: int):
    config = _config(tmp_path, small_corpus, f"z{zero}", steps=12)
    _launch(config, 2, zero=zero)
    rows = read_metrics(tmp_path / f"z{zero}")
    assert [r["step"] for r in rows] == list(range(1, 13))
    first, last = np.mean([r["loss"] for r in rows[:3]]), np.mean([r["loss"] for r in rows[-3:]])
    assert last < 0.8 * first, (first, last)
    assert all(np.isfinite(r[k]) for r in rows for k in ("contrastive", "matching", "reconstruction"))
    lrs = [r["lr"] for r in rows]
    # transformers' linear warmup from 0 over 3 steps, then the cosine decay
    assert lrs[:4] == pytest.approx([0.0, 2e-3 / 3, 4e-3 / 3, 2e-3]) and lrs[-1] < lrs[4] < lrs[3]
    # the exported folder loads without DeepSpeed and embeds cells
    from scmm.model.aligner import CellTextAligner
    model = CellTextAligner.from_pretrained(tmp_path / f"z{zero}" / "model")
    batch = {"gene_ids": torch.tensor([[model.vocab.cls_id, model.vocab.token_to_id["CD3D"]]]),
             "values": torch.tensor([[0.0, 2.0]]),
             "padding_mask": torch.zeros(1, 2, dtype=torch.bool)}
    feats = model.cell_features(batch["gene_ids"], batch["values"], batch["padding_mask"])
    assert feats.shape == (1, 32) and torch.allclose(feats.norm(dim=-1), torch.ones(1), atol=1e-5)
    summary = json.loads((tmp_path / f"z{zero}" / "model" / "train_summary.json").read_text())
    assert 0.0 <= summary["val_zero_shot_accuracy"] <= 1.0
    # self-contained: the corpus's gene panel and labels are in the folder (nothing is looked up outside it)
    from scmm.data_pipeline.store import Corpus
    from scmm.model.folders import load_model
    opened = load_model(tmp_path / f"z{zero}" / "model")
    assert opened.panel_vocab_ids.tolist() == [int(i) for i in Corpus(small_corpus).gene_vocab_ids]
    assert {r["key"] for r in opened.labels} == set(Corpus(small_corpus).manifest["cell_types"])


@pytest.mark.slow
@pytest.mark.parametrize("before, after, zero", [(2, 1, 2), (1, 2, 2), (2, 1, 0), (2, 1, 3)])
def test_resume_on_another_number_of_ranks(tmp_path: Path, small_corpus: Path, before: int, after: int, zero: int):
    """A run checkpointed on `before` ranks continues on `after`: the engine as it was (every trained parameter's
    fp32 weights and AdamW moments; under ZeRO through DeepSpeed's universal checkpoint), the loader re-sharded
    (over epoch 0 every train cell delivered exactly once), each step logged once."""
    config = _config(tmp_path, small_corpus, "run", steps=1)
    cfg = yaml.safe_load(config.read_text())
    cfg["loader"].update(drop_last=False, even_ranks=False)  # an epoch is then exactly the split
    train = split_cell_ids(small_corpus)
    stop, batch = 3, cfg["loader"]["batch_size"]
    cfg["train"].update(steps=stop + -(-(len(train) - stop * batch * before) // (batch * after)) + 2, save_every=100)
    config.write_text(yaml.safe_dump(cfg))
    env = {"SCMM_CELL_LOG": str(tmp_path / "cells"), "SCMM_DUMP": str(tmp_path / "state")}
    launch_ranks("tests/faults.py", config, before, "--stop-at", str(stop), zero=zero, env=env)
    resumed = launch_ranks("tests/faults.py", config, after, "--resume", zero=zero, env=env)
    assert f"written by {before} ranks, now {after}" in resumed.stderr
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == list(range(1, cfg["train"]["steps"] + 1))
    assert (tmp_path / "run" / "model" / "config.json").is_file()
    assert not (tmp_path / "run" / "checkpoints" / "universal").exists()  # removed once the new launch saved
    was, now = torch.load(tmp_path / f"state.step{stop}"), torch.load(tmp_path / "state.resumed")
    assert was.keys() == now.keys() and len(was) > 10
    for name in was:
        for a, b, what in zip(was[name], now[name], ("weights", "exp_avg", "exp_avg_sq")):
            torch.testing.assert_close(b, a, rtol=0, atol=0, msg=f"{name} {what}")
    seen = [c for r in range(max(before, after)) if (tmp_path / f"cells.rank{r}").exists()
            for line in (tmp_path / f"cells.rank{r}").read_text().splitlines()
            if (row := json.loads(line))["epoch"] == 0 and row["split"] == "train" for c in row["cells"]]
    assert len(seen) == len(set(seen)) and set(seen) == set(train)


@pytest.mark.slow
def test_resume_continues_exactly_after_a_stop_and_a_killed_rank(tmp_path: Path, small_corpus: Path):
    """Stop after step 3 (checkpointed); resume and lose rank 1 to SIGKILL while it writes the checkpoint of
    step 6 (the launcher fails); resume again: from step 3, steps 4-6 match the uninterrupted run (loss and
    batches) and each appears once in the metrics log."""
    full = _config(tmp_path, small_corpus, "full", steps=6)
    _launch(full, 2)
    split = _config(tmp_path, small_corpus, "split", steps=6)
    _launch(split, 2, "--stop-at", "3")
    assert not (tmp_path / "split" / "model").exists()
    killed = launch_ranks("tests/faults.py", split, 2, "--resume", fault="engine-files:6:1", check=False)
    assert killed.returncode != 0
    assert [r["step"] for r in read_metrics(tmp_path / "split")] == [1, 2, 3, 4, 5, 6]  # logged before the kill
    resumed = _launch(split, 2, "--resume")
    assert "resumed from" in resumed.stderr and "step00000003 (step 3)" in resumed.stderr
    a, b = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "split")
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    for ra, rb in zip(a, b):
        assert ra["batch_digest"] == rb["batch_digest"]
        for key in ("loss", "contrastive", "matching", "reconstruction", "lr"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-6), (ra["step"], key)


def test_bad_config_is_one_error_line(tmp_path: Path, small_corpus: Path):
    path = _config(tmp_path, small_corpus, "bad", steps=2)
    cfg = yaml.safe_load(path.read_text())
    cfg["train"]["stpes"] = 3
    path.write_text(yaml.safe_dump(cfg))
    from conftest import run_cli
    r = run_cli("pretrain", "--config", str(path))
    assert r.returncode == 2 and r.stderr.strip().startswith("error: ") and "train.stpes" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_single_process_without_launcher_in_deepspeed_bf16(tmp_path: Path, small_corpus: Path):
    """`scmm pretrain` alone (no launcher) with DeepSpeed's bf16 weights: trains, exports an fp32 model."""
    from conftest import run_cli
    config = _config(tmp_path, small_corpus, "bf16", steps=3, precision="bf16")
    r = run_cli("pretrain", "--config", str(config))
    assert r.returncode == 0, r.stderr[-3000:]
    rows = read_metrics(tmp_path / "bf16")
    assert [r["step"] for r in rows] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in rows)
    from safetensors.torch import load_file
    state = load_file(str(tmp_path / "bf16" / "model" / "aligner.safetensors"))
    assert all(v.dtype == torch.float32 for v in state.values())


@pytest.mark.slow
def test_one_process_without_zero_exports_the_same_weights_as_zero2(tmp_path: Path, small_corpus: Path):
    """ZeRO stage 0 (the demo's one-process config) exports the weights of this process: the same model as ZeRO-2
    consolidates from its checkpoint. DeepSpeed's bf16 weights without ZeRO are refused (no fp32 copy to export)."""
    from safetensors.torch import load_file
    models = {}
    for zero in (0, 2):
        config = _config(tmp_path, small_corpus, f"one{zero}", steps=4)
        _launch(config, 1, zero=zero)
        models[zero] = load_file(str(tmp_path / f"one{zero}" / "model" / "aligner.safetensors"))
    assert models[0].keys() == models[2].keys()
    for key, value in models[2].items():  # summation order differs a little
        if key.endswith("key.bias"):
            # softmax ignores a key bias (it adds q.b to every score of a query): its gradient is rounding noise,
            # which AdamW's normalised step turns into moves of up to lr per step, different for each order
            continue
        torch.testing.assert_close(models[0][key], value, rtol=1e-5, atol=1e-5, msg=key)
    r = launch_ranks("pretrain/train.py", _config(tmp_path, small_corpus, "bf16zero0", steps=2, precision="bf16"), 1,
                     zero=0, check=False)
    assert r.returncode != 0 and "needs a ZeRO stage of 1 or more" in r.stderr


@pytest.mark.slow
def test_two_node_ranks_on_localhost_equal_one_node_with_two_ranks(tmp_path: Path, small_corpus: Path):
    """A multi-node launch: `torchrun --nnodes 2 --node_rank 0|1 --nproc_per_node 1 --master_addr 127.0.0.1`
    (two processes started together, as on two machines) trains step for step as one node with two ranks."""
    import os
    import socket
    import sys

    from conftest import ROOT
    one = _config(tmp_path, small_corpus, "one_node", steps=4)
    _launch(one, 2)
    two = _config(tmp_path, small_corpus, "two_nodes", steps=4)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu",
           "TORCH_EXTENSIONS_DIR": str(ROOT / ".cache" / "torch_extensions"), "TOKENIZERS_PARALLELISM": "false"}
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node),
                               "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port),
                               str(ROOT / "pretrain" / "train.py"), "--config", str(two), "--deepspeed_config",
                               str(ROOT / "configs" / "deepspeed" / "zero2.json")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for node in (0, 1)]
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-5000:]
    a, b = read_metrics(tmp_path / "one_node"), read_metrics(tmp_path / "two_nodes")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        for key in ("loss", "contrastive", "matching", "reconstruction", "lr"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-6, abs=1e-6), (ra["step"], key)
    assert (tmp_path / "two_nodes" / "model").is_dir()
