"""What a workflow stage ran on (workflow/Snakefile): its config, its inputs' checksums, the code and the packages.

Each rule of the workflow ends with ``python -m scmm.provenance record ...``, which writes
``<out>/provenance/<stage>.json`` (atomically, last: it is also the rule's done-file). A training rule starts with
``python -m scmm.provenance prepare RUN_DIR CONFIG``: the run folder keeps its checkpoints across attempts (every
attempt runs with ``--resume``) only while the stage's config is the one that made them; a changed config starts
the stage afresh.

    python -m scmm.provenance prepare runs/demo/stage1 runs/demo/configs/stage1.yaml \
        --after runs/demo/provenance/corpus.json
    python -m scmm.provenance record --stage stage1 --config runs/demo/configs/stage1.yaml \\
        --inputs runs/demo/corpus --outputs runs/demo/stage1/model --out runs/demo/provenance/stage1.json
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

from scmm.atomic import write_file
from scmm.errors import ScmmError

CONFIG_STAMP = ".workflow_config.sha256"  # in a training run folder: the config its checkpoints belong to
SKIPPED = {"checkpoints", "tensorboard", "__pycache__"}  # run state, not results: left out of folder checksums
PACKAGES = ("scmm", "torch", "deepspeed", "transformers", "peft", "numpy", "scipy", "anndata", "zarr", "faiss-cpu",
            "snakemake", "snakemake-executor-plugin-slurm")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def checksum(path: str | Path) -> dict:
    """The sha256 of a file, or of a folder: over its files' relative paths and contents (checkpoints and other run
    state left out). A corpus folder counts by its ``manifest.json``, which lists every shard's checksum."""
    path = Path(path)
    if path.is_file():
        return {"path": str(path), "sha256": _sha256(path)}
    if not path.is_dir():
        raise ScmmError(f"provenance: input {path} does not exist")
    if (path / "manifest.json").is_file() and (path / "shards").is_dir():
        return {"path": str(path), "sha256": _sha256(path / "manifest.json"), "of": "manifest.json"}
    h, n = hashlib.sha256(), 0
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = f.relative_to(path)
        if SKIPPED & set(rel.parts[:-1]) or rel.name.startswith(".workflow"):
            continue
        h.update(f"{rel.as_posix()}\0{_sha256(f)}\n".encode())
        n += 1
    return {"path": str(path), "sha256": h.hexdigest(), "files": n}


def git_commit() -> dict | None:
    """The commit of the scmm source tree this runs from (None when it is not a git checkout), and whether the
    tree had uncommitted changes."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=30)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=30).stdout.strip() != ""
    except (OSError, subprocess.TimeoutExpired):
        return None
    return {"commit": head.stdout.strip(), "dirty": dirty}


def versions() -> dict:
    """The installed versions of the packages a result depends on (absent ones left out)."""
    found = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return {"python": sys.version.split()[0], **found}


def record(stage: str, out: str | Path, config: str | Path | None = None, inputs: list[str] = (),
           outputs: list[str] = (), command: str | None = None) -> dict:
    """Write ``out`` (JSON): the stage, its config's text and checksum, its inputs' and outputs' checksums, the git
    commit and the package versions. Returns what was written."""
    entry: dict = {"stage": stage, "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if config is not None:
        config = Path(config)
        entry["config"] = {"path": str(config), "sha256": _sha256(config), "text": config.read_text()}
    entry["inputs"] = [checksum(p) for p in inputs]
    entry["outputs"] = [checksum(p) for p in outputs]
    if command:
        entry["command"] = command
    entry["git"] = git_commit()
    entry["versions"] = versions()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    write_file(Path(out), lambda p: p.write_text(json.dumps(entry, indent=1) + "\n"))
    return entry


def prepare(run_dir: str | Path, config: str | Path, after: list[str] = ()) -> bool:
    """Make ``run_dir`` ready for a training launch with ``--resume`` under ``config``: kept (its checkpoints
    continue) when it was made by this very config after these very upstream stages (``after``: their provenance
    files, which change whenever they rerun), else removed. Returns whether it was kept."""
    run_dir = Path(run_dir)
    stamp = hashlib.sha256("".join(_sha256(Path(p)) for p in (config, *after)).encode()).hexdigest()
    mark = run_dir / CONFIG_STAMP
    kept = run_dir.is_dir() and mark.is_file() and mark.read_text().strip() == stamp
    if not kept and run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not kept:
        write_file(mark, lambda p: p.write_text(stamp + "\n"))
    return kept


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scmm.provenance", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="action", required=True)
    p = sub.add_parser("prepare", help="keep a training run folder made by this config, else start it afresh")
    p.add_argument("run_dir")
    p.add_argument("config")
    p.add_argument("--after", nargs="*", default=[], help="the provenance files of the stages it runs on")
    r = sub.add_parser("record", help="write a stage's provenance JSON")
    r.add_argument("--stage", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--config")
    r.add_argument("--inputs", nargs="*", default=[])
    r.add_argument("--outputs", nargs="*", default=[])
    r.add_argument("--command")
    args = parser.parse_args(argv)
    try:
        if args.action == "prepare":
            kept = prepare(args.run_dir, args.config, args.after)
            print(f"{args.run_dir}: {'continuing (same config)' if kept else 'starting afresh'}")
        else:
            record(args.stage, args.out, args.config, args.inputs, args.outputs, args.command)
    except ScmmError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    except OSError as exc:
        sys.stderr.write(f"error: {exc.strerror or exc}{f': {exc.filename}' if exc.filename else ''}\n")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
