"""Stage 1: cell–text alignment pretraining under DeepSpeed.

    scmm pretrain --config configs/stage1_demo.yaml [--resume]
    deepspeed pretrain/train.py --config FILE --deepspeed_config configs/deepspeed/zero2.json
    torchrun --standalone --nproc_per_node 2 pretrain/train.py --config FILE

The loop reads top to bottom: set up the process group, build the corpus loader and the model, wrap
them in a DeepSpeed engine, then step, log and checkpoint. A checkpoint holds the engine (weights,
optimizer, scheduler) plus, per rank, the loader position and RNG states, so `--resume` continues
with exactly the batches and losses of an uninterrupted run. At the end the consolidated fp32
weights are exported to `<out>/model/`, a folder that loads without DeepSpeed.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import random
import shutil
import socket
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from scmm.data_pipeline.loader import CorpusLoader, LoaderConfig
from scmm.data_pipeline.store import Corpus
from scmm.eval.annotate import corpus_label_texts, zero_shot_accuracy
from scmm.model.aligner import AlignerConfig, CellTextAligner
from scmm.config import load_yaml
from scmm.errors import ScmmError

log = logging.getLogger("scmm.pretrain")
PRECISIONS = ("fp32", "bf16", "autocast-bf16")


@dataclass
class TrainOptions:
    steps: int = 1000
    lr: float = 1e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.05
    warmup_steps: int = 100
    grad_clip: float = 1.0
    grad_accum: int = 1
    precision: str = "bf16"  # fp32 | bf16 (DeepSpeed bf16 weights) | autocast-bf16 (fp32 weights, bf16 matmuls)
    activation_checkpointing: bool = False
    optimizer: str = "auto"  # auto: DeepSpeed's fused AdamW on GPU, torch AdamW on CPU | torch | deepspeed
    log_every: int = 10
    save_every: int = 500
    keep_last: int = 2
    tensorboard: bool = False
    threads: int = 0  # torch intra-op threads per process (0: leave as is)

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"train.precision must be one of {', '.join(PRECISIONS)}, not '{self.precision}'")
        if self.optimizer not in ("auto", "torch", "deepspeed"):
            raise ValueError(f"train.optimizer must be auto, torch or deepspeed, not '{self.optimizer}'")
        if self.steps < 1 or self.grad_accum < 1 or self.save_every < 1 or self.keep_last < 1:
            raise ValueError("train.steps, grad_accum, save_every and keep_last must be >= 1")


@dataclass
class Stage1Config:
    corpus: str
    out: str
    name: str = "stage1"
    seed: int = 0
    deepspeed: str | None = None  # DeepSpeed JSON (ZeRO stage, ...); None: configs/deepspeed/zero2.json's content
    model: AlignerConfig = field(default_factory=AlignerConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    train: TrainOptions = field(default_factory=TrainOptions)


# --- set-up ---------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> tuple[int, int, torch.device]:
    """Join (or, without a launcher, create) the process group; returns (rank, world size, device)."""
    if "RANK" not in os.environ:  # a single process without a launcher: what DeepSpeed would expect
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1",
                          LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return rank, world, device


def deepspeed_config(cfg: Stage1Config, path: str | None, world: int) -> dict:
    """The DeepSpeed JSON with the values this config owns filled in (batch, accumulation, clipping, precision)."""
    path = path or cfg.deepspeed or str(Path(__file__).resolve().parents[1] / "configs" / "deepspeed" / "zero2.json")
    try:
        ds = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ScmmError(f"cannot read the DeepSpeed config {path}: {exc}") from None
    t = cfg.train
    ds.update(train_micro_batch_size_per_gpu=cfg.loader.batch_size, gradient_accumulation_steps=t.grad_accum,
              train_batch_size=cfg.loader.batch_size * t.grad_accum * world, gradient_clipping=t.grad_clip,
              steps_per_print=10 ** 9, wall_clock_breakdown=False)
    ds["bf16"] = {"enabled": t.precision == "bf16"}
    ds.pop("fp16", None)
    if t.tensorboard:
        ds["tensorboard"] = {"enabled": True, "output_path": str(Path(cfg.out) / "tensorboard"), "job_name": cfg.name}
    if use_deepspeed_optimizer(t):
        ds["optimizer"] = {"type": "AdamW", "params": {"lr": t.lr, "weight_decay": t.weight_decay,
                                                       "betas": [0.9, 0.98], "eps": 1e-8}}
    return ds


def use_deepspeed_optimizer(t: TrainOptions) -> bool:
    return t.optimizer == "deepspeed" or (t.optimizer == "auto" and torch.cuda.is_available())


def lr_lambda(t: TrainOptions):
    """Linear warmup, then cosine decay to `min_lr_ratio` at the last step."""
    def fn(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        progress = min(1.0, (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps))
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return fn


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only (not on biases, norms, embeddings' padding rows or the temperature)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 and "logit_scale" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# --- checkpoints ----------------------------------------------------------------------------------
def start_run(out: str | Path, resume: bool, threads: int = 0) -> tuple[int, int, torch.device, Path, Path]:
    """(rank, world size, device, out, checkpoint folder) of a training launch, once every rank has checked
    that a fresh run (no ``--resume``) would not mix with an earlier run's checkpoints."""
    rank, world, device = init_distributed()
    if threads > 0:
        torch.set_num_threads(threads)
    out = Path(out)
    ckpt_dir = out / "checkpoints"
    if not resume and ckpt_dir.exists():
        raise ScmmError(f"{ckpt_dir} already holds checkpoints: pass --resume to continue, or choose another out")
    torch.distributed.barrier()
    return rank, world, device, out, ckpt_dir


