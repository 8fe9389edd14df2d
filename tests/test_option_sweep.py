"""Every numeric option of every command is range-checked by its type (scmm/cli_types.py), and every hint in the
source names an option that exists.

The sweep walks the parser: each numeric option of each command gets 0, a negative, NaN, infinity, a fraction
and a huge value; every case ends in exit 2 and one ``error:`` line, no traceback. The other arguments point at
missing files (and ``--out`` at an existing file), so that a value the type accepts fails fast on them instead
of running the command; a value the type refuses must be refused by name, before anything runs.
"""
from __future__ import annotations

import argparse
import ast
import re
from pathlib import Path

import pytest

from scmm.cli import build_parser, main
from scmm.cli_types import MAX_PSEUDOCELLS, FloatRange, IntRange

ROOT = Path(__file__).resolve().parents[1]
SOURCE_DIRS = ("scmm", "data_pipeline", "model", "eval", "pretrain", "finetune")
SWEEP_VALUES = ("0", "-2", "nan", "inf", "0.5", "1e30")
# options of programs that scmm's hints name and that are not scmm's: the launchers and pip
FOREIGN_OPTIONS = {"--nproc_per_node": "torchrun", "--standalone": "torchrun", "--no-deps": "pip",
                   "--porcelain": "git", "--untracked-files": "git", "--signal": "sbatch"}


def _commands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()):
    """(command words, parser) of every leaf command."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield prefix, parser
        return
    for name, sub in subs[0].choices.items():
        yield from _commands(sub, (*prefix, name))


COMMANDS = list(_commands(build_parser()))
NUMERIC = [(words, action) for words, parser in COMMANDS for action in parser._actions
           if isinstance(action.type, (IntRange, FloatRange))]


def _required_args(parser: argparse.ArgumentParser, skip: argparse.Action, tmp: Path) -> list[str]:
    """The arguments a command needs besides ``skip``: missing files, an existing --out, valid numbers."""
    (tmp / "exists.h5ad").write_text("x")
    args: list[str] = []
    for action in parser._actions:
        if action is skip or isinstance(action, (argparse._HelpAction, argparse._StoreTrueAction)):
            continue
        if action.option_strings and not action.required:
            continue
        if not action.option_strings and action.nargs in ("?",):
            continue
        if isinstance(action.type, (IntRange, FloatRange)):
            value = str(action.type.low if action.type.low > 0 else 1)
        elif action.dest == "out":
            value = str(tmp / "exists.h5ad")
        elif action.dest == "text":
            value = "a B cell"
        else:
            value = str(tmp / f"missing_{action.dest}")
        args += [action.option_strings[0], value] if action.option_strings else [value]
    return args


def test_every_numeric_option_has_a_range_type():
    """No option parses a number with a bare int or float: each goes through cli_types (the one place)."""
    bare = [(" ".join(words), a.option_strings) for words, parser in COMMANDS for a in parser._actions
            if a.type in (int, float)]
    assert not bare, bare
    assert len(NUMERIC) >= 30  # the sweep below is not vacuous


@pytest.mark.parametrize("value", SWEEP_VALUES)
@pytest.mark.parametrize("words, action", NUMERIC, ids=[f"{' '.join(w)} {a.option_strings[0]}" for w, a in NUMERIC])
def test_numeric_option_sweep(words, action, value, tmp_path, capsys):
    parser = dict(COMMANDS)[words]
    argv = [*words, *_required_args(parser, action, tmp_path), action.option_strings[0], value]
    try:
        action.type(value)
        refused = False
    except argparse.ArgumentTypeError:
        refused = True
    with pytest.raises(SystemExit) as exit_info:
        raise SystemExit(main(argv))
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert exit_info.value.code == 2, err
    assert "Traceback" not in err
    assert len([x for x in lines if x.startswith("error:")]) == 1 and lines[-1].startswith("error: "), err
    if refused:  # refused by the option's own type, naming it
        assert f"argument {action.option_strings[0]}" in lines[-1], lines[-1]
    else:  # accepted: the command went on and failed on the missing files
        assert action.option_strings[0] not in lines[-1], lines[-1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists.h5ad"], "an output was left behind"


def test_sweep_values_cover_every_refusal():
    """Each numeric option refuses NaN, infinity and 1e30, and a negative (no option takes one)."""
    for _, action in NUMERIC:
        for value in ("nan", "inf", "1e30", "-2"):
            with pytest.raises(argparse.ArgumentTypeError):
                action.type(value)


def test_the_types_read_numbers_exactly():
    n = IntRange(1, MAX_PSEUDOCELLS)
    assert n("1e6") == 1_000_000 and n("7") == 7 and n(" 12 ") == 12 and n("1_000") == 1000
    for bad in ("1e7", "0", "2.5", "many", "", "nan"):
        with pytest.raises(argparse.ArgumentTypeError):
            n(bad)
    rate = FloatRange(0.0, 1.0, high_open=True)
    assert rate("0") == 0.0 and rate("0.999") == 0.999
    with pytest.raises(argparse.ArgumentTypeError, match=r"\[0, 1\)"):
        rate("1")


def test_generate_limit_is_the_api_limit():
    from scmm import api
    assert MAX_PSEUDOCELLS == api.MAX_PSEUDOCELLS


# --- hints ------------------------------------------------------------------------------------------------
_OPTION = re.compile(r"(?<![\w-])(--[a-z](?:[a-z0-9_-]*[a-z0-9])?)")


def _source_strings():
    """(file, line, string) of every string literal (f-string parts included) in the package's source."""
    for folder in SOURCE_DIRS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Constant) and isinstance(node.value, str):
                    yield path.relative_to(ROOT), node.lineno, node.value


def _declared_options() -> set[str]:
    """Every option of every command: scmm's parser, and the add_argument calls of the other argparse parsers in
    the source (the training scripts, the stage-2 evaluation module)."""
    options = {o for _, parser in COMMANDS for a in parser._actions for o in a.option_strings}
    for folder in SOURCE_DIRS:
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
                    options |= {a.value for a in node.args if isinstance(a, ast.Constant)
                                and str(a.value).startswith("--")}
    return options


def test_every_hint_names_an_option_that_exists():
    options = _declared_options() | set(FOREIGN_OPTIONS)
    unknown = [f"{path}:{line}: {m}" for path, line, text in _source_strings() for m in _OPTION.findall(text)
               if m not in options]
    assert not unknown, "hints naming options no command has:\n" + "\n".join(unknown)


def test_the_hint_sweep_sees_the_hints():
    """The collector reads f-string parts: the existing-output hint of every writer is among what it checks."""
    found = {m for _, _, text in _source_strings() for m in _OPTION.findall(text)}
    assert {"--overwrite", "--label-map", "--unmatched-labels", "--k", "--n"} <= found
