"""Stage 2: the LLM bridge (cell -> text instructions, text -> cell pseudo-cells) under DeepSpeed.

    scmm finetune --config configs/stage2_demo.yaml [--resume]
    deepspeed finetune/train.py --config FILE --deepspeed_config configs/deepspeed/zero3.json
    torchrun --standalone --nproc_per_node 2 finetune/train.py --config FILE

Same conventions as stage 1 (:mod:`pretrain.train`, whose helpers this reuses): a DeepSpeed engine with a
torch AdamW client optimizer on CPU, checkpoints holding the engine plus each rank's loader position and RNG
states (``--resume`` continues exactly), ``metrics.jsonl`` (each loss on its own), tqdm, and at the end the
consolidated fp32 weights exported to ``<out>/model/`` with :meth:`Stage2Model.save_pretrained`, after the
pseudo-cell decoder is refitted on the final LLM's mapped states (:mod:`finetune.refit`, rank 0; the other
ranks wait at the closing barrier, so keep ``refit.steps`` well inside the process group's timeout).

Each training cell is paired with one instruction (task and template chosen deterministically from the seed,
the step and the cell's place in the batch) and with its own description for the text -> cell path; its
target profile is its log1p-CP10k expression over the HVG panel of the training split.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from scmm.data_pipeline.loader import CorpusLoader, LoaderConfig
from scmm.data_pipeline.store import Corpus
from scmm.model.stage2 import LOSSES, LossWeights, Stage2Model, Stage2ModelConfig
from scmm.finetune.refit import RefitOptions, refit_decoder
from scmm.model.bridge import BridgeOptions
from scmm.model.llm import LoraOptions
from scmm.pretrain.train import (MetricsWindow, TrainOptions, deepspeed_config, endless_batches, load_checkpoint,
                            lr_lambda, save_checkpoint, start_run, use_deepspeed_optimizer)
from scmm.config import load_yaml
from scmm.errors import ScmmError

log = logging.getLogger("scmm.finetune")


@dataclass
class HvgOptions:
    n_top: int = 2000  # highly variable genes of the training split: the pseudo-cell gene panel


@dataclass
class DataOptions:
    tasks: list[str] = field(default_factory=lambda: ["describe", "cell_type", "tissue"])
    max_length: int = 256  # LLM tokens per sequence
    task_weights: list[float] = field(default_factory=list)  # sampling weight per task (empty: uniform)


@dataclass
class Stage2LoaderOptions:
    """Batching of stage 2; how values are encoded always comes from the stage-1 model's loader.json."""

    batch_size: int = 16
    shuffle: bool = True
    shuffle_buffer: int = 4096
    seed: int = 0
    num_workers: int = 0


@dataclass
class Stage2Config:
    corpus: str
    stage1: str  # stage-1 model folder (e.g. runs/demo/stage1/model)
    lm: str  # base LLM folder (e.g. runs/demo/lm from `scmm finetune init-lm`)
    out: str
    name: str = "stage2"
    seed: int = 0
    deepspeed: str | None = None
    train_stage1: str = "none"  # none (frozen, default) | qformer | all
    lm_dtype: str = "float32"
    lora: LoraOptions = field(default_factory=LoraOptions)
    bridge: BridgeOptions = field(default_factory=BridgeOptions)
    hvg: HvgOptions = field(default_factory=HvgOptions)
    data: DataOptions = field(default_factory=DataOptions)
    loss: LossWeights = field(default_factory=LossWeights)
    loader: Stage2LoaderOptions = field(default_factory=Stage2LoaderOptions)
    train: TrainOptions = field(default_factory=TrainOptions)
    refit: RefitOptions = field(default_factory=RefitOptions)  # the decoder refit after the loop (finetune/refit.py)

    def model_config(self) -> Stage2ModelConfig:
        return Stage2ModelConfig(lora=asdict(self.lora), bridge=self.bridge, loss=self.loss,
                                 max_length=self.data.max_length, train_stage1=self.train_stage1,
                                 lm_dtype=self.lm_dtype)


def load_config(path: str) -> Stage2Config:
    cfg = load_yaml(path, Stage2Config)
    try:
        cfg.model_config()
    except ValueError as exc:
        raise ScmmError(f"config {path}: {exc}") from None
    return cfg


# --- data -----------------------------------------------------------------------------------------
def stage1_loader_config(stage1: str | Path, opts: Stage2LoaderOptions | None = None, **overrides) -> LoaderConfig:
    """The stage-1 model's loader settings (value encoding), with stage 2's batching."""
    path = Path(stage1) / "loader.json"
    base = json.loads(path.read_text()) if path.is_file() else {}
    cfg = LoaderConfig(**base)
    if opts is not None:
        for k, v in asdict(opts).items():
            setattr(cfg, k, v)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def hvg_info(corpus: Corpus, n_top: int) -> dict:
    """The gene panel: sorted corpus gene indices of the training split's HVGs, with symbols and vocab ids."""
    from scmm.data_pipeline.hvg import hvg_panel
    idx = hvg_panel(corpus, n_top=n_top, split="train")
    return {"indices": idx.tolist(), "symbols": [str(s) for s in corpus.gene_symbols[idx]],
            "vocab_ids": [int(i) for i in corpus.gene_vocab_ids[idx]]}


