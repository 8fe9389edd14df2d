"""The one training engine: launch set-up, the DeepSpeed engine, the step loop, metrics, checkpoints, export.

Every training in scmm runs through :class:`Trainer`: stage 1 (``pretrain/train.py``), stage 2
(``finetune/train.py``), the demo LLM's pre-training (``finetune/init_lm.py``) and the pseudo-cell decoder refit
(``finetune/refit.py``). A stage script builds its data and its model, then hands both to the trainer:

    launch = start_run(cfg.out, resume, cfg.train.threads)          # process group, checkpoint guard
    trainer = Trainer(model, cfg.train, name="stage1", launch=launch, loader=loader, deepspeed=ds_json)
    last = trainer.run(batches, forward, export)                     # forward(module, batch, step) -> losses
    # fit, then export(last) on rank 0 when finished, where the script's export calls
    # trainer.load_trained_state(fresh_model)                        # fp32 weights (any ZeRO stage), rank 0

Two back ends share the loop. With a ``launch`` the model runs in a DeepSpeed engine (ZeRO 1-3, bf16 weights,
gradient accumulation and clipping, ``save_checkpoint``/``load_checkpoint``; on CPU a torch AdamW is the client
optimizer, since DeepSpeed's own JIT-compiles a fused kernel). Without one (``init-lm``, the refit: one process,
a short run) the model trains with a plain torch AdamW in this process, without checkpoints.

The model owns its parameter groups (``model.param_groups(weight_decay, lr)``, as nanoGPT's
``configure_optimizers``, built by the one weight-decay rule :func:`scmm.model.optim.decay_groups`); the
schedule is ``transformers``' warmup + cosine decay to ``lr * min_lr_ratio``, or warmup + linear decay to 0.
A checkpoint holds the DeepSpeed engine (frozen weights left out) plus, per rank, the
loader position and the RNG states, and counts only once complete (:mod:`scmm.pretrain.checkpoints`), so
``--resume`` continues from the newest complete one with exactly the batches and losses of an uninterrupted run,
or, on another number of ranks, through DeepSpeed's universal checkpoint with the loader re-sharded.
A micro-batch with a NaN/inf loss is skipped on every rank, up to ``train.max_bad_batches`` of them.

A launch stops cleanly before a scheduler's time limit or on preemption: SIGUSR1 or SIGTERM (``#SBATCH
--signal=USR1@<seconds>``), or ``train.max_wall_time`` seconds since the trainer started, ends the launch at the
next step boundary, on every rank at the same step (one all-reduce of the flag per step), with a complete
checkpoint; :class:`~scmm.errors.TrainingStopped` then makes the command exit with status 3, and ``--resume``
continues exactly where it stopped.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import random
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import get_cosine_with_min_lr_schedule_with_warmup, get_linear_schedule_with_warmup

from scmm.atomic import write_file
from scmm.errors import EXIT_STOPPED, ScmmError, TrainingStopped
from scmm.pretrain import checkpoints
from scmm.pretrain.command_line import add_training_options, run_training

log = logging.getLogger("scmm.train")

__all__ = ["TrainOptions", "Launch", "start_run", "endless_batches", "deepspeed_config", "Trainer", "script_main",
           "PRECISIONS", "SCHEDULES", "DEFAULT_DEEPSPEED_CONFIG"]

PRECISIONS = ("fp32", "bf16", "autocast-bf16")
SCHEDULES = ("cosine", "linear")
DEFAULT_DEEPSPEED_CONFIG = {"zero_optimization": {"stage": 2}}  # configs/deepspeed/zero2.json, also when installed


@dataclass
class TrainOptions:
    """The optimisation of one training run (YAML key ``train``)."""

    steps: int = 1000
    lr: float = 1e-4
    schedule: str = "cosine"  # cosine: warmup, then cosine decay to lr * min_lr_ratio; linear: warmup, then to 0
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.05
    warmup_steps: int = 100
    grad_clip: float = 1.0  # 0: no clipping
    grad_accum: int = 1
    betas: tuple[float, float] = (0.9, 0.98)
    fused_adamw: bool = False  # torch's fused AdamW kernel (a client optimizer only): faster, other rounding
    precision: str = "bf16"  # fp32 | bf16 (DeepSpeed bf16 weights) | autocast-bf16 (fp32 weights, bf16 matmuls)
    activation_checkpointing: bool = False
    optimizer: str = "auto"  # auto: DeepSpeed's fused AdamW on GPU, torch AdamW on CPU | torch | deepspeed
    log_every: int = 10
    save_every: int = 500
    keep_last: int = 2
    max_bad_batches: int = 5  # micro-batches with a NaN/inf loss skipped (each logged) before the run stops
    tensorboard: bool = False
    threads: int = 0  # torch intra-op threads per process (0: leave as is)
    max_wall_time: float = 0  # seconds: stop with a checkpoint (exit 3) at the first step boundary after it; 0 = off

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"train.precision must be one of {', '.join(PRECISIONS)}, not '{self.precision}'")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"train.schedule must be one of {', '.join(SCHEDULES)}, not '{self.schedule}'")
        if self.optimizer not in ("auto", "torch", "deepspeed"):
            raise ValueError(f"train.optimizer must be auto, torch or deepspeed, not '{self.optimizer}'")
        if min(self.steps, self.grad_accum, self.save_every, self.keep_last, self.log_every) < 1:
            raise ValueError("train.steps, grad_accum, save_every, keep_last and log_every must be >= 1")
        if self.max_bad_batches < 0 or self.threads < 0:
            raise ValueError("train.max_bad_batches and threads must be >= 0")
        if not 0 <= self.max_wall_time < float("inf"):
            raise ValueError(f"train.max_wall_time must be a number of seconds >= 0 (0: off), "
                             f"not {self.max_wall_time!r}")
        if not self.lr > 0 or self.weight_decay < 0 or self.grad_clip < 0 or self.warmup_steps < 0:
            raise ValueError("train.lr must be > 0; weight_decay, grad_clip and warmup_steps >= 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("train.min_lr_ratio must be in [0, 1]")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError("train.betas must be two numbers in [0, 1)")
        self.betas = tuple(self.betas)

    @property
    def use_deepspeed_optimizer(self) -> bool:
        return self.optimizer == "deepspeed" or (self.optimizer == "auto" and torch.cuda.is_available())

    def schedule_for(self, optimizer: torch.optim.Optimizer):
        """The learning-rate schedule of this run (``transformers``' implementations)."""
        if self.schedule == "linear":
            return get_linear_schedule_with_warmup(optimizer, self.warmup_steps, self.steps)
        return get_cosine_with_min_lr_schedule_with_warmup(optimizer, self.warmup_steps, self.steps,
                                                           min_lr_rate=self.min_lr_ratio)


# --- launch ---------------------------------------------------------------------------------------
@dataclass
class Launch:
    """Where this process stands in a training launch."""

    rank: int
    world: int
    device: torch.device
    out: Path
    ckpt_dir: Path
    resume: bool = False  # continue from the newest complete checkpoint (--resume)


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
    import deepspeed  # noqa: PLC0415 - deepspeed reads DS_ACCELERATOR, set just above, when first imported
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return rank, world, device


def start_run(out: str | Path, resume: bool, threads: int = 0) -> Launch:
    """Set up a training launch, once every rank has checked that a fresh run (no ``--resume``) would not mix
    with an earlier run's checkpoints."""
    rank, world, device = init_distributed()
    if threads > 0:
        torch.set_num_threads(threads)
    out = Path(out)
    ckpt_dir = out / "checkpoints"
    if not resume and ckpt_dir.exists():
        raise ScmmError(f"{ckpt_dir} already holds checkpoints: pass --resume to continue, or choose another out")
    torch.distributed.barrier()
    return Launch(rank, world, device, out, ckpt_dir, resume)


def deepspeed_config(path: str | Path | None, train: TrainOptions, micro_batch: int, world: int,
                     out: Path, name: str) -> dict:
    """The DeepSpeed JSON (default: ZeRO-2, as configs/deepspeed/zero2.json) with the values the run config owns
    filled in: batch sizes, accumulation, clipping, precision, TensorBoard, and the optimizer when DeepSpeed builds
    it."""
    ds = json.loads(json.dumps(DEFAULT_DEEPSPEED_CONFIG))
    if path:
        try:
            ds = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ScmmError(f"cannot read the DeepSpeed config {path}: {exc}") from None
        if not isinstance(ds, dict):
            raise ScmmError(f"the DeepSpeed config {path} must hold a JSON object")
    ds.update(train_micro_batch_size_per_gpu=micro_batch, gradient_accumulation_steps=train.grad_accum,
              train_batch_size=micro_batch * train.grad_accum * world, gradient_clipping=train.grad_clip,
              steps_per_print=10 ** 9, wall_clock_breakdown=False)
    ds["bf16"] = {"enabled": train.precision == "bf16"}
    if train.precision == "bf16" and not (ds.get("zero_optimization") or {}).get("stage", 0):
        raise ScmmError(f"{name}: precision bf16 (bf16 weights) needs a ZeRO stage of 1 or more, which keeps the fp32 "
                        f"weights the model is exported from; use autocast-bf16 without ZeRO")
    ds.pop("fp16", None)
    if train.tensorboard:
        ds["tensorboard"] = {"enabled": True, "output_path": str(out / "tensorboard"), "job_name": name}
    if train.use_deepspeed_optimizer:
        ds["optimizer"] = {"type": "AdamW", "params": {"lr": train.lr, "weight_decay": train.weight_decay,
                                                       "betas": list(train.betas), "eps": 1e-8}}
    return ds


def endless_batches(loader: Iterable[dict]) -> Iterator[dict]:
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


# --- metrics --------------------------------------------------------------------------------------
class MetricsWindow:
    """The losses, throughput and batch digest of the steps since the last log line, logged as one line.

    Each rank adds its micro-steps; :meth:`flush` averages the losses over micro-steps and, in a distributed run,
    over ranks (one all-reduce), sums the items over ranks, and on rank 0 appends the line to ``metrics.jsonl``
    (when the run has a folder). A run inside one process (``distributed`` False) never joins a collective, even
    when a process group exists (the decoder refit on rank 0 at the end of stage 2). ``batch_digest`` hashes the
    ids of the items this rank trained on, so a resumed run can be checked against an uninterrupted one.
    """

    def __init__(self, keys: tuple[str, ...], rate_key: str, path: Path | None, rank: int, distributed: bool):
        self.keys, self.rate_key, self.path, self.rank, self.distributed = keys, rate_key, path, rank, distributed
        self._reset()

    def _reset(self) -> None:
        self.sums = {k: 0.0 for k in self.keys}
        self.items = self.n = self.tokens = 0
        self.digest = hashlib.sha1()
        self.tic = time.perf_counter()

    def add(self, losses: dict, n_items: int, ids: list[str]) -> None:
        for k in self.keys:
            self.sums[k] += float(losses[k].detach())
        self.items += n_items
        self.tokens += int(losses.get("tokens", 0))  # a forward that feeds a language model counts its tokens
        self.digest.update("\x1f".join(map(str, ids)).encode())
        self.n += 1

    def flush(self, step: int, epoch: int, lr: float) -> dict:
        summary = torch.tensor([self.sums[k] for k in self.keys] + [self.items, self.tokens, self.n],
                               dtype=torch.float64)
        if self.distributed:
            torch.distributed.all_reduce(summary)
        elapsed = max(time.perf_counter() - self.tic, 1e-9)
        n, tokens = summary[-1].item(), summary[-2].item()
        line = {"step": step, "epoch": epoch, "lr": lr, **{k: summary[i].item() / n for i, k in enumerate(self.keys)},
                self.rate_key: summary[len(self.keys)].item() / elapsed, "batch_digest": self.digest.hexdigest()[:16]}
        if tokens:
            line["tokens_per_s"] = tokens / elapsed
        if torch.cuda.is_available() and torch.cuda.is_initialized():  # this rank's peak, for sizing a run
            line["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        if self.rank == 0 and self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps(line) + "\n")
        self._reset()
        return line


def _cut_metrics(path: Path | None, step: int) -> None:
    """Keep the lines of ``metrics.jsonl`` up to ``step``: a resumed run logs the steps after it again."""
    if path is None or not path.is_file():
        return
    def before(line: str) -> bool:
        try:
            return json.loads(line).get("step", 0) <= step
        except ValueError:  # a line cut short by a kill
            return False

    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if before(line)]
    if len(kept) != len(lines):
        write_file(path, lambda p: p.write_text("".join(kept)))


# --- the trainer ----------------------------------------------------------------------------------
Forward = Callable[[Any, dict, int], dict]  # (the module to call, a batch, the step) -> losses with "loss"


def cell_items(batch: dict) -> tuple[int, list[str]]:
    """What a batch of cells counts for the throughput and the batch digest: its cells and their IDs."""
    return len(batch["cell_id"]), list(batch["cell_id"])


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _adamw(groups: list[dict], opts: TrainOptions) -> torch.optim.Optimizer:
    """torch's AdamW; ``fused_adamw`` asks for the fused kernel (on CPU the optimizer's elementwise passes cost
    as much as a small model's matmuls), where this torch build has it."""
    if opts.fused_adamw:
        try:
            return torch.optim.AdamW(groups, lr=opts.lr, betas=opts.betas, eps=1e-8, fused=True)
        except (RuntimeError, TypeError):
            pass
    # foreach: a few kernels over all tensors instead of a loop per tensor (torch picks it on GPUs only; it is
    # faster on CPU too, BENCHMARKS.md)
    return torch.optim.AdamW(groups, lr=opts.lr, betas=opts.betas, eps=1e-8, foreach=True)


class _LocalEngine:
    """A model and a torch AdamW in this process, behind DeepSpeed's engine interface (call, backward, step)."""

    def __init__(self, model: torch.nn.Module, groups: list[dict], opts: TrainOptions):
        self.module, self.opts, self.micro_steps = model, opts, 0
        self.optimizer = _adamw(groups, opts)
        self.scheduler = opts.schedule_for(self.optimizer)
        self.params = [p for g in groups for p in g["params"]]

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def train(self) -> None:
        self.module.train()

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.opts.grad_accum).backward()

    def step(self) -> None:
        self.micro_steps += 1
        if self.micro_steps % self.opts.grad_accum:
            return
        if self.opts.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.opts.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)


