"""What a sweep file's base and `--set` items turn into: the base run config as data (preset, YAML
path or inline mapping, with the sweep's overrides, storage and resources applied), and sweep-file
data with `--set` items applied."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from e2e_dist.config import apply_overrides, override_value, set_dotted
from e2e_dist.config_files import deep_merge, preset_names, read_yaml_with_includes
from e2e_dist.errors import ConfigError

if TYPE_CHECKING:
    from e2e_dist.sweep.spec import SweepSpec

RUN_SECTIONS = ("data", "model", "trainer", "deepspeed", "tracking")


def apply_sweep_overrides(data: dict[str, Any], overrides: list[str], sweep_fields: Iterable[str]) -> dict[str, Any]:
    """Sweep-file data with `--set` items applied (see `load_sweep` for the forms an item takes);
    `sweep_fields` are the top-level keys of a sweep file."""
    data = copy.deepcopy(data)
    sweep_fields = set(sweep_fields)
    for item in overrides:
        key, sep, raw = item.partition("=")
        head, _, rest = key.partition(".")
        if not sep or not head:
            raise ConfigError(f"--set {item!r}: expected key=value")
        if head in ("search_space", "overrides", "base") and rest:
            # The rest of the key is itself a dotted run-config key: keep it whole. `base.x=v` is
            # `overrides.x=v` (the base may be a preset name, which has no keys to set).
            section = "search_space" if head == "search_space" else "overrides"
            data[section] = {**(data.get(section) or {}), rest: override_value(raw)}
        elif head in sweep_fields:
            data = apply_overrides(data, [item])
        elif head in RUN_SECTIONS and rest:
            data["overrides"] = {**(data.get("overrides") or {}), key: override_value(raw)}
        else:
            raise ConfigError(f"--set {item!r}: {head!r} is neither a sweep field nor a run-config section")
    return data


def resolve_base(spec: SweepSpec, sweep_dir: Path, source: str) -> dict[str, Any]:
    """The base run config as data, with the sweep's overrides, storage and resources applied."""
    def read(ref: str) -> dict[str, Any]:  # a preset name, else a path relative to the sweep file
        return read_yaml_with_includes(ref if ref in preset_names() else str(sweep_dir / ref))

    try:
        if isinstance(spec.base, str):
            data = read(spec.base)
        else:
            data = copy.deepcopy(spec.base)  # what follows must not change the spec's own base
            includes = data.pop("include", []) or []
            merged: dict[str, Any] = {}
            for inc in [includes] if isinstance(includes, str) else includes:
                merged = deep_merge(merged, read(inc))
            data = deep_merge(merged, data)
    except ConfigError as e:
        raise ConfigError(f"{source}: base: {e}") from None
    for key, value in spec.overrides.items():
        try:
            data = set_dotted(data, key, value, merge=True)
        except ValueError as e:
            raise ConfigError(f"{source}: overrides: {key}: {e}") from None
    if spec.storage is not None:
        data["storage"] = {**(data.get("storage") or {}), **spec.storage.model_dump(exclude_unset=True)}
    res = spec.resources_per_trial
    trainer = data.setdefault("trainer", {})
    for field in ("num_workers", "cpus_per_worker", "use_gpu"):
        if getattr(res, field) is not None:
            trainer[field] = getattr(res, field)
    return data
