"""The demo's speed levers, each side by side in one process, interleaved (needs `make demo`'s outputs).

* stage 1: a training step (forward, backward, AdamW) of the demo config with the Q-Former's token embedding table
  trained (the old default) and kept as the text tower's (``qformer.freeze_word_embeddings``), on the same batches;
* stage 2: a training step of the demo config (fresh bridge and LoRA on the demo's stage-1 model and LLM) with the
  cell -> text sequences as one padded batch and as two groups of similar length (``_grouped_answer_loss``), and
  the same for the text -> cell sequences (``_grouped_slot_states``: a cell's caption beside short program queries);
* inference: the stage-2 model's generation (cell-type answers and descriptions of the demo's test cells) with the
  LoRA adapter kept (three matmuls per projection) and folded into the LLM (``merge_lora``), same text checked.

    python benchmarks/bench_demo_levers.py [--steps 12] [--rounds 3]
"""
from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch

from common import record
from scmm.data_pipeline.loader import CorpusLoader
from scmm.data_pipeline.store import Corpus
from scmm.data_pipeline.vocab import GeneVocab
from scmm.eval.annotate import corpus_label_texts
from scmm.eval.stage2 import describe_split
from scmm.model.aligner import CellTextAligner
from scmm.model.stage2 import Stage2Model
from scmm.pretrain.train import load_config


def stage1_step_times(steps: int, rounds: int) -> dict[str, float]:
    cfg = load_config("configs/stage1_demo.yaml")
    corpus = Corpus(cfg.corpus)
    vocab = GeneVocab.load(corpus.path)
    batches = [b for b, _ in zip(CorpusLoader(corpus, "train", cfg.loader, cfg.encoding, vocab), range(steps))]
    models, opts = {}, {}
    for name, freeze in (("trained", False), ("frozen", True)):
        torch.manual_seed(0)
        mcfg = replace(cfg.model, qformer=replace(cfg.model.qformer, freeze_word_embeddings=freeze))
        model = CellTextAligner(mcfg, vocab, cfg.encoding)
        model.set_text_center(corpus_label_texts(corpus))
        model.train()
        models[name] = model
        opts[name] = torch.optim.AdamW(model.param_groups(0.01, 1e-3), lr=1e-3, foreach=True)
    seconds = {name: 0.0 for name in models}

    def step(name: str, batch: dict) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = models[name](batch)
        out["loss"].backward()
        opts[name].step()
        opts[name].zero_grad(set_to_none=True)

    for name in models:  # warm-up (text cache, allocator)
        step(name, batches[0])
    for _ in range(rounds):
        for batch in batches:
            for name in models:
                t = time.perf_counter()
                step(name, batch)
                seconds[name] += time.perf_counter() - t
    n = rounds * len(batches)
    return {f"stage1_step_ms_{k}": 1e3 * v / n for k, v in seconds.items()}