def endless_batches(loader: CorpusLoader) -> Iterator[dict]:
    """The loader's batches epoch after epoch; each new epoch starts only when the next batch is asked for, so
    the loader's state between two batches is exactly what a checkpoint must save."""
    empty = 0
    while empty < 2:  # one empty pass is normal: a run resumed at the end of an epoch
        got = False
        for batch in loader:
            got = True
            yield batch
        empty = 0 if got else empty + 1
    raise ScmmError("the train split yields no batch (fewer cells than one batch per rank?)")


class MetricsWindow:
    """The losses, throughput and batch digest of the steps since the last log line, logged as one line.

    Each rank adds its micro-steps; :meth:`flush` averages the losses over ranks and micro-steps (one
    all-reduce), sums the cells over ranks, and on rank 0 appends the line to ``metrics.jsonl``, to the
    DeepSpeed monitor (``{prefix}/{key}``) and to the progress bar. ``batch_digest`` hashes the cell IDs this
    rank trained on, so a resumed run can be checked against an uninterrupted one.
    """

    def __init__(self, keys: tuple[str, ...], rate_key: str, prefix: str, path: Path, rank: int):
        self.keys, self.rate_key, self.prefix, self.path, self.rank = keys, rate_key, prefix, path, rank
        self._reset()

    def _reset(self) -> None:
        self.sums = {k: 0.0 for k in self.keys}
        self.cells = self.n = 0
        self.digest = hashlib.sha1()
        self.tic = time.perf_counter()

    def add(self, losses: dict, cell_ids: list[str]) -> None:
        for k in self.keys:
            self.sums[k] += float(losses[k].detach())
        self.cells += len(cell_ids)
        self.digest.update("\x1f".join(cell_ids).encode())
        self.n += 1

    def flush(self, step: int, epoch: int, lr: float, engine, bar) -> dict:
        summary = torch.tensor([self.sums[k] for k in self.keys] + [self.cells, self.n], dtype=torch.float64)
        torch.distributed.all_reduce(summary)
        elapsed = time.perf_counter() - self.tic
        n = summary[-1].item()
        line = {"step": step, "epoch": epoch, "lr": lr, **{k: summary[i].item() / n for i, k in enumerate(self.keys)},
                self.rate_key: summary[len(self.keys)].item() / elapsed, "batch_digest": self.digest.hexdigest()[:16]}
        if self.rank == 0:
            with self.path.open("a") as f:
                f.write(json.dumps(line) + "\n")
            if engine.monitor.enabled:
                engine.monitor.write_events([(f"{self.prefix}/{k}", v, step) for k, v in line.items()
                                             if isinstance(v, float)])
            bar.set_postfix(loss=f"{line['loss']:.3f}", **{self.rate_key.replace("_per_s", "_s"): f"{line[self.rate_key]:.1f}"})
        self._reset()
        return line


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(engine, ckpt_dir: Path, step: int, loader: CorpusLoader, rank: int, keep_last: int) -> None:
    """DeepSpeed checkpoint of the engine, plus this rank's loader position and RNG states; keep the last K."""
    tag = f"step{step:08d}"
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"step": step})
    torch.save({"step": step, "loader": loader.state_dict(), "rng": _rng_state()},
               ckpt_dir / tag / f"trainer_state_rank{rank}.pt")
    torch.distributed.barrier()
    if rank == 0:
        tags = sorted(p.name for p in ckpt_dir.glob("step*") if p.is_dir())
        for old in tags[:-keep_last]:
            shutil.rmtree(ckpt_dir / old, ignore_errors=True)
    torch.distributed.barrier()


def load_checkpoint(engine, ckpt_dir: Path, loader: CorpusLoader, rank: int) -> int:
    """Restore the latest checkpoint; returns the step to continue from."""
    latest = ckpt_dir / "latest"
    if not latest.is_file():
        raise ScmmError(f"--resume: no checkpoint in {ckpt_dir}")
    tag = latest.read_text().strip()
    path, client = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if path is None:
        raise ScmmError(f"--resume: cannot load checkpoint {ckpt_dir / tag}")
    state_file = ckpt_dir / tag / f"trainer_state_rank{rank}.pt"
    if not state_file.is_file():
        raise ScmmError(f"--resume: {state_file} is missing (was the run launched with another number of ranks?)")
    state = torch.load(state_file, weights_only=False)
    loader.load_state_dict(state["loader"])
    _set_rng_state(state["rng"])
    return int(client["step"])


