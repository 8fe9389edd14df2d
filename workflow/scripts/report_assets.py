"""The evaluation's tables (HTML) and plots, gathered for `snakemake --report` (workflow/rules/eval.smk).

    python workflow/scripts/report_assets.py EVAL_DIR TABLES.html PLOTS_DIR
"""
from __future__ import annotations

import html
import json
import shutil
import sys
from pathlib import Path

from scmm.eval.report import main_table, stage2_table


def main(eval_dir: str, tables: str, plots: str) -> None:
    metrics = json.loads((Path(eval_dir) / "metrics.json").read_text())
    parts = [main_table(metrics), stage2_table(metrics)]
    body = "\n".join(f"<pre>{html.escape(p)}</pre>" for p in parts if p)
    Path(tables).parent.mkdir(parents=True, exist_ok=True)
    Path(tables).write_text(f"<!doctype html>\n<html><head><meta charset='utf-8'><title>scmm evaluation</title>"
                            f"</head><body>\n<h1>scmm evaluation</h1>\n{body}\n</body></html>\n")
    Path(plots).mkdir(parents=True, exist_ok=True)
    for png in sorted(Path(eval_dir).glob("*.png")):
        shutil.copyfile(png, Path(plots) / png.name)


if __name__ == "__main__":
    main(*sys.argv[1:4])