class Trainer:
    """One training run of ``model`` (see the module docstring).

    ``launch``: the run's place in a DeepSpeed launch (:func:`start_run`); None trains in this process without
    DeepSpeed or checkpoints. ``loader``: the data's state for checkpoints (``state_dict``/``load_state_dict``).
    ``param_groups``: AdamW groups, by default ``model.param_groups(weight_decay, lr)``. ``loss_keys``: the losses
    logged besides ``loss``; ``rate_key``: the throughput's name in ``metrics.jsonl``.
    """

    def __init__(self, model: torch.nn.Module, opts: TrainOptions, *, name: str, launch: Launch | None = None,
                 deepspeed: str | Path | None = None, micro_batch: int = 1, loader: Any = None,
                 param_groups: list[dict] | None = None, loss_keys: tuple[str, ...] = (),
                 rate_key: str = "cells_per_s", metrics_path: Path | None = None, progress: bool = True):
        self.model, self.opts, self.name, self.launch, self.loader = model, opts, name, launch, loader
        self.rank = launch.rank if launch else 0
        self.progress, self.step, self.skipped, self.history = progress, 0, 0, []
        self.started = time.monotonic()  # train.max_wall_time counts from here
        self.stop_signal: int | None = None  # set by SIGUSR1/SIGTERM during fit (a DeepSpeed launch only)
        self.stop_reason = ""
        if opts.activation_checkpointing:
            model.gradient_checkpointing_enable()
        groups = param_groups if param_groups is not None else model.param_groups(opts.weight_decay, opts.lr)
        self.window = MetricsWindow(("loss", *loss_keys), rate_key, metrics_path, self.rank, launch is not None)
        self.resume_from: checkpoints.Sealed | None = None  # the checkpoint --resume continues from
        if launch is None:
            if opts.precision == "bf16":
                raise ScmmError(f"{name}: precision bf16 (bf16 weights) needs DeepSpeed; use autocast-bf16")
            self.engine = _LocalEngine(model, groups, opts)
            device = next(model.parameters()).device
        else:
            if launch.resume:
                self.resume_from = self._choose_checkpoint()
            self.engine = self._deepspeed_engine(groups, deepspeed, micro_batch)
            device = launch.device
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=opts.precision == "autocast-bf16")

    def _deepspeed_engine(self, groups: list[dict], config_path, micro_batch: int):
        import deepspeed  # noqa: PLC0415 - only after init_distributed (start_run) has set its accelerator
        opts, launch = self.opts, self.launch
        optimizer = None if opts.use_deepspeed_optimizer else _adamw(groups, opts)
        config = deepspeed_config(config_path, opts, micro_batch, launch.world, launch.out, self.name)
        self.load_dir = launch.ckpt_dir
        sealed = self.resume_from
        if sealed is not None and sealed.world != launch.world and (config.get("zero_optimization") or {}).get("stage"):
            # ZeRO shards the optimizer over the ranks that wrote the checkpoint: resume through DeepSpeed's
            # universal checkpoint, which holds every parameter's state whole
            if self.rank == 0:
                checkpoints.universal(sealed)
            torch.distributed.barrier()
            self.load_dir = launch.ckpt_dir / checkpoints.UNIVERSAL
            config["checkpoint"] = {**config.get("checkpoint", {}), "load_universal": True}
        engine, _, _, self.scheduler = deepspeed.initialize(
            model=self.model, optimizer=optimizer, model_parameters=groups if optimizer is None else None,
            config=config, lr_scheduler=opts.schedule_for)
        if launch.world == 1 and engine.zero_optimization_stage() == 0:
            # one rank holds every gradient: DeepSpeed's all-reduce would only flatten and copy them back
            engine.enable_backward_allreduce = False
        return engine

    def begin(self, run_config: dict, resume: bool, data: str) -> None:
        """Resume from the latest checkpoint when asked; then rank 0 writes the run's ``config.json`` and logs the
        run's shape (ranks, precision, parameters, and ``data``: what the stage trains on)."""
        if resume:
            self.resume()
        if self.rank != 0:
            return
        out = self.launch.out
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(run_config, indent=1))
        n_params = sum(p.numel() for p in self.model.parameters())
        n_train = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        log.info("%s: %d ranks, %s, %.1fM parameters (%.2fM trained), %s", self.name, self.launch.world,
                 self.opts.precision, n_params / 1e6, n_train / 1e6, data)

    # --- the loop ---------------------------------------------------------------------------------
    @property
    def lr(self) -> float:
        """The learning rate of the next optimizer step."""
        scheduler = self.engine.scheduler if isinstance(self.engine, _LocalEngine) else self.scheduler
        return float(scheduler.get_last_lr()[0])

    @property
    def finished(self) -> bool:
        return self.step >= self.opts.steps

    def fit(self, batches: Iterator[dict], forward: Forward, *, stop_at: int | None = None,
            items: Callable[[dict], tuple[int, list]] = cell_items) -> dict:
        """Train until ``opts.steps`` (or ``stop_at``, with a checkpoint); returns the last logged line.

        ``forward(module, batch, step)`` computes the losses of one micro-batch with ``module`` (the DeepSpeed
        engine, or the model itself); ``items(batch)`` gives what the batch counts for throughput and digest.
        """
        t = self.opts
        bar = tqdm(total=t.steps, initial=self.step, desc=self.name, unit="step",
                   disable=True if (self.rank != 0 or not self.progress) else None)
        last: dict = {}
        self.engine.train()
        with self._stop_signals():
            last = self._loop(batches, forward, stop_at, items, bar)
        bar.close()
        return last

    def _loop(self, batches: Iterator[dict], forward: Forward, stop_at: int | None,
              items: Callable[[dict], tuple[int, list]], bar) -> dict:
        t, last = self.opts, {}
        while self.step < t.steps:
            lr = self.lr
            done = 0
            while done < t.grad_accum:
                batch = next(batches)
                with self.autocast:
                    losses = forward(self.engine, batch, self.step)
                n_items, ids = items(batch)
                if not self._finite(losses["loss"], ids):
                    continue
                self.engine.backward(losses["loss"])
                self.engine.step()
                self.window.add(losses, n_items, ids)
                done += 1
            self.step += 1
            if self.step % t.log_every == 0 or self.step == t.steps:
                last = self._log(lr, bar)
            bar.update(1)
            saved = self.launch is not None and (self.step % t.save_every == 0 or self.step in (t.steps, stop_at))
            if saved:
                self.save_checkpoint()
            if self.step == stop_at:
                break
            if self.step < t.steps and self._stop_requested():
                if not saved:
                    self.save_checkpoint()
                bar.close()
                self.close()
                raise TrainingStopped(f"{self.name}: stopped on {self.stop_reason} at step {self.step} of {t.steps} "
                                      f"with a complete checkpoint in {self.launch.ckpt_dir}; rerun with --resume "
                                      f"to continue (exit status {EXIT_STOPPED})")
        return last

    # --- stopping on request ----------------------------------------------------------------------
    @contextlib.contextmanager
    def _stop_signals(self) -> Iterator[None]:
        """While the loop runs (a DeepSpeed launch, in the main thread), SIGUSR1 and SIGTERM only set a flag that
        the next step boundary acts on; the previous handlers come back afterwards."""
        if self.launch is None or threading.current_thread() is not threading.main_thread():
            yield
            return

        def note(signum: int, frame) -> None:
            self.stop_signal = signum
            log.warning("%s: got %s: stopping after this step with a checkpoint", self.name,
                        signal.Signals(signum).name)

        previous = {s: signal.signal(s, note) for s in (signal.SIGUSR1, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _stop_requested(self) -> bool:
        """Whether this launch stops at this step boundary: a signal on any rank, or the wall time spent. Every rank
        joins the one all-reduce (MAX), so all stop at the same step."""
        if self.launch is None:
            return False
        wall = self.opts.max_wall_time
        flag = self.stop_signal is not None or (wall > 0 and time.monotonic() - self.started >= wall)
        verdict = torch.tensor([float(flag)], device=self.launch.device)
        torch.distributed.all_reduce(verdict, op=torch.distributed.ReduceOp.MAX)
        if verdict.item() == 0:
            return False
        self.stop_reason = (f"signal {signal.Signals(self.stop_signal).name}" if self.stop_signal is not None
                            else f"train.max_wall_time ({wall:g} s)" if flag else "another rank's stop request")
        return True

    def _finite(self, loss: torch.Tensor, ids: list) -> bool:
        """Whether the micro-batch's loss is finite on every rank. A batch with a NaN/inf loss is skipped on all
        ranks (no backward, no step), each rank that saw it logging the step and its cells; past
        ``max_bad_batches`` skips the run stops with those details."""
        ok = torch.isfinite(loss.detach()).all().to(torch.float32).reshape(1)
        if self.launch is not None:
            ok = ok.to(self.launch.device)
            torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN)
        if ok.item() == 1.0:
            return True
        self.skipped += 1
        where = f"{self.name}: the loss is not finite at step {self.step + 1}"
        if not torch.isfinite(loss.detach()).all():
            shown = ", ".join(map(str, ids[:8])) + (f" and {len(ids) - 8} more" if len(ids) > 8 else "")
            where += f" on rank {self.rank} (batch of {shown})"
        if self.skipped > self.opts.max_bad_batches:
            raise ScmmError(f"{where}; {self.skipped} batches skipped, more than train.max_bad_batches "
                            f"({self.opts.max_bad_batches}): lower train.lr or check the input data")
        log.warning("%s; batch skipped (%d of at most %d)", where, self.skipped, self.opts.max_bad_batches)
        return False

    def _log(self, lr: float, bar) -> dict:
        line = self.window.flush(self.step, getattr(self.loader, "epoch", 0), lr)
        bad = [k for k in self.window.keys if not np.isfinite(line[k])]
        if bad:  # the same on every rank (averaged over ranks), so every rank stops here
            raise ScmmError(f"{self.name}: the loss is not finite at step {self.step} ({', '.join(bad)}); "
                            f"lower train.lr or check the input data")
        self.history.append(line)
        if self.rank == 0:
            monitor = getattr(self.engine, "monitor", None)
            if monitor is not None and monitor.enabled:
                monitor.write_events([(f"{self.name}/{k}", v, self.step) for k, v in line.items()
                                      if isinstance(v, float)])
            rate = self.window.rate_key
            bar.set_postfix(loss=f"{line['loss']:.3f}", **{rate.replace("_per_s", "_s"): f"{line[rate]:.1f}"})
        return line

    # --- checkpoints ------------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        """A checkpoint of this step that counts only once complete (:mod:`scmm.pretrain.checkpoints`): DeepSpeed's
        engine files without the frozen weights, each rank's loader position and RNG states, then rank 0's seal;
        older checkpoints beyond ``keep_last`` are removed."""
        ckpt_dir, tag = self.launch.ckpt_dir, checkpoints.tag_of(self.step)
        self.engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"step": self.step}, save_latest=False,
                                    exclude_frozen_parameters=True)
        state = {"step": self.step, "rng": _rng_state(), "skipped": self.skipped,
                 "loader": self.loader.state_dict() if self.loader is not None else None}
        write_file(checkpoints.state_file(ckpt_dir / tag, self.rank), lambda p: torch.save(state, p))
        torch.distributed.barrier()
        if self.rank == 0:
            checkpoints.seal(ckpt_dir / tag, self.step, self.launch.world)
            checkpoints.clean(ckpt_dir, checkpoints.read_seal(ckpt_dir / tag), self.opts.keep_last)
        torch.distributed.barrier()

    def _choose_checkpoint(self) -> checkpoints.Sealed | None:
        """The newest complete checkpoint; rank 0 removes what does not count and cuts the metrics log back to it."""
        launch = self.launch
        sealed = checkpoints.newest_complete(launch.ckpt_dir)
        torch.distributed.barrier()  # every rank has chosen before rank 0 removes what does not count
        if self.rank == 0:
            checkpoints.clean(launch.ckpt_dir, sealed, self.opts.keep_last)
            _cut_metrics(self.window.path, sealed.step if sealed else 0)
        torch.distributed.barrier()
        return sealed

    def resume(self) -> int:
        """Continue from the newest complete checkpoint (engine, loader, RNG states, the metrics log cut back to
        its step); without one, start from step 0 and say so (a requeued job passes --resume on every launch).
        A checkpoint of another number of ranks continues the same run: the engine through DeepSpeed's
        universal checkpoint, the loader re-sharded (no cell of the epoch skipped or seen twice), each rank that
        existed before with its own RNG states. Returns the step to continue from."""
        sealed, launch = self.resume_from, self.launch
        if sealed is None:
            log.warning("%s: --resume: no complete checkpoint in %s; starting from step 0", self.name,
                        launch.ckpt_dir)
            return 0
        path, client = self.engine.load_checkpoint(str(self.load_dir), tag=sealed.tag, load_module_strict=False)
        if path is None:
            raise ScmmError(f"--resume: cannot load checkpoint {sealed.folder}")
        own = self._rank_state(sealed, min(self.rank, sealed.world - 1))
        if self.loader is not None:
            if sealed.world == launch.world and self.loader.same_streams(own["loader"]):
                self.loader.load_state_dict(own["loader"])
            else:
                self.loader.reshard([self._rank_state(sealed, r)["loader"] for r in range(sealed.world)])
        if self.rank < sealed.world:
            _set_rng_state(own["rng"])
        self.step, self.skipped = int(client["step"]), int(own.get("skipped", 0))
        how = "" if sealed.world == launch.world else f", written by {sealed.world} ranks, now {launch.world}"
        log.info("%s: resumed from %s (step %d%s)", self.name, sealed.folder, self.step, how)
        return self.step

    @staticmethod
    def _rank_state(sealed: checkpoints.Sealed, rank: int) -> dict:
        path = checkpoints.state_file(sealed.folder, rank)
        try:
            return torch.load(path, weights_only=False)
        except (OSError, RuntimeError, EOFError) as exc:
            raise ScmmError(f"--resume: cannot read {path} ({exc})") from None

    # --- export -----------------------------------------------------------------------------------
    def load_trained_state(self, model: torch.nn.Module) -> torch.nn.Module:
        """Load the trained weights into ``model`` (a fresh copy of the trained model, on rank 0): the fp32 weights
        consolidated from the last checkpoint under ZeRO (stages 1-3), else the trained model's own.
        Every trained parameter and buffer must be there; frozen weights stay as the fresh model has them."""
        if self.launch is None or self.engine.zero_optimization_stage() == 0:
            # no ZeRO: this process holds the trained fp32 weights themselves (bf16 weights need ZeRO, see above)
            state = {k: v.detach() for k, v in self.model.state_dict().items()}
        else:
            from deepspeed.utils import zero_to_fp32  # noqa: PLC0415 - see _deepspeed_engine
            state = zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(str(self.launch.ckpt_dir))
        own = model.state_dict()
        params = dict(model.named_parameters())
        needed = {k for k in own if k not in params} | {k for k, p in self.model.named_parameters() if p.requires_grad}
        missing = sorted(needed - set(state))
        if missing:
            raise RuntimeError(f"{self.name}: the trained state lacks {missing[:5]}")
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items() if k in own},
                              strict=False)
        return model

    def close(self) -> None:
        """End a DeepSpeed launch: every rank waits for the others, then leaves the process group."""
        if self.launch is not None:
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()

    def run(self, batches: Iterator[dict], forward: Forward, export: Callable[[dict], None], *,
            stop_at: int | None = None) -> dict:
        """The end of every stage script: :meth:`fit`, then ``export(last metrics)`` on rank 0 when the run has
        reached its last step (not when it stopped early for ``stop_at``), then :meth:`close`."""
        last = self.fit(batches, forward, stop_at=stop_at)
        if (self.launch is None or self.launch.rank == 0) and self.finished:
            export(last)
        self.close()
        return last


# --- the scripts' command line ----------------------------------------------------------------------
def script_main(description: str, load_config: Callable[[str], Any], train: Callable[..., dict],
                argv: list[str] | None = None) -> int:
    """The command line of a training script run by a launcher (``deepspeed``, ``torchrun``) or alone:
    ``--config FILE [--resume] [--deepspeed_config JSON] [--stop-at STEP]``; bad input is one ``error:`` line."""
    parser = argparse.ArgumentParser(description=description)
    add_training_options(parser)
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the launcher
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        run_training(args, load_config, train)
    except TrainingStopped as exc:
        sys.stderr.write(f"{exc}\n")
        return EXIT_STOPPED
    except ScmmError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    except OSError as exc:  # a folder that cannot be written, a full disk, ...
        sys.stderr.write(f"error: {exc.strerror or exc}{f': {exc.filename}' if exc.filename else ''}\n")
        return 2
    return 0
