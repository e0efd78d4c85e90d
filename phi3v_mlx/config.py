"""Reading a checkpoint's ``config.json``: the parts every architecture shares (the file, its
``model_type``, building a config dataclass from the keys it knows)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration this package cannot run."""


def known_fields(cls: type[T], values: dict[str, Any]) -> T:
    """A dataclass built from the keys of ``values`` it knows, ignoring the rest."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in names})


def config_from_dict(cls: type[T], values: dict[str, Any]) -> T:
    """A config dataclass from a parsed ``config.json``, one clear error for a missing key or a
    malformed value."""
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
        and f.name not in values
    ]
    if missing:
        raise ConfigError(f"config.json lacks {', '.join(missing)}")
    try:
        return known_fields(cls, values)
    except (TypeError, KeyError) as e:
        raise ConfigError(f"config.json is malformed: {e}") from None


def read_config(path: str | Path) -> dict[str, Any]:
    """The parsed ``config.json`` (of a folder, or the file itself)."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ConfigError(f"no config.json at {path}")
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path} does not hold a JSON object")
    return values