class PairBuilder:
    """Loader batches -> stage-2 batches: an instruction per cell, its description, its target HVG profile."""

    def __init__(self, corpus: Corpus, split: str, tasks: list[str], seed: int, genes: np.ndarray, builder,
                 task_weights: list[float] | None = None):
        from scmm.data_pipeline.hvg import log1p_profiles
        from scmm.data_pipeline.instructions import instruction_dataset
        if task_weights and (len(task_weights) != len(tasks) or min(task_weights) < 0 or sum(task_weights) <= 0):
            raise ScmmError(f"data.task_weights needs one non-negative weight per task ({len(tasks)}), "
                            f"got {task_weights}")
        weight = dict(zip(tasks, task_weights)) if task_weights else {t: 1.0 for t in tasks}
        ds = instruction_dataset(corpus, split, tasks, seed)
        self.rows: dict[str, list[tuple[str, str, float]]] = {}
        for cid, task, prompt, answer in zip(ds["cell_id"], ds["task"], ds["prompt"], ds["answer"]):
            if weight[task] > 0:
                self.rows.setdefault(str(cid), []).append((prompt, answer, weight[task]))
        x, ids, _ = log1p_profiles(corpus, split, genes)
        self.profiles = {c: i for i, c in enumerate(ids)}
        self.x = torch.from_numpy(x)
        # each profile's description (the text -> cell input), as an index into the distinct descriptions
        pool: dict[str, int] = {}
        text_of = {str(c): pool.setdefault(str(t), len(pool))
                   for shard in corpus.iter_shards(split, columns=("cell_id", "text"))
                   for c, t in zip(shard.obs["cell_id"], shard.obs["text"])}
        self.text_pool = list(pool)
        self.text_index = torch.tensor([text_of[c] for c in ids], dtype=torch.long)
        self.seed, self.builder = seed, builder

    def __call__(self, batch: dict, step: int, rank: int) -> dict:
        c2t, texts, rows = [], {}, []
        index = []
        for i, (cid, text) in enumerate(zip(batch["cell_id"], batch["text"])):
            options = self.rows.get(str(cid))
            if not options:
                raise ScmmError(f"cell {cid} has no instruction")
            p = np.array([w for _, _, w in options])
            pick = np.random.default_rng([self.seed, step, rank, i]).choice(len(options), p=p / p.sum())
            prompt, answer, _ = options[pick]
            c2t.append(self.builder.cell_to_text(prompt, answer))
            index.append(texts.setdefault(str(text), len(texts)))  # each distinct description runs once
            rows.append(self.profiles[str(cid)])
        out = {k: batch[k] for k in ("gene_ids", "values", "padding_mask")}
        out["c2t"] = self.builder.collate(c2t, padding_side="right")
        out["t2c"] = self.builder.collate([self.builder.text_to_cell(t) for t in texts], padding_side="right")
        out["t2c_index"] = torch.tensor(index, dtype=torch.long)
        out["hvg"] = self.x[rows]
        return out


