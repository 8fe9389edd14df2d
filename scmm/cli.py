"""The `scmm` command line. Every command exits 0 on success; bad input is one `error:` line and exit 2."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from scmm.errors import ScmmError


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
    text = p.read_text()
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


# --- scmm data ------------------------------------------------------------------------------------
def _add_build_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="corpus folder to create")
    p.add_argument("--shard-size", type=int, default=10_000, help="cells per shard (default 10000)")
    p.add_argument("--chunk-size", type=int, default=10_000, help="rows read from the h5ad at a time")
    p.add_argument("--seed", type=int, default=0, help="split seed")
    p.add_argument("--overwrite", action="store_true", help="replace an existing corpus")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def cmd_data_build(args: argparse.Namespace) -> int:
    from data_pipeline.build import BuildConfig, build_corpus
    cfg = BuildConfig(
        inputs=[Path(p) for p in args.inputs], out=Path(args.out), cell_type_column=args.cell_type_column,
        tissue_column=args.tissue_column, disease_column=args.disease_column, donor_column=args.donor_column,
        dataset_column=args.dataset_column, gene_column=args.gene_column, layer=args.layer, vocab=args.vocab,
        min_gene_coverage=args.min_gene_coverage, label_map=_read_label_map(args.label_map),
        unmatched_labels=args.unmatched_labels, shard_size=args.shard_size, chunk_size=args.chunk_size,
        seed=args.seed, overwrite=args.overwrite, progress=not args.quiet)
    manifest = build_corpus(cfg)
    _print_summary(args.out, manifest)
    return 0


def cmd_data_demo(args: argparse.Namespace) -> int:
    import tempfile
    from data_pipeline.build import BuildConfig, build_corpus
    from data_pipeline.demo_data import pbmc_demo_adata
    adata = pbmc_demo_adata()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "pbmc68k_reduced.h5ad"
        adata.write_h5ad(path)
        cfg = BuildConfig(inputs=[path], out=Path(args.out), shard_size=args.shard_size, chunk_size=args.chunk_size,
                          seed=args.seed, overwrite=args.overwrite, progress=not args.quiet)
        manifest = build_corpus(cfg)
    _print_summary(args.out, manifest)
    return 0


def cmd_data_synth(args: argparse.Namespace) -> int:
    from data_pipeline.synth import synthesize
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
    from data_pipeline.info import corpus_info, format_info
    from data_pipeline.store import Corpus
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
    build.add_argument("inputs", nargs="+", help="input .h5ad files (CELLxGENE schema or any h5ad)")
    build.add_argument("--cell-type-column", help="obs column of cell types: CL IDs or labels "
                       "(default cell_type_ontology_term_id)")
    build.add_argument("--tissue-column", help="obs column of tissues: UBERON IDs or labels")
    build.add_argument("--disease-column", help="obs column of diseases: MONDO/PATO IDs or labels")
    build.add_argument("--donor-column", default="donor_id", help="obs column of donors (splits never share one)")
    build.add_argument("--dataset-column", default="dataset_id", help="obs column of datasets")
    build.add_argument("--gene-column", help="var column of gene symbols (default feature_name, else var names)")
    build.add_argument("--layer", help="expression to read: X, raw, or a layer name (default: raw counts first)")
    build.add_argument("--vocab", help="gene vocabulary: vocab.json or an scGPT checkpoint folder")
    build.add_argument("--min-gene-coverage", type=float, default=0.5,
                       help="stop when a smaller share of genes maps to the vocabulary (default 0.5)")
    build.add_argument("--label-map", help="JSON or TSV file: free-text cell-type label -> CL ID")
    build.add_argument("--unmatched-labels", default="error", choices=("error", "drop", "keep"),
                       help="what to do with labels that match no CL term (default error)")
    _add_build_options(build)
    build.set_defaults(func=cmd_data_build)

    demo = dsub.add_parser("demo", help="corpus from scanpy's bundled real PBMCs (pbmc68k_reduced)")
    _add_build_options(demo)
    demo.set_defaults(func=cmd_data_demo, shard_size=64)

    synth = dsub.add_parser("synth", help="write a synthetic CELLxGENE-schema h5ad for scale tests")
    synth.add_argument("--cells", type=int, required=True)
    synth.add_argument("--genes", type=int, required=True)
    synth.add_argument("--out", required=True)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--cell-types", type=int, default=10)
    synth.add_argument("--donors", type=int, default=8)
    synth.add_argument("--overwrite", action="store_true")
    synth.add_argument("--quiet", action="store_true")
    synth.set_defaults(func=cmd_data_synth)

    info = dsub.add_parser("info", help="summary of a corpus")
    info.add_argument("corpus")
    info.add_argument("--json", action="store_true", help="one JSON object")
    info.add_argument("--examples", type=int, default=3, help="example texts to show")
    info.set_defaults(func=cmd_data_info)


def cmd_pretrain(args: argparse.Namespace) -> int:
    from pretrain.train import load_config, train
    train(load_config(args.config), resume=args.resume, deepspeed_json=args.deepspeed_config, stop_at=args.stop_at)
    return 0


def _train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pretrain", help="stage 1: cell–text alignment (single process; use the deepspeed "
                       "launcher on pretrain/train.py for several)")
    p.add_argument("--config", required=True, help="stage-1 YAML config")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    p.add_argument("--deepspeed_config", help="DeepSpeed JSON (overrides the config's)")
    p.add_argument("--stop-at", type=int, help="end this launch after that step, with a checkpoint")
    p.set_defaults(func=cmd_pretrain)


def cmd_eval(args: argparse.Namespace) -> int:
    from eval.harness import evaluate
    from eval.report import main_table
    metrics = evaluate(args.model, args.corpus, args.out, tasks=args.tasks, seed=args.seed,
                       progress=not args.quiet, labels=args.labels)
    print(main_table(metrics))
    print(f"wrote {args.out}/metrics.json and {args.out}/report.md")
    return 0


def _eval_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a model on a corpus's test split, with baselines side by side")
    p.add_argument("--model", required=True, help="model folder (e.g. runs/demo/stage1/model)")
    p.add_argument("--corpus", required=True, help="corpus folder")
    p.add_argument("--out", required=True, help="folder for metrics.json, report.md and plots")
    p.add_argument("--tasks", default="annotate,retrieve", help="comma list of annotate, retrieve, describe, generate")
    p.add_argument("--labels", help="candidate labels: comma list or file (CL IDs or free text); default the corpus's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_eval)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="scmm", description="scmm: language-enhanced single-cell transcriptomics")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _data_parser(sub)
    _train_parser(sub)
    _eval_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # which SIMD build it tried is noise to users
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ScmmError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
