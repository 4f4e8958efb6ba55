"""Sweep parameters: dotted run-config keys, tied points under POINT_KEY, and their canonical form
(which names trials and finds a point's place in the grid)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import BaseModel

from e2e_dist.errors import ConfigError

POINT_KEY = "point"
"""Key of the tied points in `tune_param_space()` (one grid_search over the point dicts)."""


def check_settable(key: str) -> None:
    if not key or any(not p for p in key.split(".")) or key in ("name", "tracking.group", POINT_KEY):
        raise ValueError(f"{key!r} cannot be set by a sweep (trial names and the W&B group are the sweep's)")


def check_key(cfg: BaseModel, key: str, where: str) -> None:
    node: Any = cfg
    parts = key.split(".")
    for i, part in enumerate(parts):
        if isinstance(node, dict):  # free-form mappings (deepspeed.overrides) take any key
            return
        if not isinstance(node, BaseModel) or part not in type(node).model_fields:
            raise ConfigError(f"{where}: {key}: unknown run-config key ({'.'.join(parts[:i + 1])})")
        node = getattr(node, part)


def blame_override(detail: str, keys: list[str]) -> str:
    """`<field>: <message>` of the base config's first error -> `overrides.<key>: <message>` when a
    key of the sweep's `overrides` set that field (or made the unknown section above it), else
    `base: <detail>`: the user edits the sweep's `overrides`, not the preset its base names."""
    field, sep, msg = detail.partition(": ")
    for key in keys if sep else []:
        if field == key or field.startswith(key + "."):
            return f"overrides.{field}: {msg}"
        if key.startswith(field + ".") and msg == "unknown field":
            return f"overrides.{key}: unknown field ({field})"
    return f"base: {detail}"


def flatten_params(params: dict[str, Any]) -> dict[str, Any]:
    """A Tune trial config (tied point under POINT_KEY) -> flat `{dotted key: value}`."""
    flat = {k: v for k, v in params.items() if k != POINT_KEY}
    flat.update(params.get(POINT_KEY) or {})
    return flat


def canon(params: dict[str, Any]) -> str:
    return json.dumps(params, sort_keys=True, default=str)


def canon_hash(params: dict[str, Any]) -> str:
    return hashlib.sha1(canon(params).encode()).hexdigest()[:6]


def show_params(params: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in params.items())