# --- export ---------------------------------------------------------------------------------------
def export_model(cfg: Stage2Config, hvg: dict, ckpt_dir: Path, out: Path, pairs: PairBuilder | None = None,
                 device: torch.device | None = None) -> tuple[Stage2Model, dict]:
    """Consolidate the fp32 trained weights of the last checkpoint (any ZeRO stage), refit the decoder on the
    training pairs (``cfg.refit``, on ``device``) when ``pairs`` is given, and write the stage-2 folder.
    Returns the model and the refit summary (empty without a refit)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir))
    model = Stage2Model.build(cfg.model_config(), cfg.stage1, cfg.lm, hvg)
    own = model.state_dict()
    state = {k: v.float() for k, v in state.items() if k in own}
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted((trained | {"qnorm.mean", "qnorm.std"}) - set(state))
    if missing:
        raise RuntimeError(f"export: the checkpoint lacks trained weights {missing[:5]}")
    model.load_state_dict(state, strict=False)
    summary = {}
    if pairs is not None and cfg.refit.steps > 0:
        model.to(device or torch.device("cpu"))
        out.parent.mkdir(parents=True, exist_ok=True)
        summary = refit_decoder(model, pairs.text_pool, pairs.text_index, pairs.x, cfg.refit, cfg.seed,
                                cfg.bridge.nll_weight, log_path=out.parent / "decoder_refit.jsonl")
        log.info("decoder refit: decode_llm %.4f (first %d steps) -> %.4f (last %d), %d distinct descriptions",
                 summary["first_window"], cfg.refit.log_every, summary["last_window"], cfg.refit.log_every,
                 summary["distinct_texts"])
        model.to(torch.device("cpu"))
    model.save_pretrained(out)
    return model, summary


# --- the loop -------------------------------------------------------------------------------------
def train(cfg: Stage2Config, resume: bool = False, deepspeed_json: str | None = None,
          stop_at: int | None = None) -> dict:
    """Run stage 2; returns the last logged metrics (rank 0)."""
    for what, path in (("corpus", cfg.corpus), ("stage-1 model", cfg.stage1), ("LLM", cfg.lm)):
        if not Path(path).is_dir():
            hint = " (run `scmm finetune init-lm` first)" if what == "LLM" else ""
            raise ScmmError(f"{what} folder not found: {path}{hint}")
    rank, world, device, out, ckpt_dir = start_run(cfg.out, resume, cfg.train.threads)
    import deepspeed
    from tqdm.auto import tqdm
    t = cfg.train
    corpus = Corpus(cfg.corpus)
    loader_cfg = stage1_loader_config(cfg.stage1, cfg.loader, drop_last=True)
    vocab = json.loads((Path(cfg.stage1) / "cell_tower" / "vocab.json").read_text())
    loader = CorpusLoader(corpus, "train", loader_cfg, vocab["<cls>"], vocab["<pad>"], rank=rank, world_size=world)
    hvg = hvg_info(corpus, cfg.hvg.n_top)

    torch.manual_seed(cfg.seed)
    model = Stage2Model.build(cfg.model_config(), cfg.stage1, cfg.lm, hvg)
    pairs = PairBuilder(corpus, "train", cfg.data.tasks, cfg.seed, np.asarray(hvg["indices"]), model.builder,
                        cfg.data.task_weights)
    model.decoder.init_from_profiles(pairs.x)
    if cfg.bridge.standardize:
        stats_cfg = stage1_loader_config(cfg.stage1, None, shuffle=False, drop_last=False, batch_size=64)
        stats_loader = CorpusLoader(corpus, "train", stats_cfg, vocab["<cls>"], vocab["<pad>"])
        model.set_query_stats([b for b, _ in zip(stats_loader, range(4))])  # the first 256 training cells
    if t.activation_checkpointing:
        from scmm.model.stage2 import _unwrap
        _unwrap(model.lm).gradient_checkpointing_enable()
    groups = model.param_groups(t.weight_decay, t.lr)
    optimizer = None if use_deepspeed_optimizer(t) else torch.optim.AdamW(groups, lr=t.lr, betas=(0.9, 0.98), eps=1e-8)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, model_parameters=groups if optimizer is None else None,
        config=deepspeed_config(cfg, deepspeed_json, world),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(t)))
    step = load_checkpoint(engine, ckpt_dir, loader, rank) if resume else 0
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(asdict(cfg), indent=1))
        n_params = sum(p.numel() for p in model.parameters())
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        log.info("stage 2: %d ranks, %s, %.1fM parameters (%.2fM trained), %d HVGs, %d train cells, "
                 "%d batches/epoch/rank", world, t.precision, n_params / 1e6, n_train / 1e6, len(hvg["indices"]),
                 corpus.manifest["splits"]["train"], len(loader))

    batches = endless_batches(loader)

    bar = tqdm(total=t.steps, initial=step, desc="stage 2", unit="step", disable=rank != 0 or None)
    window = MetricsWindow(("loss", *LOSSES), "samples_per_s", "stage2", out / "metrics.jsonl", rank)
    last = {}
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=t.precision == "autocast-bf16")
    engine.train()
    while step < t.steps:
        lr = scheduler.get_last_lr()[0]
        for _ in range(t.grad_accum):
            raw = next(batches)
            batch = pairs(raw, step, rank)
            with autocast:
                losses = engine(batch)
            engine.backward(losses["loss"])
            engine.step()
            window.add(losses, raw["cell_id"])
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
        (out / "decoder_refit.jsonl").unlink(missing_ok=True)  # an interrupted export's refit starts again
        _, refit = export_model(cfg, hvg, ckpt_dir, out / "model", pairs, device)
        (out / "model" / "train_summary.json").write_text(json.dumps({**last, "decoder_refit": refit}))
        log.info("exported the stage-2 model to %s", out / "model")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    return last


def main_from_cli(args) -> int:
    """`scmm finetune --config FILE [--resume] [--deepspeed_config JSON] [--stop-at N]`."""
    train(load_config(args.config), resume=bool(getattr(args, "resume", False)),
          deepspeed_json=getattr(args, "deepspeed_config", None), stop_at=getattr(args, "stop_at", None))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="scmm stage 2: LLM bridge fine-tuning")
    parser.add_argument("--config", required=True)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--deepspeed_config", default=None, help="DeepSpeed JSON (overrides the config's)")
    parser.add_argument("--stop-at", type=int, default=None, help="end this launch after that step (checkpointed)")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        main_from_cli(args)
    except ScmmError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
