"""What `scmm describe --cell-type` adds to `scmm describe`: the LLM's scored answer over the candidate labels
(one teacher-forced pass per label) beside the description (autoregressive generation), on the same batches.

Interleaved per batch in one process (the machine's load moves both alike); prints seconds per cell of each and
their ratio, and appends them to benchmarks/results.jsonl.

    python benchmarks/bench_llm_answers.py [--model runs/demo/model] [--corpus runs/demo/corpus] [--split test]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from common import machine, record
from scmm.data_pipeline.loader import CorpusLoader, LoaderConfig
from scmm.data_pipeline.ontology import get_ontology
from scmm.data_pipeline.store import Corpus
from scmm.eval.annotate import Candidates
from scmm.eval.stage2 import candidate_answers
from scmm.model.folders import load_model


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="runs/demo/model")
    p.add_argument("--corpus", default="runs/demo/corpus")
    p.add_argument("--split", default="test")
    p.add_argument("--batch-size", type=int, default=64)
    args = p.parse_args()
    model = load_model(args.model)
    stage2 = model.stage2
    corpus = Corpus(args.corpus)
    answers = candidate_answers(Candidates.from_labels(model.labels), get_ontology())
    loader = CorpusLoader(corpus, args.split, LoaderConfig.inference(args.batch_size), stage2.aligner.encoding,
                          stage2.aligner.vocab, training=False)
    describe_s = answer_s = 0.0
    n = 0
    with torch.inference_mode():
        for batch in loader:
            t = time.perf_counter()
            stage2.describe_cells(batch, task="describe")
            describe_s += time.perf_counter() - t
            t = time.perf_counter()
            stage2.answer_logprobs(batch, answers)
            answer_s += time.perf_counter() - t
            n += len(batch["cell_id"])
    ratio = answer_s / describe_s
    print(f"{n} cells of {args.split}, {len(answers)} candidate labels, load {machine()['load_1min']}")
    print("| step | seconds per cell |\n|---|---:|")
    print(f"| description (generation) | {describe_s / n:.4f} |\n| cell-type answer over the labels | "
          f"{answer_s / n:.4f} |\n| answer / description | {ratio:.2f} |")
    record("llm_answers", {"model": args.model, "n_cells": n, "n_labels": len(answers),
                           "describe_s_per_cell": describe_s / n, "answer_s_per_cell": answer_s / n,
                           "ratio": float(np.round(ratio, 3))})


if __name__ == "__main__":
    main()
