"""A small from-scratch causal LM for offline demos: `scmm finetune init-lm --config FILE`.

Stage 2 wants an LLM; on a cluster that is a pretrained checkpoint folder, offline it is this: a sentencepiece
BPE tokenizer and a small Llama trained briefly as a causal LM on the corpus's train-split descriptions plus the
Cell Ontology (every term's label, synonyms and definition) and the corpus's tissue and disease labels. The
result is an ordinary HF model folder (config, weights, tokenizer) that `model.llm.load_lm` reads, written
atomically, with `init_lm_summary.json` (loss curve, tokens/s).
"""
from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from scmm.atomic import write_folder
from scmm.config import load_yaml
from scmm.data_pipeline.instructions import PROMPTS
from scmm.data_pipeline.ontology import get_ontology
from scmm.data_pipeline.store import Corpus
from scmm.errors import ScmmError
from scmm.model.llm import LlamaSize, build_llama, optimizer_param_groups, train_tokenizer
from scmm.pretrain.engine import Trainer, TrainOptions

__all__ = ["TokenizerOptions", "PackingOptions", "InitLMConfig", "load_config", "lm_texts", "pack", "init_lm",
           "SUMMARY_NAME"]

log = logging.getLogger(__name__)
SUMMARY_NAME = "init_lm_summary.json"


@dataclass
class TokenizerOptions:
    vocab_size: int = 6000

    def __post_init__(self) -> None:
        if self.vocab_size < 300:
            raise ValueError("vocab_size must be >= 300 (256 byte-fallback pieces + specials + merges)")


@dataclass
class PackingOptions:
    """Each step trains on ``batch_size`` rows of ``seq_len`` tokens of documents packed back to back."""

    batch_size: int = 8
    seq_len: int = 128

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.seq_len < 8:
            raise ValueError("data.batch_size must be >= 1 and seq_len >= 8")


@dataclass
class LMTrainOptions(TrainOptions):
    """The engine's options with the small LLM's defaults. It trains in this process (no DeepSpeed): bf16
    autocast, measured 1.3-1.5x faster per step than fp32 on this project's CPU (BENCHMARKS.md)."""

    steps: int = 100
    lr: float = 2e-3
    warmup_steps: int = 10
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.95)
    fused_adamw: bool = True
    precision: str = "autocast-bf16"


@dataclass
class InitLMConfig:
    corpus: str
    out: str
    seed: int = 0
    tokenizer: TokenizerOptions = field(default_factory=TokenizerOptions)
    model: LlamaSize = field(default_factory=LlamaSize)
    data: PackingOptions = field(default_factory=PackingOptions)
    train: LMTrainOptions = field(default_factory=LMTrainOptions)


def load_config(path: str | Path) -> InitLMConfig:
    """Strict YAML -> InitLMConfig (unknown keys are errors)."""
    return load_yaml(path, InitLMConfig)


# --- texts --------------------------------------------------------------------------------------------------
def lm_texts(corpus: Corpus) -> tuple[list[str], list[str]]:
    """(documents to train the LM on, extra lines for the tokenizer only).

    Documents: every train-split description; per Cell Ontology term "label. definition" and "label is also
    called s1, s2."; the corpus's tissue and disease labels; the instruction prompts. The tokenizer also sees
    every name alone, so each label and synonym has compact tokens.
    """
    docs: list[str] = []
    names: list[str] = []
    extra_labels: set[str] = set()
    for shard in corpus.iter_shards("train", columns=("text", "tissue", "disease")):
        docs.extend(str(t) for t in shard.obs["text"] if str(t).strip())
        for col in ("tissue", "disease"):
            extra_labels.update(str(v) for v in shard.obs[col] if str(v).strip() and str(v) not in ("unknown", "na"))
    terms = get_ontology()._parser.cxg_schema.ontology("CL")
    for meta in terms.values():
        if meta.get("deprecated", False):
            continue
        label = " ".join(str(meta["label"]).split())
        definition = " ".join((meta.get("description") or "").split())
        synonyms = [" ".join(s.split()) for s in meta.get("synonyms", [])]
        docs.append(f"{label}. {definition}" if definition else f"{label}.")
        if synonyms:
            docs.append(f"{label} is also called {', '.join(synonyms)}.")
        names += [label, *synonyms]
    docs += sorted(extra_labels)
    docs += [p for prompts in PROMPTS.values() for p in prompts]
    return docs, names + sorted(extra_labels)


