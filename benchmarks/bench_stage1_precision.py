"""Stage-1 training speed on this machine per precision: fp32, DeepSpeed bf16, autocast bf16.

Runs the demo config (`configs/stage1_demo.yaml`) for a few steps in each precision, one process,
and reports cells/s from `metrics.jsonl` (the first logged window, which includes warm-up, is dropped).

    python benchmarks/bench_stage1_precision.py [--steps 40] [--config configs/stage1_demo.yaml]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def run(config: dict, precision: str, steps: int, tmp: Path) -> float:
    cfg = json.loads(json.dumps(config))
    cfg["out"] = str(tmp / precision)
    cfg["train"].update(precision=precision, steps=steps, log_every=10, save_every=10 ** 6, warmup_steps=5)
    path = tmp / f"{precision}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-m", "scmm.cli", "pretrain", "--config", str(path)], check=True, env=env,
                   cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows = [json.loads(line) for line in (tmp / precision / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["cells_per_s"] for r in rows[1:]]
    return sum(speeds) / len(speeds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "stage1_demo.yaml"))
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    config = yaml.safe_load(Path(args.config).read_text())
    config["corpus"] = str((ROOT / config["corpus"]).resolve()) if not Path(config["corpus"]).is_absolute() \
        else config["corpus"]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for precision in ("fp32", "bf16", "autocast-bf16"):
            results[precision] = run(config, precision, args.steps, Path(tmp))
            print(f"{precision:>14}: {results[precision]:7.1f} cells/s", flush=True)
    base = results["fp32"]
    for precision, speed in results.items():
        print(f"{precision:>14}: {speed / base:.2f}x fp32")
    out = ROOT / "runs" / "bench" / "stage1_precision.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
