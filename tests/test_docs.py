"""The README stays a newcomer's page and points into the docs; the docs' own checks (the strict build is
`make docs` in CI) work on what they check."""
from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def test_readme_is_at_most_200_lines():
    n = len(README.read_text().splitlines())
    assert n <= 200, f"README.md has {n} lines; the reference belongs in docs/ (issue 25)"


def test_readme_links_resolve_and_reach_every_docs_page():
    text = README.read_text()
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    local = [t for t in targets if not re.match(r"[a-z]+://", t)]
    missing = [t for t in local if not (ROOT / t).exists()]
    assert not missing, f"README links to files that do not exist: {missing}"
    pages = {p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md")}
    assert pages - set(local) == set(), f"docs pages the README does not link: {sorted(pages - set(local))}"


sys.path.insert(0, str(ROOT / "docs" / "_ext"))
scmm_docs = pytest.importorskip("scmm_docs")  # needs Sphinx: the `docs` extra, part of `dev`


def test_every_cli_command_is_a_leaf_path():
    from scmm.cli import build_parser
    paths = scmm_docs.command_paths(build_parser())
    assert {"data build", "data demo", "eval", "index query", "plot umap", "finetune"} <= set(paths)
    assert "data" not in paths and "index" not in paths  # groups are not commands
    shown = set()
    for page in (ROOT / "docs").glob("*.md"):
        shown |= {m.strip() for m in re.findall(r"(?m)^:path:(.*)$", page.read_text())}
    assert set(paths) <= shown, f"commands without a section in docs/commands.md: {sorted(set(paths) - shown)}"


def test_field_comments_read_trailing_comments_and_their_continuations(tmp_path):
    src = tmp_path / "fc_mod.py"
    src.write_text(
        "from dataclasses import dataclass, field\n\n\n"
        "@dataclass\nclass A:\n"
        '    """Doc: not a field."""\n\n'
        "    steps: int = 10\n"
        "    lr: float = 1e-4  # learning rate\n"
        "    # a comment-only line at the body's indent belongs to no field\n"
        "    tasks: list = field(default_factory=lambda: [1,\n"
        "                                                 2])  # the tasks\n"
        "    x: int = 3  # first\n"
        "                #   second\n\n"
        "    def f(self) -> None:\n"
        "        a: int = 3  # not a field\n")
    sys.path.insert(0, str(tmp_path))
    try:
        import fc_mod
        assert scmm_docs.field_comments(fc_mod.A) == {"lr": "learning rate", "tasks": "the tasks",
                                                      "x": "first second"}
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("fc_mod", None)


@dataclasses.dataclass
class _Inner:
    width: int = 8  # how wide


@dataclasses.dataclass
class _Outer:
    out: str  # where
    inner: _Inner = dataclasses.field(default_factory=lambda: _Inner(width=16))  # the inner part
    rate: float = 0.5


def test_config_walker_flattens_nested_dataclasses_with_their_defaults():
    walker = scmm_docs.ConfigWalker({f"{__name__}._Outer": {"rate": "a rate"}})
    rows = walker.rows(_Outer)
    assert [(k, d) for k, _, d, _ in rows] == [("out", "required"), ("inner", ""), ("inner.width", "`16`"),
                                                ("rate", "`0.5`")]
    assert rows[-1][3] == "a rate" and rows[2][3] == "how wide" and rows[0][3] == "where" and not walker.problems
    bare = scmm_docs.ConfigWalker({})
    bare.rows(_Outer)
    assert len(bare.problems) == 1 and "'rate'" in bare.problems[0]
