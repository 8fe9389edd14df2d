"""Sphinx extension of scmm's docs: reference tables generated from the code, and checks that fail a strict build.

* ``scmm-config`` directive: the table of every key of a YAML config dataclass (nested dataclasses as dotted keys),
  with its type and default read from the dataclass itself and its meaning from the field's trailing ``# comment``
  in the source, or from ``docs/config_keys.yaml`` (which wins). A key with no meaning, or a meaning for a key
  that no longer exists, is a warning, so ``-W`` fails the build: the page cannot drift from the code.
* The command check: every ``scmm`` command (each leaf of ``scmm.cli.build_parser()``) must be shown by an
  ``argparse`` directive with that ``:path:`` somewhere in the docs, so a new subcommand without a section fails.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import io
import re
import tokenize
import types
import typing
from pathlib import Path
from typing import Any

import yaml
from docutils.parsers.rst import directives
from sphinx.application import Sphinx
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective

from scmm.cli import build_parser  # light: the CLI imports its commands' modules only when they run

log = logging.getLogger(__name__)
MEANINGS_FILE = "config_keys.yaml"


# --- config tables ------------------------------------------------------------------------------------------
def _import(path: str) -> Any:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def field_comments(cls: type) -> dict[str, str]:
    """{field: its trailing ``# comment``} in the class body's source; comment-only lines right below, indented
    deeper than the field, continue it."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    tokens = [t for t in tokenize.generate_tokens(io.StringIO(source).readline)]
    body_col = next((t.end[1] for t in tokens if t.type == tokenize.INDENT), None)
    out: dict[str, str] = {}
    field, at_line_start, continuing = None, True, None
    for i, tok in enumerate(tokens):
        if tok.type == tokenize.NAME and at_line_start and tok.start[1] == body_col:
            nxt = tokens[i + 1] if i + 1 < len(tokens) else None
            field = tok.string if nxt is not None and nxt.string == ":" else None
            continuing = None
        elif tok.type == tokenize.COMMENT:
            if field is not None:  # on the field's own (logical) line
                out[field] = (out.get(field, "") + " " + tok.string.lstrip("#").strip()).strip()
            elif continuing is not None and at_line_start and tok.start[1] > body_col:
                out[continuing] += " " + tok.string.lstrip("#").strip()
            else:
                continuing = None
        elif tok.type == tokenize.NEWLINE:
            continuing = field if field in out else None
            field = None
        elif tok.type not in (tokenize.NL, tokenize.INDENT, tokenize.DEDENT, tokenize.COMMENT) and at_line_start:
            continuing = None
        at_line_start = tok.type in (tokenize.NEWLINE, tokenize.NL, tokenize.INDENT, tokenize.DEDENT)
    return out


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(tp))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    if tp is type(None):
        return "None"
    return getattr(tp, "__name__", str(tp))


def _default(f: dataclasses.Field) -> tuple[bool, Any]:
    if f.default is not dataclasses.MISSING:
        return True, f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return True, f.default_factory()  # type: ignore[misc]
    return False, None


def _show(value: Any) -> str:
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, (list, tuple)):
        return "`[" + ", ".join(str(v) for v in value) + "]`"
    if isinstance(value, str):
        return f'`"{value}"`' if value else '`""`'
    return f"`{value!r}`"


class ConfigWalker:
    """Flattens a config dataclass into (dotted key, type, default, meaning) rows; collects what is missing."""

    def __init__(self, meanings: dict[str, dict[str, str]]):
        self.meanings = meanings
        self.used: set[tuple[str, str]] = set()
        self.problems: list[str] = []

    def meaning(self, cls: type, name: str) -> str | None:
        for base in cls.__mro__:
            if not dataclasses.is_dataclass(base):
                continue
            given = self.meanings.get(_qualname(base), {})
            if name in given:
                self.used.add((_qualname(base), name))
                return str(given[name])
            if name in {f.name for f in dataclasses.fields(base)} and name in field_comments(base):
                return field_comments(base)[name]
        return None

    def rows(self, cls: type, prefix: str = "", value: Any = None, collapse: tuple[str, ...] = ()) -> list[tuple]:
        out = []
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            key = f"{prefix}{f.name}"
            tp = hints[f.name]
            has_default, default = _default(f)
            if value is not None:
                has_default, default = True, getattr(value, f.name)
            meaning = self.meaning(cls, f.name)
            if dataclasses.is_dataclass(tp) and key not in collapse:
                out.append((key, tp.__name__, "", meaning or ""))
                out += self.rows(tp, key + ".", default if has_default else None, collapse)
                continue
            if dataclasses.is_dataclass(tp):  # collapsed: its keys are listed in the table of another config
                out.append((key, tp.__name__, "", meaning or ""))
                continue
            if meaning is None:
                self.problems.append(f"config key '{key}' ({_qualname(cls)}.{f.name}) has no meaning: add a trailing "
                                     f"comment to the field or an entry in docs/{MEANINGS_FILE}")
            shown = _show(default) if has_default else "required"
            out.append((key, _type_name(tp), shown, meaning or ""))
        return out


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


