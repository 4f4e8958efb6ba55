"""Config files as data: built-in presets, YAML files and their `include:` lists, merged.

Split from config.py so that reading YAML (also cluster yamls) needs neither pydantic nor the run
config; config.py re-exports the names other modules import from it.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from e2e_dist.errors import ConfigError


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("e2e_dist.presets").iterdir() if p.name.endswith(".yaml"))


def safe_load_yaml(text: str, error: Callable[[int | None, Any], Exception]) -> Any:
    """`yaml.safe_load`; a syntax error raises `error(line or None, problem)` instead, without the
    parser's chained traceback (callers word it as one line that names their file)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise error(mark.line + 1 if mark else None, getattr(e, "problem", e)) from None


def read_yaml_with_includes(source: str, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a preset name or YAML path; `include: [a.yaml, ...]` files are merged first, this file over them."""
    if source in preset_names():
        text, path = (resources.files("e2e_dist.presets") / f"{source}.yaml").read_text(), None
    else:
        path = Path(source).expanduser().resolve()
        if not path.is_file():
            hint = f" (presets: {', '.join(preset_names())})" if "/" not in source and not source.endswith((".yaml", ".yml")) else ""
            raise ConfigError(f"config file not found: {source}{hint}")
        if path in _seen:
            raise ConfigError(f"include cycle through {path}")
        text = path.read_text()
    data = safe_load_yaml(text, lambda line, problem: ConfigError(
        f"{source}:{'' if line is None else f' line {line}'} is not valid YAML ({problem})")) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: top level must be a mapping, got {type(data).__name__}")
    includes = data.pop("include", []) or []
    if isinstance(includes, str):
        includes = [includes]
    merged: dict[str, Any] = {}
    for inc in includes:
        inc_source = inc if (path is None or inc in preset_names()) else str(path.parent / inc)
        merged = deep_merge(merged, read_yaml_with_includes(inc_source, _seen + ((path,) if path else ())))
    return deep_merge(merged, data)


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
