"""YAML -> dataclasses, with every key validated: a typo is an error, never a silent default."""
from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from scmm.errors import ScmmError

T = TypeVar("T")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], where)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ScmmError(f"config key '{where}' must be a mapping, got {type(value).__name__}")
        return from_dict(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ScmmError(f"config key '{where}' must be a list")
        (inner, *_) = typing.get_args(tp) or (Any,)
        out = [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if tp is float and not isinstance(value, bool) and isinstance(value, (int, float, str)):
        try:
            number = float(value)  # YAML reads 3e-4 as a string
        except ValueError:
            number = None
        if number is not None:
            if not math.isfinite(number):
                raise ScmmError(f"config key '{where}' must be a finite number, got {value!r}")
            return number
    if tp in (int, float, str, bool) and not (isinstance(value, tp) and not (tp is int and isinstance(value, bool))):
        raise ScmmError(f"config key '{where}' must be {tp.__name__}, got {value!r}")
    return value


def required_keys(cls: type, data: dict | None = None) -> list[str]:
    """The keys of dataclass ``cls`` without a default, those absent from ``data`` when it is given."""
    return [f.name for f in dataclasses.fields(cls) if f.init and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING and (data is None or f.name not in data)]


def from_dict(cls: type[T], data: dict, where: str = "") -> T:
    """Build dataclass `cls` from a dict; unknown keys and wrongly typed values are errors naming the key."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted((k for k in data if k not in fields), key=str)
    if unknown:
        prefix = f"{where}." if where else ""
        names = (prefix + (k if isinstance(k, str) and k.isprintable() and k.strip() == k and k else repr(k))
                 for k in unknown)
        raise ScmmError(f"unknown config key(s) {', '.join(names)} (allowed here: {', '.join(sorted(fields))})")
    missing = required_keys(cls, data)
    if missing:
        prefix = f"{where}." if where else ""
        raise ScmmError(f"config is missing the required key(s) {', '.join(prefix + k for k in missing)}")
    hints = typing.get_type_hints(cls)
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ScmmError(f"config {where or cls.__name__}: {exc}") from None
    except ValueError as exc:
        raise ScmmError(f"config {where or cls.__name__}: {exc}") from None


def load_yaml(path: str | Path, cls: type[T]) -> T:
    """Read a YAML file into dataclass `cls`."""
    path = Path(path)
    if not path.is_file():
        raise ScmmError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ScmmError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ScmmError(f"config file {path} must hold a mapping")
    if not data and required_keys(cls):
        raise ScmmError(f"config file {path} is empty; it needs at least the key(s) {', '.join(required_keys(cls))}")
    return from_dict(cls, data)


def read_utf8(path: str | Path, what: str) -> str:
    """The text of ``path``, which must be UTF-8 (a byte-order mark is skipped); text in another encoding is a
    :class:`ScmmError` naming ``what``, the file and the line of the first byte that is not UTF-8."""
    path = Path(path)
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise ScmmError(f"{what} {path} is not UTF-8 text (line {line}: byte {raw[exc.start:exc.start + 1]!r}); "
                        f"save it as UTF-8") from None


def read_json(path: str | Path, what: str) -> Any:
    """The JSON content of ``path``; a missing or unreadable file is a :class:`ScmmError` naming ``what``."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ScmmError(f"{what} is missing: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ScmmError(f"{what} {path} is unreadable ({exc})") from None