def stage2_step_times(steps: int, rounds: int) -> dict[str, float]:
    import numpy as np

    from scmm.finetune.pairs import PairBuilder, hvg_info
    from scmm.finetune.train import load_config as load_stage2
    cfg = load_stage2("configs/stage2_demo.yaml")
    corpus = Corpus(cfg.corpus)
    hvg = hvg_info(corpus, cfg.data.n_hvg)
    torch.manual_seed(0)
    model = Stage2Model.build(cfg.model, cfg.stage1, cfg.lm, hvg)
    loader = CorpusLoader(corpus, "train", cfg.loader, model.aligner.encoding, model.aligner.vocab)
    pairs = PairBuilder(corpus, "train", cfg.data.tasks, cfg.seed, np.asarray(hvg["indices"]), model.builder,
                        cfg.data.task_weights)
    batches = [pairs(b, i, 0) for i, (b, _) in enumerate(zip(loader, range(steps)))]
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    grouped_c2t, grouped_t2c = model._grouped_answer_loss, model._grouped_slot_states

    def padded_c2t(c2t, query, cell):  # the former path: every sequence padded to the longest
        embeds = model._embed_with_cells(c2t["input_ids"], c2t["slot_positions"], query, cell)
        return model.answer_loss(embeds, c2t["attention_mask"], c2t["labels"])

    def padded_t2c(t2c):
        return model.slot_states(t2c["input_ids"], t2c["attention_mask"], t2c["slot_positions"])
    variants = {"padded": (padded_c2t, padded_t2c), "grouped": (grouped_c2t, padded_t2c),
                "grouped_both": (grouped_c2t, grouped_t2c)}
    seconds = dict.fromkeys(variants, 0.0)
    for _ in range(rounds):
        for batch in batches:
            for name, (c2t_fn, t2c_fn) in variants.items():
                model._grouped_answer_loss, model._grouped_slot_states = c2t_fn, t2c_fn
                t = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = model(batch)["loss"]
                torch.autograd.backward(loss, inputs=params)
                seconds[name] += time.perf_counter() - t
                for p in params:
                    p.grad = None
    del model._grouped_answer_loss, model._grouped_slot_states
    n = rounds * len(batches)
    return {f"stage2_step_ms_{k}": 1e3 * v / n for k, v in seconds.items()}


def describe_times(rounds: int) -> dict[str, float]:
    corpus = Corpus("runs/demo/corpus")
    models = {name: Stage2Model.from_pretrained("runs/demo/stage2/model", merge_lora=merge)
              for name, merge in (("adapter", False), ("merged", True))}
    seconds, texts = {name: 0.0 for name in models}, {}
    for _ in range(rounds):
        for name, model in models.items():
            t = time.perf_counter()
            out = describe_split(model, corpus, "test")
            seconds[name] += time.perf_counter() - t
            texts[name] = out["descriptions"] + out["type_answers"]
    same = sum(a == b for a, b in zip(texts["adapter"], texts["merged"])) / len(texts["adapter"])
    return {**{f"describe_test_s_{k}": v / rounds for k, v in seconds.items()}, "same_text_share": same}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    figures = {**stage1_step_times(args.steps, args.rounds), **stage2_step_times(args.steps, args.rounds),
               **describe_times(max(1, args.rounds - 1))}
    s1 = figures["stage1_step_ms_trained"] / figures["stage1_step_ms_frozen"]
    s2 = figures["stage2_step_ms_padded"] / figures["stage2_step_ms_grouped"]
    t2 = figures["stage2_step_ms_grouped"] / figures["stage2_step_ms_grouped_both"]
    d = figures["describe_test_s_adapter"] / figures["describe_test_s_merged"]
    print("| lever | before | after | ratio |\n|---|---:|---:|---:|")
    print(f"| stage-1 step (ms): Q-Former token embeddings trained -> frozen | "
          f"{figures['stage1_step_ms_trained']:.0f} | {figures['stage1_step_ms_frozen']:.0f} | {s1:.2f}x |")
    print(f"| stage-2 forward + backward (ms): cell -> text sequences padded as one batch -> two length groups | "
          f"{figures['stage2_step_ms_padded']:.0f} | {figures['stage2_step_ms_grouped']:.0f} | {s2:.2f}x |")
    print(f"| stage-2 forward + backward (ms), then: text -> cell sequences padded as one batch -> two length "
          f"groups | {figures['stage2_step_ms_grouped']:.0f} | {figures['stage2_step_ms_grouped_both']:.0f} | "
          f"{t2:.2f}x |")
    print(f"| describe + answer 70 test cells (s): LoRA adapter -> merged | {figures['describe_test_s_adapter']:.1f} "
          f"| {figures['describe_test_s_merged']:.1f} | {d:.2f}x (same text: {figures['same_text_share']:.3f}) |")
    record("demo_levers", {**figures, "threads": args.threads})


if __name__ == "__main__":
    main()
