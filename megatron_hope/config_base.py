"""Typed dataclass configs: TOML loading, dotted command-line overrides, validation errors that name the field.

Every config section is a dataclass. `from_dict` builds one from a plain (TOML) dict, rejecting unknown keys
and coercing values to the annotated types; `apply_overrides` applies `--a.b=value` strings on top.
"""
from __future__ import annotations

import dataclasses
import json
import math
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value is wrong. The message names the field and how to fix it."""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, field_path: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], field_path)
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{field_path} = {value!r} is not allowed; choose one of {list(allowed)}")
        return value
    if origin in (list, tuple):
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{field_path} must be a list, got {value!r}")
        items = [_coerce(v, item_tp, f"{field_path}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{field_path} must be a table of {_type_name(tp)} fields, got {value!r}")
        return from_dict(tp, value, field_path)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{field_path} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{field_path} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{field_path} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{field_path} must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{field_path} must be a string, got {value!r}")
        return value
    return value


def require_at_least(section: Any, path: str, minimum: int, names: tuple[str, ...], hint: str = "") -> None:
    """ConfigError naming the first of `names` whose value in `section` is below `minimum`."""
    for name in names:
        value = getattr(section, name)
        if value < minimum:
            raise ConfigError(f"{path}.{name} = {value} must be >= {minimum}{hint}")


def from_dict(cls: type[T], data: dict[str, Any], path: str = "") -> T:
    """Build dataclass `cls` from `data`; unknown keys are an error naming the valid ones."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        where = path or cls.__name__
        raise ConfigError(f"unknown field(s) {unknown} in [{where}]; valid fields: {sorted(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{path}.{k}" if path else k) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _parse_value(text: str) -> Any:
    """Parse an override value as a TOML literal (numbers, booleans, lists, quoted strings); else a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override --{dotted}: {key} is a value, not a table")
        node = child
    node[keys[-1]] = value


def parse_overrides(args: list[str]) -> list[tuple[str, Any]]:
    """['--model.d_model=512', '--model.arch', 'hope'] -> [('model.d_model', 512), ('model.arch', 'hope')]."""
    out: list[tuple[str, Any]] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) <= 2:
            raise ConfigError(f"expected an override like --section.field=value, got {arg!r}")
        if "=" in arg:
            key, text = arg[2:].split("=", 1)
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"override {arg} has no value; write {arg}=VALUE")
            key, text = arg[2:], args[i + 1]
            i += 1
        out.append((key, _parse_value(text)))
        i += 1
    return out


def _apply_dotted(cls: type, raw: dict[str, Any], overrides: list[tuple[str, Any]]) -> None:
    for key, value in overrides:
        cursor: Any = cls
        for part in key.split("."):
            if not (dataclasses.is_dataclass(cursor) and part in {f.name for f in dataclasses.fields(cursor)}):
                raise ConfigError(f"override --{key}: no field {part!r} in {_type_name(cursor)}")
            cursor = typing.get_type_hints(cursor)[part]
        _set_dotted(raw, key, value)


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Load `cls` from a TOML file (optional), apply dotted overrides, build and validate it."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist; pass --config with a path to a TOML file")
        try:
            raw = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {p} is not valid TOML: {e}") from None
    _apply_dotted(cls, raw, parse_overrides(overrides or []))
    cfg = from_dict(cls, raw)
    validate = getattr(cfg, "validate", None)
    if validate is not None:
        validate()
    return cfg


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise ConfigError(f"cannot write {value!r} ({type(value).__name__}) to TOML")


def _is_table_array(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def _emit_table(data: dict[str, Any], path: list[str], lines: list[str], array: bool = False) -> None:
    if path:
        name = ".".join(path)
        lines += ["", f"[[{name}]]" if array else f"[{name}]"]
    for key, value in data.items():
        if not isinstance(value, dict) and not _is_table_array(value):
            lines.append(f"{key} = {_toml_value(value)}")
    for key, value in data.items():
        if isinstance(value, dict):
            _emit_table(value, path + [key], lines)
        elif _is_table_array(value):
            for item in value:
                _emit_table(item, path + [key], lines, array=True)


def to_toml(cfg: Any) -> str:
    """The config as TOML that load_config reads back to an equal config."""
    lines: list[str] = []
    _emit_table(to_dict(cfg), [], lines)
    return "\n".join(lines).lstrip("\n") + "\n"
