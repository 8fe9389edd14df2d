"""Stage 1: cell–text alignment pretraining under DeepSpeed.

    scmm pretrain --config configs/stage1_demo.yaml [--resume]
    deepspeed pretrain/train.py --config FILE --deepspeed_config configs/deepspeed/zero2.json
    torchrun --standalone --nproc_per_node 2 pretrain/train.py --config FILE

The script reads top to bottom: set up the launch, build the corpus loader and the model, hand both to the
training engine (:mod:`scmm.pretrain.engine`: DeepSpeed, the step loop, metrics, checkpoints and exact resume),
then export the consolidated fp32 weights to ``<out>/model/``, a folder that loads without DeepSpeed and carries
the gene vocabulary and the cell encoding the model was trained with.
"""
from __future__ import annotations

import json
import logging
import sys
from dataclasses import asdict, dataclass, field

import torch

from scmm.config import load_yaml
from scmm.data_pipeline.encoding import CellEncoding
from scmm.data_pipeline.loader import CorpusLoader, LoaderConfig
from scmm.data_pipeline.store import Corpus
from scmm.data_pipeline.vocab import GeneVocab
from scmm.eval.annotate import corpus_label_texts, zero_shot_accuracy
from scmm.model.aligner import AlignerConfig, CellTextAligner
from scmm.pretrain.engine import Trainer, TrainOptions, endless_batches, script_main, start_run

log = logging.getLogger("scmm.pretrain")
LOSS_KEYS = ("contrastive", "matching", "reconstruction")


@dataclass
class Stage1Config:
    """A stage-1 run (the YAML file): data, model, how cells are encoded, batching and optimisation."""

    corpus: str
    out: str
    name: str = "stage1"
    seed: int = 0
    deepspeed: str | None = None  # DeepSpeed JSON (ZeRO stage, ...); None: configs/deepspeed/zero2.json
    model: AlignerConfig = field(default_factory=AlignerConfig)
    encoding: CellEncoding = field(default_factory=CellEncoding)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    train: TrainOptions = field(default_factory=TrainOptions)


def load_config(path: str) -> Stage1Config:
    return load_yaml(path, Stage1Config)


def train(cfg: Stage1Config, resume: bool = False, deepspeed_json: str | None = None,
          stop_at: int | None = None) -> dict:
    """Run stage 1; returns the last logged metrics (rank 0).

    ``stop_at`` ends this launch after that step with a checkpoint (for time-limited cluster jobs); ``resume``
    continues from the latest checkpoint.
    """
    corpus = Corpus(cfg.corpus)  # before any process group starts
    vocab = GeneVocab.load(corpus.path)
    launch = start_run(cfg.out, resume, cfg.train.threads)
    loader = CorpusLoader(corpus, "train", cfg.loader, cfg.encoding, vocab, rank=launch.rank,
                          world_size=launch.world)

    torch.manual_seed(cfg.seed)
    model = CellTextAligner(cfg.model, vocab, cfg.encoding)
    model.set_text_center(corpus_label_texts(corpus))  # a checkpoint restores it too (it is a buffer)
    trainer = Trainer(model, cfg.train, name="stage1", launch=launch, deepspeed=deepspeed_json or cfg.deepspeed,
                      micro_batch=cfg.loader.batch_size, loader=loader, loss_keys=LOSS_KEYS,
                      metrics_path=launch.out / "metrics.jsonl")
    trainer.begin(asdict(cfg), resume, f"{corpus.manifest['splits']['train']} train cells, "
                                       f"{len(loader)} batches/epoch/rank")

    def forward(engine, batch: dict, step: int) -> dict:
        return engine(batch, step=step, rank=launch.rank, world_size=launch.world, seed=cfg.seed)

    return trainer.run(endless_batches(loader), forward, lambda last: export(cfg, trainer, corpus, vocab, last),
                       stop_at=stop_at)


def export(cfg: Stage1Config, trainer: Trainer, corpus: Corpus, vocab: GeneVocab, last: dict) -> None:
    """Write ``<out>/model`` from the consolidated weights, with the val split's zero-shot accuracy."""
    folder = trainer.launch.out / "model"
    model = trainer.load_trained_state(CellTextAligner(cfg.model, vocab, cfg.encoding))
    model.save_pretrained(folder, corpus=corpus)  # with the corpus's gene panel and labels: self-contained
    acc = zero_shot_accuracy(CellTextAligner.from_pretrained(folder), corpus, "val")
    (folder / "train_summary.json").write_text(json.dumps({"val_zero_shot_accuracy": acc, **last}))
    log.info("exported the stage-1 model to %s; zero-shot cell-type accuracy on the val split: %.3f", folder, acc)


def main(argv: list[str] | None = None) -> int:
    return script_main("scmm stage 1: cell–text alignment pretraining", load_config, train, argv)


if __name__ == "__main__":
    sys.exit(main())
