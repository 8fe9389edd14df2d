"""How much the demo's stage-2 figures move with the seed: stage 2 and its evaluation over several seeds (the
type-level figures and the per-cell ``language.*`` ones).

The same stage-1 model, LLM and corpus (`make demo`'s outputs); each seed sets the run's seed (LoRA and bridge
initialisation, the instruction phrasings, the decoder refit) and the loader's (batch order). Prints each figure's
mean and standard deviation over the seeds and appends them to benchmarks/results.jsonl.

    python benchmarks/bench_stage2_seeds.py [--config configs/stage2_demo.yaml] [--seeds 0,1,2]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

from common import record

FIGURES = {"answers (free)": ("generation", "type_accuracy"),
           "answers (constrained)": ("generation", "type_accuracy_constrained"),
           "answers, unseen phrasing": ("generation", "type_accuracy_unseen_phrasing"),
           "BLEU-4": ("generation", "bleu4"), "ROUGE-L": ("generation", "rougeL"),
           "pseudo-cells, expression PCA": ("pseudocell", "knn_accuracy"),
           "pseudo-cells, unseen phrasing": ("pseudocell", "knn_accuracy_unseen_phrasing"),
           "repeated 4-gram rate": ("generation", "repeated_phrase_rate"),
           # per-cell language (issue 26): claims checked against the cell's facts, search and text-to-cell
           "program claims F1": ("language", "program_claims", "f1"),
           "program claims F1 within type": ("language", "program_claims", "f1_within_type"),
           "  type-template baseline": ("language", "program_claims", "baseline_f1_within_type"),
           "marker claims precision": ("language", "marker_claims", "precision"),
           "  type-template baseline ": ("language", "marker_claims", "baseline_precision"),
           "named symbols not in the vocabulary": ("language", "marker_claims", "unknown_rate"),
           "answers to the genes question: precision": ("language", "answers", "marker_claims", "precision"),
           "search by program AUROC": ("language", "search", "auroc"),
           "search by program AUROC within type": ("language", "search", "auroc_within_type"),
           "text-to-cell program AUROC": ("language", "text_to_cell", "auroc"),
           "the LLM's 3 likeliest programs: precision": ("language", "answers", "ranked_programs", "precision"),
           "  chance": ("language", "answers", "ranked_programs", "chance"),
           # what the prompt is told with bridge.programs / bridge.markers (NaN without them)
           "program reader AUROC": ("language", "reader", "auroc"),
           "marker reader precision": ("language", "reader", "marker_precision")}


def figure(metrics: dict, path: tuple[str, ...]) -> float:
    """The figure at ``path`` of a metrics.json (NaN where the run has none)."""
    for key in path:
        metrics = metrics.get(key, {}) if isinstance(metrics, dict) else {}
    return float(metrics) if isinstance(metrics, (int, float)) else float("nan")


def run_seed(config: Path, seed: int, root: Path) -> tuple[dict, float]:
    cfg = yaml.safe_load(config.read_text())
    cfg["seed"] = seed
    cfg["loader"]["seed"] = seed
    cfg["out"] = str(root / f"seed{seed}")
    path = root / f"seed{seed}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    scmm = [sys.executable, "-m", "scmm.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1"}
    t = time.perf_counter()
    subprocess.run([*scmm, "finetune", "--config", str(path)], check=True, env=env, capture_output=True)
    seconds = time.perf_counter() - t
    subprocess.run([*scmm, "eval", "--model", f"{cfg['out']}/model", "--corpus", cfg["corpus"], "--out",
                    str(root / f"eval{seed}"), "--tasks", "describe,generate", "--quiet"], check=True, env=env,
                   capture_output=True)
    return json.loads((root / f"eval{seed}" / "metrics.json").read_text()), seconds


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="configs/stage2_demo.yaml")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--out", default="runs/bench/stage2_seeds")
    args = p.parse_args()
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    values: dict[str, list[float]] = {name: [] for name in FIGURES}
    seconds = []
    for seed in seeds:
        metrics, s = run_seed(Path(args.config), seed, root)
        seconds.append(s)
        for name, path in FIGURES.items():
            values[name].append(figure(metrics, path))
        print(f"seed {seed}: " + ", ".join(f"{n} {v[-1]:.3f}" for n, v in values.items()), flush=True)
    print(f"\n| figure ({len(seeds)} seeds, {args.config}) | " + " | ".join(f"seed {s}" for s in seeds)
          + " | mean | std |")
    print("|---|" + "---:|" * (len(seeds) + 2))
    for name, v in values.items():
        print(f"| {name} | " + " | ".join(f"{x:.3f}" for x in v) + f" | {np.mean(v):.3f} | {np.std(v, ddof=1):.3f} |")
    print("| stage-2 training + refit (s) | " + " | ".join(f"{x:.0f}" for x in seconds)
          + f" | {np.mean(seconds):.0f} | |")
    record("stage2_seeds", {"config": args.config, "seeds": seeds, "values": values, "train_seconds": seconds,
                            "mean": {n: float(np.mean(v)) for n, v in values.items()},
                            "std": {n: float(np.std(v, ddof=1)) for n, v in values.items()}})


if __name__ == "__main__":
    main()
