#!/usr/bin/env python
"""Memory and speed of the evaluation code on ~100,000 test cells (the issue: "within 2 GB of memory").

Data: ``data_pipeline.synth.synthesize`` (``scmm data synth``) writes ``--total-cells`` cells x ``--genes`` genes
(50 donors), built into a corpus whose split fractions put ~80% of the cells (``--total-cells`` 125,000 ->
~100,000) in **test**; built data are cached in ``--out`` (``--fresh`` rebuilds). Model: a randomly initialised
small stage-1 aligner (cell tower 64 wide, 2 layers; Q-Former 1 layer, 8 queries, 256-d embeddings; the
default MiniLM text tower, frozen) over the corpus's gene vocabulary, saved with ``save_pretrained`` and
loaded back as ``scmm eval`` does; nothing is trained (speed and memory do not depend on the weights).

Measured in a fresh subprocess (its own peak RSS, ``VmHWM`` of ``/proc/self/status``), stage by stage:

1. ``embed``: :func:`eval.annotate.embed_split` of the test split (cells/s);
2. ``annotate``: label prototypes, :func:`eval.annotate.predict_by_text`, :func:`eval.metrics.annotation_metrics`
   (accuracy, macro-F1, ontology path and PPR scores);
3. ``retrieve``: text features of the cells' texts (each distinct text encoded once) and
   :func:`eval.retrieval.retrieval_metrics` (FAISS top-k + blocked exact ranks; pairs/s);
4. ``baselines``: :func:`eval.baselines.run_corpus_baselines` (HVG panel streamed over train, models fitted on
   at most 20,000 train cells, the test split streamed) and the k-NN smoothing of scmm's predictions.

``--embed-cells N`` (proxy mode, for a CPU too slow or too shared to run the model over every cell): the model
embeds the first N test cells only (its cells/s is reported), every test cell still gets an embedding (a copy
of one of those N plus small noise) and a text feature, and stages 2-4 run at full size: their memory is the
real one, only the embedding values are stand-ins. Output then goes to ``bench_eval_memory_proxy.json``.

Reported per stage: seconds, the peak RSS so far and the RSS at its end. The CPU of the machine it ran on may
be shared, so the times are rough.

    python benchmarks/bench_eval_memory.py [--total-cells 125000] [--genes 2000] [--out runs/bench_eval] [--fresh]

Writes ``<out>/bench_eval_memory.json`` and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def prepare(out: Path, total_cells: int, genes: int, fresh: bool) -> tuple[Path, Path]:
    from scmm.data_pipeline.build import BuildConfig, build_corpus
    from scmm.data_pipeline.synth import synthesize
    h5ad, corpus = out / f"synth_{total_cells}x{genes}.h5ad", out / f"corpus_{total_cells}x{genes}"
    model_dir = out / "model"
    if fresh:
        for p in (h5ad, corpus, model_dir):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    if not h5ad.is_file():
        t = time.perf_counter()
        synthesize(h5ad, n_cells=total_cells, n_genes=genes, seed=0, n_donors=50, progress=False)
        print(f"synth: {time.perf_counter() - t:.0f} s", flush=True)
    if not (corpus / "manifest.json").is_file():
        t = time.perf_counter()
        build_corpus(BuildConfig(inputs=[h5ad], out=corpus, split_fractions=(0.12, 0.08, 0.80), progress=False,
                                 overwrite=True))
        print(f"build: {time.perf_counter() - t:.0f} s", flush=True)
    if not (model_dir / "config.json").is_file():
        from common import save_untrained_stage1
        save_untrained_stage1(corpus, model_dir, "small")
    return corpus, model_dir


def measure(corpus_dir: Path, model_dir: Path, embed_cells: int | None = None) -> dict:
    """The measured run (call in a fresh process). ``embed_cells``: see ``--embed-cells``."""
    import numpy as np
    import torch

    from scmm.data_pipeline.ontology import get_ontology
    from scmm.data_pipeline.store import Corpus
    from scmm.eval.annotate import Candidates, embed_split, label_prototypes, predict_by_text
    from scmm.eval.baselines import knn_smoothing, run_corpus_baselines, smoothing_k
    from scmm.eval.harness import _text_features
    from scmm.eval.metrics import annotation_metrics
    from scmm.eval.retrieval import retrieval_metrics
    from scmm.model.aligner import CellTextAligner

    stages: dict[str, dict] = {}
    t_all = time.perf_counter()

    def mark(name: str, t0: float, **extra) -> None:
        stages[name] = {"seconds": round(time.perf_counter() - t0, 1), "peak_rss_mb": round(_status_mb("VmHWM")),
                        "rss_mb": round(_status_mb("VmRSS")), **extra}
        print(f"{name}: {stages[name]}", flush=True)

    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "2"))))
    mark("start", t_all)
    t = time.perf_counter()
    corpus = Corpus(corpus_dir)
    model = CellTextAligner.from_pretrained(model_dir)
    ontology = get_ontology()
    mark("load", t)

    t = time.perf_counter()
    mode = "full"
    if embed_cells:
        from scmm.data_pipeline.loader import CorpusLoader, LoaderConfig
        from scmm.eval.annotate import Embedded
        from scmm.eval.harness import _split_cells
        ids, labels = _split_cells(corpus, "test")
        loader = CorpusLoader(corpus, "test", LoaderConfig.inference(), model.encoding, model.vocab, training=False)
        parts, texts, done = [], [], 0
        with torch.no_grad():
            for batch in loader:  # the model on the first embed_cells cells only (throughput)
                if done < embed_cells:
                    parts.append(model.cell_features(batch["gene_ids"], batch["values"], batch["padding_mask"]).numpy())
                    done += len(batch["text"])
                texts += batch["text"]
        measured = np.concatenate(parts)
        rate = round(len(measured) / (time.perf_counter() - t), 1)
        rng = np.random.default_rng(0)
        noise = rng.normal(0, 0.01, (len(ids), measured.shape[1])).astype(np.float32)
        e = measured[np.arange(len(ids)) % len(measured)] + noise
        e /= np.linalg.norm(e, axis=1, keepdims=True)
        emb = Embedded(e.astype(np.float32), ids, labels, texts)
        mode = f"proxy: model on {len(measured)} cells, embeddings of the others copied + noise"
        n = len(ids)
        mark("embed", t, cells=n, model_cells=len(measured), model_cells_per_s=rate, mode=mode)
    else:
        with torch.no_grad():
            emb = embed_split(model, corpus, "test", progress=False)
        n = len(emb.cell_ids)
        mark("embed", t, cells=n, cells_per_s=round(n / (time.perf_counter() - t), 1))

    t = time.perf_counter()
    candidates = Candidates.from_corpus(corpus)
    protos = label_prototypes(model, candidates)
    best, sim = predict_by_text(emb.embeddings, protos)
    pred = np.asarray(candidates.keys, dtype=object)[best]
    y_true = np.asarray(emb.labels, dtype=object)
    ann = annotation_metrics(y_true, pred, ontology, labels=candidates.keys)
    mark("annotate", t, accuracy=round(ann["accuracy"], 4), ontology_score=round(ann["ontology_score"], 4))

    t = time.perf_counter()
    n_texts = len(set(emb.texts))
    with torch.no_grad():
        if embed_cells:  # proxy: encode the texts of the model-embedded cells, reuse them cyclically
            k = min(n, embed_cells)
            text_emb = _text_features(model, emb.texts[:k])[np.arange(n) % k]
        else:
            text_emb = _text_features(model, emb.texts)
    t_text = time.perf_counter() - t
    t2 = time.perf_counter()
    ret = retrieval_metrics(emb.embeddings, text_emb, cell_labels=y_true)
    t_ret = time.perf_counter() - t2
    mark("retrieve", t, distinct_texts=n_texts, text_seconds=round(t_text, 1), metric_seconds=round(t_ret, 1),
         pairs_per_s=round(n / t_ret, 1), **{k: round(v, 4) for k, v in ret.items()
                                             if k in ("cell_to_text_recall@10", "text_to_cell_mean_rank")})
    del text_emb

    t = time.perf_counter()
    base = run_corpus_baselines(corpus, seed=0)
    if list(base["y_true"]) != list(y_true):  # embed_split order = shard order for an unshuffled loader
        raise SystemExit("baselines: test cells out of order")
    k = smoothing_k(len(pred))
    smoothed = knn_smoothing(pred, base["z_test"], k=k, fit_pca=False)
    accs = {name: round(float(np.mean(p == y_true)), 4) for name, p in base["predictions"].items()}
    accs["scmm_knn_smoothing"] = round(float(np.mean(smoothed == y_true)), 4)
    mark("baselines", t, n_train_used=base["n_train_used"], n_hvg=int(len(base["genes"])), smoothing_k=k,
         accuracy=accs)
    return {"n_test_cells": n, "mode": mode, "stages": stages, "peak_rss_mb": round(_status_mb("VmHWM")),
            "total_seconds": round(time.perf_counter() - t_all, 1), "torch_threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--total-cells", type=int, default=125_000)
    ap.add_argument("--genes", type=int, default=2000)
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench_eval"))
    ap.add_argument("--fresh", action="store_true")
    ap.add_argument("--embed-cells", type=int, default=0,
                    help="proxy mode for slow CPUs: run the model on this many test cells only (its cells/s) and "
                         "give every other test cell a copy (+ noise) of one of those embeddings and texts, so that "
                         "annotation, retrieval and baselines still run at full size (default 0: embed all)")
    ap.add_argument("--measure", nargs=2, metavar=("CORPUS", "MODEL"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if args.measure:
        print("RESULT " + json.dumps(measure(Path(args.measure[0]), Path(args.measure[1]), args.embed_cells or None)),
              flush=True)
        return
    out = Path(args.out)
    corpus, model_dir = prepare(out, args.total_cells, args.genes, args.fresh)
    proc = subprocess.run([sys.executable, __file__, "--measure", str(corpus), str(model_dir),
                           "--embed-cells", str(args.embed_cells)],
                          stdout=subprocess.PIPE, text=True, cwd=str(ROOT))
    sys.stdout.write("".join(line + "\n" for line in proc.stdout.splitlines() if not line.startswith("RESULT ")))
    if proc.returncode != 0:
        raise SystemExit(f"measured run failed (exit {proc.returncode})")
    result = json.loads([line for line in proc.stdout.splitlines() if line.startswith("RESULT ")][-1][7:])
    result.update({"total_cells": args.total_cells, "genes": args.genes, "corpus": str(corpus)})
    name = "bench_eval_memory.json" if not args.embed_cells else "bench_eval_memory_proxy.json"
    (out / name).write_text(json.dumps(result, indent=1) + "\n")
    print(f"\n{'stage':<10} {'seconds':>8} {'peak RSS MB':>12} {'RSS MB':>8}  notes")
    for name, s in result["stages"].items():
        notes = {k: v for k, v in s.items() if k not in ("seconds", "peak_rss_mb", "rss_mb")}
        print(f"{name:<10} {s['seconds']:>8} {s['peak_rss_mb']:>12} {s['rss_mb']:>8}  {notes if notes else ''}")
    print(f"\n{result['n_test_cells']} test cells; peak RSS {result['peak_rss_mb']} MB; "
          f"total {result['total_seconds']} s")


if __name__ == "__main__":
    main()