class ConfigTable(SphinxDirective):
    """``{scmm-config} package.module.ConfigClass``: the table of every key of that YAML config."""

    required_arguments = 1
    option_spec = {"collapse": directives.unchanged}

    def run(self):
        env = self.env
        cls = _import(self.arguments[0])
        collapse = tuple(x.strip() for x in self.options.get("collapse", "").split(",") if x.strip())
        walker = ConfigWalker(env.app.config.scmm_config_meanings)
        rows = walker.rows(cls, collapse=collapse)
        for problem in walker.problems:
            log.warning(problem, location=(env.docname, self.lineno))
        env.scmm_config_used = getattr(env, "scmm_config_used", set()) | walker.used
        env.scmm_config_walked = getattr(env, "scmm_config_walked", set()) | _dataclasses_under(cls)
        text = ["| key | type | default | meaning |", "|---|---|---|---|"]
        for key, tp, default, meaning in rows:
            text.append(f"| `{key}` | {_cell(tp)} | {_cell(default)} | {_cell(meaning)} |")
        return self.parse_text_to_nodes("\n".join(text))


def _dataclasses_under(cls: type) -> set[str]:
    out = set()
    for base in cls.__mro__:
        if dataclasses.is_dataclass(base):
            out.add(_qualname(base))
    for tp in typing.get_type_hints(cls).values():
        if dataclasses.is_dataclass(tp):
            out |= _dataclasses_under(tp)
    return out


def _check_meanings_used(app: Sphinx, env) -> None:
    """Entries of config_keys.yaml for classes or fields that no longer exist are stale: a warning."""
    walked = getattr(env, "scmm_config_walked", set())
    for qual, entries in app.config.scmm_config_meanings.items():
        if qual not in walked:
            log.warning(f"docs/{MEANINGS_FILE}: {qual} is not shown by any scmm-config table (renamed or moved?)")
            continue
        names = {f.name for f in dataclasses.fields(_import(qual))}
        for name in entries:
            if name not in names:
                log.warning(f"docs/{MEANINGS_FILE}: {qual} has no field '{name}' (a stale entry)")


# --- references to scmm objects that exist but have no page ------------------------------------------------
def _exists(dotted: str) -> bool:
    """Whether ``dotted`` names a module, or an attribute reached from one, of the installed ``scmm`` package."""
    parts = dotted.split(".")
    if parts[0] != "scmm":  # the tree's folders (``model.bridge``) do not exist once installed
        return False
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for name in parts[cut:]:
                obj = getattr(obj, name)
        except AttributeError:
            return False
        return True
    return False


def _resolve_internal(app: Sphinx, env, node, contnode):
    """A ``py`` reference to an scmm object that exists in the installed package but is not documented on a page
    (a helper named in a docstring) is shown as code, unlinked; a reference to nothing stays unresolved, so the
    strict build fails on it (``~model.bridge.CellProjector``: the tree's path, which does not exist installed)."""
    if node.get("refdomain") != "py":
        return None
    target = node.get("reftarget", "").lstrip(".~")
    module, cls = node.get("py:module"), node.get("py:class")
    candidates = [target]
    if module:
        candidates[:0] = [f"{module}.{cls}.{target}"] if cls else []
        candidates.insert(len(candidates) - 1, f"{module}.{target}")
    if any(_exists(c) for c in candidates):
        return contnode
    return None


# --- the command check --------------------------------------------------------------------------------------
def command_paths(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[str]:
    """Every leaf command of the parser as a space-joined path ("data build", "eval", ...)."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        return [" ".join(prefix)]
    out = []
    for action in subs:
        for name, sub in action.choices.items():
            out += command_paths(sub, prefix + (name,))
    return out


def _check_commands(app: Sphinx, env) -> None:
    shown = set()
    for page in Path(app.srcdir).rglob("*.md"):
        shown |= {m.strip() for m in re.findall(r"(?m)^:path:(.*)$", page.read_text())}
    for path in command_paths(build_parser()):
        if path not in shown:
            log.warning(f"`scmm {path}` is not documented: add a section with an argparse directive "
                        f"(:path: {path}) to docs/commands.md")


def _load_meanings(app: Sphinx) -> None:
    path = Path(app.srcdir) / MEANINGS_FILE
    app.config.scmm_config_meanings = yaml.safe_load(path.read_text()) or {} if path.is_file() else {}


def setup(app: Sphinx) -> dict:
    app.add_config_value("scmm_config_meanings", {}, "env")
    app.add_directive("scmm-config", ConfigTable)
    app.connect("builder-inited", _load_meanings)
    app.connect("missing-reference", _resolve_internal)
    app.connect("env-check-consistency", _check_meanings_used)
    app.connect("env-check-consistency", _check_commands)
    return {"version": "1", "parallel_read_safe": False, "parallel_write_safe": True}
