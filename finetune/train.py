"""Stage 2: the LLM bridge (cell -> text instructions, text -> cell pseudo-cells) under DeepSpeed.

    scmm finetune --config configs/stage2_demo.yaml [--resume]
    deepspeed finetune/train.py --config FILE --deepspeed_config configs/deepspeed/zero3.json
    torchrun --standalone --nproc_per_node 2 finetune/train.py --config FILE

Same engine as stage 1 (:mod:`scmm.pretrain.engine`). The cells are encoded as the stage-1 model was trained to
read them (its saved cell encoding); each cell becomes an instruction, its description and its target profile
(:class:`~scmm.finetune.pairs.PairBuilder`). After the loop, rank 0 consolidates the weights, refits the pseudo-cell
decoder on the final LLM's mapped states (:mod:`scmm.finetune.refit`; the other ranks wait at the closing barrier,
so keep ``refit.steps`` well inside the process group's timeout) and writes ``<out>/model/``.
"""
from __future__ import annotations

import json
import logging
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from scmm.config import load_yaml
from scmm.data_pipeline.instructions import TASKS
from scmm.data_pipeline.loader import CorpusLoader, LoaderConfig
from scmm.data_pipeline.store import Corpus
from scmm.errors import ScmmError
from scmm.finetune.pairs import PairBuilder, hvg_info
from scmm.finetune.refit import RefitOptions, refit_decoder
from scmm.model.aligner import stage1_vocab
from scmm.model.stage2 import LOSSES, Stage2Config, Stage2Model, reader_info
from scmm.pretrain.engine import Trainer, TrainOptions, endless_batches, script_main, start_run

log = logging.getLogger("scmm.finetune")


@dataclass
class DataOptions:
    tasks: list[str] = field(default_factory=lambda: ["describe", "cell_type", "tissue"])
    task_weights: list[float] = field(default_factory=list)  # sampling weight per task (empty: uniform)
    n_hvg: int = 2000  # highly variable genes of the training split: the pseudo-cell gene panel
    describe_facts: bool = True  # false: describe answers without the caption's per-cell sentence (config_keys.yaml)

    def __post_init__(self) -> None:
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown or not self.tasks:
            raise ValueError(f"data.tasks: unknown task(s) {', '.join(unknown) or '(none given)'} "
                             f"(tasks: {', '.join(TASKS)})")
        if self.task_weights and (len(self.task_weights) != len(self.tasks) or min(self.task_weights) < 0
                                  or sum(self.task_weights) <= 0):
            raise ValueError(f"data.task_weights needs one non-negative weight per task ({len(self.tasks)}), "
                             f"not all zero")
        if self.n_hvg < 1:
            raise ValueError("data.n_hvg must be >= 1")


@dataclass
class Stage2RunConfig:
    """A stage-2 run (the YAML file): the stage-1 model and base LLM it starts from, data, model and optimisation."""

    corpus: str
    stage1: str  # stage-1 model folder (e.g. runs/demo/stage1/model)
    lm: str  # base LLM folder (e.g. runs/demo/lm from `scmm finetune init-lm`)
    out: str
    name: str = "stage2"
    seed: int = 0
    deepspeed: str | None = None
    model: Stage2Config = field(default_factory=Stage2Config)
    data: DataOptions = field(default_factory=DataOptions)
    loader: LoaderConfig = field(default_factory=lambda: LoaderConfig(batch_size=16))
    train: TrainOptions = field(default_factory=TrainOptions)
    refit: RefitOptions = field(default_factory=RefitOptions)  # the decoder refit after the loop


def load_config(path: str) -> Stage2RunConfig:
    return load_yaml(path, Stage2RunConfig)


