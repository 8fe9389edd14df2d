#!/usr/bin/env python
"""Stage-2 training with a 1B-parameter Llama-architecture LLM under ZeRO-2 and ZeRO-3: samples/s, LLM tokens/s
and peak GPU memory (``make bench-gpu``).

The LLM has the shape of TinyLlama-1.1B (2,048 wide, 22 layers, 32 heads, 4 key-value heads, 5,632 intermediate)
with the demo tokenizer's vocabulary and random weights: speed and memory do not depend on the weights, and
nothing is downloaded. The stage-1 model is an untrained demo-size one; the corpus is the demo corpus. Each ZeRO
stage is one real ``finetune/train.py`` launch (torchrun, one rank per GPU), stopped with ``--stop-at`` (no export);
figures come from ``metrics.jsonl`` (tokens: the LLM's input tokens of both directions, cell->text and
text->cell), the first logged window dropped.

    python benchmarks/bench_stage2.py [--llm 1b|tiny] [--device cuda|cpu] [--zero 2,3] [--steps 8]

``--llm tiny --device cpu`` checks the script itself on a CPU in a minute.
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
from transformers import AutoTokenizer

from common import record, save_untrained_stage1, table
from scmm.model.llm import LlamaSize, build_llama

ROOT = Path(__file__).resolve().parents[1]
LLMS = {"1b": LlamaSize(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                        num_key_value_heads=4, max_position_embeddings=2048),
        "tiny": LlamaSize(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=4, max_position_embeddings=512)}


def llama_parameters(size: LlamaSize, vocab: int) -> int:
    """Parameters of an untied Llama: attention (grouped key/value heads), gated MLP, norms, embeddings and head."""
    h, kv = size.hidden_size, size.hidden_size * size.num_key_value_heads // size.num_attention_heads
    layer = 2 * h * h + 2 * h * kv + 3 * h * size.intermediate_size + 2 * h
    return size.num_hidden_layers * layer + 2 * vocab * h + h


def scmm(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "scmm.cli", *args], check=True)


def demo_tokenizer(work: Path, corpus: Path) -> Path:
    """The demo LLM folder (its tokenizer is what the large LLM uses), trained once for a few steps."""
    folder = work / "stage2_bench_tokenizer_lm"
    if not (folder / "config.json").is_file():
        cfg = yaml.safe_load((ROOT / "configs" / "lm_demo.yaml").read_text())
        cfg.update(corpus=str(corpus), out=str(folder))
        cfg["train"].update(steps=2, warmup_steps=1, log_every=1)
        path = work / "stage2_bench_lm.yaml"
        path.write_text(yaml.safe_dump(cfg))
        scmm("finetune", "init-lm", "--config", str(path))
    return folder


def llm_folder(work: Path, size: str, tokenizer_lm: Path) -> Path:
    """A random-weight Llama of ``LLMS[size]`` saved as a plain model folder with the demo tokenizer."""
    folder = work / f"stage2_bench_llm_{size}"
    if not (folder / "config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_lm, local_files_only=True)
        model = build_llama(LLMS[size], len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        (folder / "tokenizer.model").write_bytes((tokenizer_lm / "tokenizer.model").read_bytes())
    return folder


def run(work: Path, corpus: Path, stage1: Path, llm: Path, zero: int, steps: int, batch_size: int,
        device: str) -> dict:
    cfg = yaml.safe_load((ROOT / "configs" / "stage2_demo.yaml").read_text())
    out = work / f"z{zero}"
    cfg.update(corpus=str(corpus), stage1=str(stage1), lm=str(llm), out=str(out))
    cfg["loader"]["batch_size"] = batch_size
    cfg["train"].update(steps=10 * steps, log_every=2, save_every=10 ** 6, warmup_steps=2,
                        precision="bf16" if device == "cuda" else "autocast-bf16")
    path = work / f"z{zero}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TORCH_EXTENSIONS_DIR": str(ROOT / ".cache" / "torch_extensions")}
    if device == "cpu":
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="2")
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                    str(ROOT / "finetune" / "train.py"), "--config", str(path), "--deepspeed_config",
                    str(ROOT / "configs" / "deepspeed" / f"zero{zero}.json"), "--stop-at", str(steps)],
                   check=True, env=env)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][1:]
    mean = lambda key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
    return {"samples_per_s": mean("samples_per_s"), "tokens_per_s": mean("tokens_per_s"),
            "max_memory_gib": max((r.get("max_memory_gib", 0.0) for r in rows), default=0.0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llm", choices=tuple(LLMS), default="1b")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--zero", default="2,3")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--work", default=str(ROOT / "runs" / "bench"))
    args = ap.parse_args()
    work = Path(args.work)
    corpus = ROOT / "runs" / "demo" / "corpus"
    if not (corpus / "manifest.json").is_file():
        scmm("data", "demo", "--out", str(corpus), "--quiet")
    work.mkdir(parents=True, exist_ok=True)
    llm = llm_folder(work, args.llm, demo_tokenizer(work, corpus))
    n_params = llama_parameters(LLMS[args.llm], json.loads((llm / "config.json").read_text())["vocab_size"])
    results, rows = {}, []
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        stage1 = save_untrained_stage1(corpus, Path(tmp) / "stage1", "demo")
        for zero in (int(z) for z in args.zero.split(",")):
            r = run(Path(tmp), corpus, stage1, llm, zero, args.steps, args.batch_size, args.device)
            results[f"zero{zero}"] = r
            rows.append([f"ZeRO-{zero}", f"{r['samples_per_s']:.1f}", f"{r['tokens_per_s']:,.0f}",
                         f"{r['max_memory_gib']:.1f}" if r["max_memory_gib"] else "-"])
    print(f"\nstage 2, LLM {args.llm} ({n_params / 1e6:,.0f}M parameters), batch {args.batch_size}, {args.steps} steps "
          f"(first window dropped), {args.device}:")
    print(table(["ZeRO stage", "samples/s", "LLM tokens/s", "peak GPU memory (GiB)"], rows))
    record("stage2", {"llm": args.llm, "llm_parameters": n_params, "device": args.device,
                      "batch_size": args.batch_size, "steps": args.steps, "results": results})


if __name__ == "__main__":
    main()
