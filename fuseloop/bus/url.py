"""`open_bus(url)`: one string picks and configures the bus.

    kafka://HOST:PORT[,HOST:PORT...][?api_version=0.9&spool_dir=/var/lib/x&spool_max_bytes=...]
    sqlite:///ABSOLUTE/PATH.db[?partitions=3]
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

from fuseloop.bus.base import EventBus


DEFAULT_BUS_ENV = "FUSELOOP_BUS"


def default_bus_url() -> str:
    """$FUSELOOP_BUS, else the embedded bus in ./.fuseloop/bus.db (one machine, no Kafka needed)."""
    return os.environ.get(DEFAULT_BUS_ENV) or f"sqlite://{Path.cwd().resolve() / '.fuseloop' / 'bus.db'}"


def parse_api_version(text: str) -> tuple[int, ...] | None:
    """"0.9" -> (0, 9); "auto" or "" -> None (ask the broker)."""
    if text in ("", "auto"):
        return None
    try:
        return tuple(int(part) for part in text.split("."))
    except ValueError:
        raise ValueError(f"api_version must look like 0.9 or 3.7 (or auto), got {text!r}") from None


def open_bus(url: str, **settings: object) -> EventBus:
    """The bus a URL names. `settings` fill KafkaBusConfig/SqliteBusConfig fields the URL leaves out
    (e.g. client_id, spool_dir); the URL's query wins over them. Settings the chosen bus does not
    have are ignored (a service passes spool_dir whatever the URL); unknown query keys are errors."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    if parts.scheme == "kafka":
        from fuseloop.bus.kafka import KafkaBus, KafkaBusConfig

        if not parts.netloc:
            raise ValueError(f"a Kafka bus URL needs brokers: kafka://HOST:PORT[,HOST:PORT], got {url!r}")
        values = {**_known(KafkaBusConfig, settings), **query}
        if "api_version" in values and isinstance(values["api_version"], str):
            values["api_version"] = parse_api_version(values["api_version"])
        return KafkaBus(_build(KafkaBusConfig, {"bootstrap": parts.netloc, **values}, url))
    if parts.scheme == "sqlite":
        from fuseloop.bus.sqlite import SqliteBus, SqliteBusConfig

        if parts.netloc or not parts.path.startswith("/") or parts.path == "/":
            raise ValueError(f"a SQLite bus URL needs an absolute file path: sqlite:///ABS/PATH.db, got {url!r}")
        return SqliteBus(_build(SqliteBusConfig, {"path": parts.path, **_known(SqliteBusConfig, settings), **query}, url))
    raise ValueError(
        f"unknown bus URL {url!r}: use kafka://HOST:PORT[,HOST:PORT]?api_version=0.9 or sqlite:///ABS/PATH.db"
    )


def _known(cls: type, settings: dict) -> dict:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in settings.items() if k in names}


def _build(cls: type, values: dict, url: str):
    """The config dataclass from strings (URL query) and typed values (keyword settings)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"unknown bus setting(s) {', '.join(unknown)} in {url!r}; known: {', '.join(sorted(fields))}")
    typed = {}
    for name, value in values.items():
        if isinstance(value, str):
            kind = str(fields[name].type)
            try:
                if kind.startswith("int"):
                    value = int(value)
                elif kind.startswith("float"):
                    value = float(value)
                elif kind == "str | None" and value.lower() in ("", "none"):
                    value = None
            except ValueError:
                raise ValueError(f"bus setting {name}={value!r} in {url!r} is not a {kind}") from None
        typed[name] = value
    return cls(**typed)