def train(cfg: Stage2RunConfig, resume: bool = False, deepspeed_json: str | None = None,
          stop_at: int | None = None) -> dict:
    """Run stage 2; returns the last logged metrics (rank 0)."""
    for what, path in (("corpus", cfg.corpus), ("stage-1 model", cfg.stage1), ("LLM", cfg.lm)):
        if not Path(path).is_dir():
            hint = " (run `scmm finetune init-lm` first)" if what == "LLM" else ""
            raise ScmmError(f"{what} folder not found: {path}{hint}")
    corpus = Corpus(cfg.corpus)  # checked before any process group starts: the corpus and the stage-1 vocabulary
    stage1_vocab(cfg.stage1).check_panel(corpus.gene_symbols, corpus.gene_vocab_ids, f"the corpus {corpus.path}")
    launch = start_run(cfg.out, resume, cfg.train.threads)
    hvg = hvg_info(corpus, cfg.data.n_hvg)
    torch.manual_seed(cfg.seed)
    model = Stage2Model.build(cfg.model, cfg.stage1, cfg.lm, hvg, reader=reader_info(corpus))
    loader = CorpusLoader(corpus, "train", cfg.loader, model.aligner.encoding, model.aligner.vocab,
                          rank=launch.rank, world_size=launch.world)
    pairs = PairBuilder(corpus, "train", cfg.data.tasks, cfg.seed, np.asarray(hvg["indices"]), model.builder,
                        cfg.data.task_weights, describe_facts=cfg.data.describe_facts)
    model.decoder.init_from_profiles(pairs.x)
    if cfg.model.bridge.standardize:  # z-space statistics from the first 256 training cells
        stats = CorpusLoader(corpus, "train", LoaderConfig.inference(64), model.aligner.encoding, model.aligner.vocab)
        model.set_query_stats([b for b, _ in zip(stats, range(4))])
    if model.has_context:  # the readers, fitted once on every training cell (the same fit on every rank)
        cells = CorpusLoader(corpus, "train", LoaderConfig.inference(256), model.aligner.encoding, model.aligner.vocab,
                             training=False)  # every expressed gene, as inference reads a cell
        fit = model.fit_readers(cells, pairs.program_scores)
        if "programs" in fit:
            log.info("program reader: R^2 %.3f on %d training cells", fit["programs"]["r2"],
                     fit["programs"]["n_cells"])
        if "markers" in fit:
            log.info("marker reader: %d genes can be markers (%d training cells)", fit["markers"]["n_eligible"],
                     fit["markers"]["n_cells"])
        pairs.contexts = {str(c): t for b in cells for c, t in zip(b["cell_id"], model.cell_contexts(b))}
    trainer = Trainer(model, cfg.train, name="stage2", launch=launch, deepspeed=deepspeed_json or cfg.deepspeed,
                      micro_batch=cfg.loader.batch_size, loader=loader, loss_keys=LOSSES, rate_key="samples_per_s",
                      metrics_path=launch.out / "metrics.jsonl")
    trainer.begin(asdict(cfg), resume, f"{len(hvg['indices'])} HVGs, {corpus.manifest['splits']['train']} train "
                                       f"cells, {len(loader)} batches/epoch/rank")

    def forward(engine, batch: dict, step: int) -> dict:
        sequences = pairs(batch, step, launch.rank)
        out = engine(sequences)
        out["tokens"] = int(sequences["c2t"]["attention_mask"].sum() + sequences["t2c"]["attention_mask"].sum())
        return out

    return trainer.run(endless_batches(loader), forward, lambda last: export(cfg, trainer, corpus, hvg, pairs, last),
                       stop_at=stop_at)


def export(cfg: Stage2RunConfig, trainer: Trainer, corpus: Corpus, hvg: dict, pairs: PairBuilder, last: dict) -> None:
    """Write ``<out>/model``: the consolidated weights, with the decoder refitted on the final LLM (``cfg.refit``),
    and the corpus's gene panel and labels (the folder is self-contained)."""
    out = trainer.launch.out
    model = Stage2Model.build(cfg.model, cfg.stage1, cfg.lm, hvg, reader=reader_info(corpus))
    model = trainer.load_trained_state(model)
    (out / "decoder_refit.jsonl").unlink(missing_ok=True)  # an interrupted export's refit starts again
    refit = {}
    if cfg.refit.steps > 0:
        model.to(trainer.launch.device)
        refit = refit_decoder(model, *pairs.refit_data(), cfg.refit, cfg.seed,
                              cfg.model.bridge.nll_weight, log_path=out / "decoder_refit.jsonl")
        log.info("decoder refit: decode_llm %.4f (first window) -> %.4f (last), %d distinct descriptions",
                 refit["first_window"], refit["last_window"], refit["distinct_texts"])
        model.to(torch.device("cpu"))
    model.save_pretrained(out / "model", corpus=corpus)
    (out / "model" / "train_summary.json").write_text(json.dumps({**last, "decoder_refit": refit}))
    log.info("exported the stage-2 model to %s", out / "model")


def main(argv: list[str] | None = None) -> int:
    return script_main("scmm stage 2: LLM bridge fine-tuning", load_config, train, argv)


if __name__ == "__main__":
    sys.exit(main())