def pack(token_docs: list[list[int]], bos: int, eos: int, seq_len: int, seed: int) -> torch.Tensor:
    """Documents (shuffled with `seed`) as `<bos> doc <eos>` back to back, cut into rows of `seq_len` tokens
    (the incomplete last row dropped): LongTensor [n_rows, seq_len]."""
    order = np.random.default_rng(seed).permutation(len(token_docs))
    stream: list[int] = []
    for i in order:
        stream += [bos, *token_docs[i], eos]
    n_rows = len(stream) // seq_len
    if n_rows == 0:
        raise ScmmError(f"the texts hold {len(stream)} tokens, fewer than one sequence of {seq_len}")
    return torch.tensor(stream[: n_rows * seq_len], dtype=torch.long).view(n_rows, seq_len)


# --- training -----------------------------------------------------------------------------------------------
def init_lm(cfg: InitLMConfig, progress: bool = True) -> Path:
    """Train the tokenizer and the small Llama, write the model folder to `cfg.out` atomically; returns it."""
    t0 = time.perf_counter()
    corpus = Corpus(cfg.corpus)
    torch.manual_seed(cfg.seed)
    docs, names = lm_texts(corpus)
    with tempfile.TemporaryDirectory() as tmp:
        tok_dir = Path(tmp) / "tokenizer"
        tokenizer = train_tokenizer(docs + names, tok_dir, cfg.tokenizer.vocab_size)
        t_tok = time.perf_counter() - t0
        token_docs = tokenizer(docs, add_special_tokens=False)["input_ids"]
        rows = pack(token_docs, tokenizer.bos_token_id, tokenizer.eos_token_id, cfg.data.seq_len, cfg.seed)
        model = build_llama(cfg.model, len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        n_params = sum(p.numel() for p in model.parameters())
        log.info("init-lm: vocab %d, %.1fM parameters, %d documents -> %d sequences of %d tokens",
                 len(tokenizer), n_params / 1e6, len(docs), rows.shape[0], cfg.data.seq_len)
        trainer = Trainer(model, cfg.train, name="init-lm", loss_keys=(), rate_key="tokens_per_s",
                          param_groups=optimizer_param_groups(model, cfg.train.weight_decay), progress=progress)
        start = time.perf_counter()
        trainer.fit(_batches(rows, cfg.data.batch_size, cfg.seed), lambda m, batch, step: {
            "loss": m(input_ids=batch, labels=batch).loss}, items=lambda batch: (batch.numel(), []))
        t_train = time.perf_counter() - start
        model.eval()
        curve = [line["loss"] for line in trainer.history]

        def write(folder: Path) -> None:
            model.save_pretrained(str(folder))
            tokenizer.save_pretrained(str(folder))
            shutil.copyfile(tok_dir / "tokenizer.model", folder / "tokenizer.model")
            summary = {
                "steps": cfg.train.steps, "initial_loss": curve[0], "final_loss": curve[-1],
                "loss_curve": [round(x, 4) for x in curve], "log_every": cfg.train.log_every,
                "tokens_per_s": cfg.train.steps * rows.shape[1] * cfg.data.batch_size / max(t_train, 1e-9),
                "train_s": t_train, "tokenizer_s": t_tok, "total_s": time.perf_counter() - t0,
                "vocab_size": len(tokenizer), "n_params": n_params, "n_documents": len(docs),
                "n_sequences": int(rows.shape[0]), "precision": cfg.train.precision, "config": asdict(cfg),
            }
            (folder / SUMMARY_NAME).write_text(json.dumps(summary, indent=1) + "\n")

        return write_folder(cfg.out, write, marker="config.json")


def _batches(rows: torch.Tensor, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Random packed rows, ``batch_size`` at a time, each epoch a new seeded permutation."""
    gen = torch.Generator().manual_seed(seed)
    batch_size = min(batch_size, rows.shape[0])
    while True:
        order = torch.randperm(rows.shape[0], generator=gen)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield rows[order[start:start + batch_size]]
