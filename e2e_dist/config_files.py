"""Config files as data: built-in presets, YAML files and their `include:` lists, merged; `--set`.

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
        if inc_source not in preset_names() and not Path(inc_source).expanduser().is_file():
            raise ConfigError(f"{source}: include: file not found: {inc} (looked for {inc_source})")
        merged = deep_merge(merged, read_yaml_with_includes(inc_source, _seen + ((path,) if path else ())))
    return deep_merge(merged, data)


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# ------------------------------------------------------------------------------- --set
def override_value(raw: str) -> Any:
    """A `--set` value (run or sweep): YAML, so 3, 1e-3, true, [1, 2] are typed; else the raw string."""
    try:
        return yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        return raw


def set_dotted(data: dict[str, Any], key: str, value: Any, *, merge: bool = False) -> dict[str, Any]:
    """A copy of `data` with dotted `key` set to `value`. The sections on the way are copied (the
    caller's nested dicts stay as they were) and made when missing or null. `merge`: a mapping value
    is deep-merged into a mapping already there (sweep overrides) instead of replacing it (`--set`).
    ValueError when a part on the way holds a plain value: a leaf has no sub-keys."""
    head, dot, rest = key.partition(".")
    out = dict(data)
    if dot:
        child = {} if out.get(head) is None else out[head]
        if not isinstance(child, dict):
            raise ValueError(f"{head} is not a section")
        out[head] = set_dotted(child, rest, value, merge=merge)
    elif merge and isinstance(value, dict) and isinstance(out.get(head), dict):
        out[head] = deep_merge(out[head], value)
    else:
        out[head] = value
    return out


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` strings (values typed by `override_value`)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"--set {item!r}: expected key.sub=value")
        try:
            data = set_dotted(data, key, override_value(raw))
        except ValueError as e:
            raise ConfigError(f"--set {item!r}: {e}") from None
    return dict(data)