def export_model(cfg: Stage1Config, vocab: dict, ckpt_dir: Path, out: Path) -> None:
    """Consolidate the fp32 weights of the last checkpoint (any ZeRO stage) into a model folder."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir))
    model = CellTextAligner(cfg.model, vocab)
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    missing = [k for k in missing if k not in frozen]  # frozen weights are the ones the model was built with
    if missing or unexpected:
        raise RuntimeError(f"export: state dict mismatch, missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.save_pretrained(out)


# --- the loop -------------------------------------------------------------------------------------
def train(cfg: Stage1Config, resume: bool = False, deepspeed_json: str | None = None,
          stop_at: int | None = None) -> dict:
    """Run stage 1; returns the last logged metrics (rank 0).

    `stop_at` ends this launch after that step with a checkpoint (for time-limited cluster jobs);
    `--resume` continues from there.
    """
    rank, world, device, out, ckpt_dir = start_run(cfg.out, resume, cfg.train.threads)
    import deepspeed
    from tqdm.auto import tqdm
    t = cfg.train
    corpus = Corpus(cfg.corpus)
    vocab = json.loads((Path(cfg.corpus) / "vocab.json").read_text())
    loader = CorpusLoader(corpus, "train", cfg.loader, vocab["<cls>"], vocab["<pad>"], rank=rank, world_size=world)

    torch.manual_seed(cfg.seed)
    model = CellTextAligner(cfg.model, vocab)
    model.set_text_center(corpus_label_texts(corpus))  # a checkpoint restores it too (it is a buffer)
    if t.activation_checkpointing:
        model.cell_tower.gradient_checkpointing_enable()
    optimizer = None if use_deepspeed_optimizer(t) else \
        torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.lr, betas=(0.9, 0.98), eps=1e-8)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, model_parameters=param_groups(model, t.weight_decay) if optimizer is None
        else None, config=deepspeed_config(cfg, deepspeed_json, world),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(t)))
    step = load_checkpoint(engine, ckpt_dir, loader, rank) if resume else 0
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(asdict(cfg), indent=1))
        n_params = sum(p.numel() for p in model.parameters())
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        log.info("stage 1: %d ranks, %s, %.1fM parameters (%.1fM trained), %d train cells, %d batches/epoch/rank",
                 world, t.precision, n_params / 1e6, n_train / 1e6, corpus.manifest["splits"]["train"], len(loader))

    batches = endless_batches(loader)

    bar = tqdm(total=t.steps, initial=step, desc="stage 1", unit="step", disable=rank != 0 or None)
    window = MetricsWindow(("loss", "contrastive", "matching", "reconstruction"), "cells_per_s", "stage1",
                           out / "metrics.jsonl", rank)
    last = {}
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=t.precision == "autocast-bf16")
    engine.train()
    while step < t.steps:
        lr = scheduler.get_last_lr()[0]  # the rate this step uses
        for _ in range(t.grad_accum):
            batch = next(batches)
            with autocast:
                losses = engine(batch, step=step, rank=rank, world_size=world, seed=cfg.seed)
            engine.backward(losses["loss"])
            engine.step()
            window.add(losses, batch["cell_id"])
        step += 1
        if step % t.log_every == 0 or step == t.steps:
            last = window.flush(step, loader.epoch, lr, engine, bar)
        bar.update(1)
        if step % t.save_every == 0 or step == t.steps or step == stop_at:
            save_checkpoint(engine, ckpt_dir, step, loader, rank, t.keep_last)
        if step == stop_at:
            break
    bar.close()
    if rank == 0 and step == t.steps:
        export_model(cfg, vocab, ckpt_dir, out / "model")
        # how cells were encoded in training: inference (eval, embed, annotate) encodes them the same way
        (out / "model" / "loader.json").write_text(json.dumps(asdict(cfg.loader), indent=1))
        exported = CellTextAligner.from_pretrained(out / "model")
        acc = zero_shot_accuracy(exported, corpus, "val", cfg.loader)
        (out / "model" / "train_summary.json").write_text(json.dumps({"val_zero_shot_accuracy": acc, **last}))
        log.info("exported the stage-1 model to %s; zero-shot cell-type accuracy on the val split: %.3f",
                 out / "model", acc)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    return last


def load_config(path: str) -> Stage1Config:
    return load_yaml(path, Stage1Config)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="scmm stage 1: cell–text alignment pretraining")
    parser.add_argument("--config", required=True)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--deepspeed_config", default=None, help="DeepSpeed JSON (overrides the config's)")
    parser.add_argument("--stop-at", type=int, default=None, help="end this launch after that step (checkpointed)")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the launcher
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        train(load_config(args.config), resume=args.resume, deepspeed_json=args.deepspeed_config,
              stop_at=args.stop_at)
    except ScmmError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
