"""Dataclass configs from TOML files and `a.b=value` overrides, and back to plain dicts.

One loader for every config: nested dataclasses are TOML tables (`[policy] kl_beta = 0.05`),
overrides name fields by their dotted path (`policy.kl_beta=0.05`, the value parsed as TOML),
and an unknown key or a wrong type is refused with the full dotted name and the expected type.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from pathlib import Path

from fuseloop.errors import ConfigError


def load_toml(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None


def parse_override(text: str) -> tuple[str, object]:
    """`policy.kl_beta=0.05` -> ("policy.kl_beta", 0.05). The value is a TOML value; a bare word is a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: write it as NAME=VALUE, e.g. policy.kl_beta=0.05")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key.strip(), value


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    """A copy of nested `values` with each NAME=VALUE set at its dotted path."""
    out = _deep_copy(values)
    for text in overrides:
        key, value = parse_override(text)
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {text!r}: {part} is not a table")
        node[leaf] = value
    return out


def build(cls: type, values: dict, base=None, prefix: str = ""):
    """`cls` from nested `values`; fields left out keep `base`'s values (or the defaults)."""
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a table, got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"unknown config key {prefix}{unknown[0]}; "
                          f"known under {prefix.rstrip('.') or 'the top level'}: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, value in values.items():
        kind, current = hints[name], getattr(base, name, None) if base is not None else None
        if dataclasses.is_dataclass(kind):
            kwargs[name] = build(kind, value, current if current is not None else _default(fields[name]),
                                 f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, kind, f"{prefix}{name}")
    if base is not None:
        return dataclasses.replace(base, **kwargs)
    return cls(**kwargs)


def to_dict(config) -> dict:
    """Plain values for TOML/JSON: Paths as strings, tuples as lists, infinities as strings JSON keeps."""
    return {f.name: _plain(getattr(config, f.name)) for f in dataclasses.fields(config)}


def to_toml(config) -> str:
    """The config as a TOML document that `build` reads back."""
    scalars, tables = [], []

    def emit(prefix: str, d: dict) -> None:
        lines = [f"{k} = {_toml_value(v)}" for k, v in d.items() if not isinstance(v, dict) and v is not None]
        (tables if prefix else scalars).append((prefix, lines))
        for k, v in d.items():
            if isinstance(v, dict):
                emit(f"{prefix}{k}.", v)

    emit("", {f.name: _raw(getattr(config, f.name)) for f in dataclasses.fields(config)})
    out = scalars[0][1]
    for prefix, lines in tables:
        out += ["", f"[{prefix.rstrip('.')}]", *lines]
    return "\n".join(out) + "\n"


# -- internals ---------------------------------------------------------------------------------
def _default(field: dataclasses.Field):
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None if field.default is dataclasses.MISSING else field.default


def _type_name(kind) -> str:
    return getattr(kind, "__name__", None) or str(kind).replace("typing.", "")


def _coerce(value, kind, name: str):
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() == "none" and type(None) in args):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, name)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(f"{name} must be {' or '.join(_type_name(a) for a in args if a is not type(None))}"
                          f"{' (or none)' if type(None) in args else ''}, got {value!r}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list of {_type_name(args[0]) if args else 'values'}, got {value!r}")
        item = args[0] if args else object
        items = [_coerce(v, item, f"{name}[{i}]") for i, v in enumerate(value)] if item is not object else list(value)
        return tuple(items) if origin is tuple else items
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and value.lower() in ("inf", "+inf", "-inf"):
            return float(value)
    elif kind is str:
        if isinstance(value, str):
            return value
    elif kind is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
    elif kind in (dict, object) or origin is dict:
        return value
    raise ConfigError(f"{name} must be {_type_name(kind)}, got {value!r} ({type(value).__name__})")


def _raw(value):
    if dataclasses.is_dataclass(value):
        return {f.name: _raw(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    return value


def _plain(value):
    value = _raw(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"  # JSON has no infinity; _coerce reads these back
    return value


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    s = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{s}"'


def _deep_copy(d: dict) -> dict:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in d.items()}
