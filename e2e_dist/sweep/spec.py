"""Sweep specs: a base run config plus a search space, validated whole before any trial starts.

A sweep file (see `tune_configs/`) names a base run config (preset, YAML path or inline mapping),
dotted-key `overrides` of it, and what varies:

- `search_space`: dotted run-config key -> one domain: `{grid: [..]}`, `{choice: [..]}`,
  `{uniform: [lo, hi]}`, `{loguniform: [lo, hi]}`, `{randint: [lo, hi]}` (hi exclusive, as in Ray);
- `points`: parameters that vary *together* (tied), as a list of explicit points, e.g. a scaling
  grid's (model size, data size) pairs chosen so that C ~ 6*N*D hits a few compute budgets. Points
  are crossed with the grid dimensions of `search_space`.

Every point of the space is validated as a full RunConfig here (heads not dividing width, a fraction
above 1, ...), so a bad sweep is one line before Ray starts. Trials are named
`<sweep>-t<index>-<hash of params>`, belong to the W&B group `<sweep>`, and live under
`<storage.path>/<sweep>/` next to the sweep's `results.jsonl`.

Split by concern: the sweep's scheduler/resources sections (sweep/sections.py), parameters and
their canonical form (sweep/params.py), base and `--set` resolution (sweep/overrides.py); the
names used elsewhere stay importable from here.
"""

from __future__ import annotations

import copy
import itertools
import math
import re
from pathlib import Path
from typing import Any, Iterator, Literal

import numpy as np
from pydantic import Field, PrivateAttr, ValidationError, ValidationInfo, field_validator

from e2e_dist.config import (
    RunConfig,
    Section,
    StorageConfig,
    absolute_path,
    format_validation_error,
    read_yaml_with_includes,
    set_dotted,
    validate_run_config,
)
from e2e_dist.errors import ConfigError
from e2e_dist.sweep.domains import Domain
from e2e_dist.sweep.overrides import apply_sweep_overrides, resolve_base
from e2e_dist.sweep.params import (
    POINT_KEY,
    blame_override,
    canon,
    canon_hash,
    check_key,
    check_settable,
    flatten_params,
    show_params,
)
from e2e_dist.sweep.sections import ResourcesSpec, SchedulerSpec

__all__ = ["MAX_VALIDATED", "POINT_KEY", "ResourcesSpec", "SchedulerSpec", "SweepSpec", "flatten_params", "load_sweep"]

MAX_VALIDATED = 20000
"""Most combinations validated up front; a bigger space is refused rather than half-checked."""
_NAME_RE = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}"  # leaves room for "-t0000-abcdef" in a 128-char run name


class SweepSpec(Section):
    name: str
    """Sweep name: the W&B group, the results folder `<storage.path>/<name>` and trial-name prefix."""
    base: str | dict[str, Any]
    """Base run config: a preset name, a YAML path relative to the sweep file, or an inline mapping."""
    overrides: dict[str, Any] = {}
    """Dotted run-config keys set on the base for every trial (e.g. `trainer.max_steps: 50`)."""
    search: Literal["grid", "random"] = "grid"
    """grid: only `grid` domains, every combination once; random: also sampled domains."""
    num_samples: int = Field(1, ge=1)
    """random: samples per grid combination (Ray's num_samples); grid: must be 1."""
    seed: int = 0
    """Seed of random sampling."""
    search_space: dict[str, Domain] = {}
    """Dotted run-config key -> domain. Grid dimensions are crossed with each other and with `points`."""
    points: list[dict[str, Any]] = []
    """Tied parameters: explicit points (dotted key -> value), all with the same keys."""
    metric: str = "val_loss"
    """Target metric reported by trials."""
    mode: Literal["min", "max"] = "min"
    """Whether the target metric is minimized or maximized."""
    scheduler: SchedulerSpec = SchedulerSpec()
    """Early stopping."""
    max_concurrent_trials: int | None = Field(None, ge=1)
    """Trials running at once (None: as many as resources allow)."""
    resources_per_trial: ResourcesSpec = ResourcesSpec()
    """Workers and CPUs/GPUs of each trial."""
    storage: StorageConfig | None = None
    """Override of the base run config's storage (only the keys given); the sweep lives at
    `<storage.path>/<sweep name>`."""

    _source: str = PrivateAttr("sweep")
    _base_data: dict[str, Any] = PrivateAttr(default_factory=dict)
    _grid_index: dict[str, int] | None = PrivateAttr(None)

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        if not re.fullmatch(_NAME_RE, v):
            raise ValueError(f"{v!r} must be letters, digits, '_', '.', '-' (max 100)")
        return v

    @field_validator("overrides")
    @classmethod
    def _overrides_keys(cls, v: dict[str, Any]) -> dict[str, Any]:
        for key in v:
            check_settable(key)
        return v

    @field_validator("num_samples")
    @classmethod
    def _samples_vs_search(cls, v: int, info: ValidationInfo) -> int:
        if info.data.get("search") == "grid" and v != 1:
            raise ValueError("must be 1 for search: grid (add trainer.seed to the grid for repeats)")
        return v

    @field_validator("search_space")
    @classmethod
    def _space_vs_search(cls, v: dict[str, Domain], info: ValidationInfo) -> dict[str, Domain]:
        for key, dom in v.items():
            check_settable(key)
            if info.data.get("search") == "grid" and dom.kind != "grid":
                raise ValueError(f"{key}: {dom.kind} needs search: random")
        return v

    @field_validator("points")
    @classmethod
    def _points_tied(cls, v: list[dict[str, Any]], info: ValidationInfo) -> list[dict[str, Any]]:
        seen: set[str] = set()
        for i, p in enumerate(v):
            if not p:
                raise ValueError(f"points[{i}] is empty")
            if set(p) != set(v[0]):
                raise ValueError(f"points[{i}] has keys {sorted(p)}, points[0] has {sorted(v[0])}")
            if (h := canon(p)) in seen:
                raise ValueError(f"points[{i}] repeats an earlier point")
            seen.add(h)
            for key in p:
                check_settable(key)
        if v and (both := set(v[0]) & set(info.data.get("search_space") or {})):
            raise ValueError(f"{sorted(both)[0]} is in both search_space and points")
        return v

    def with_absolute_paths(self) -> "SweepSpec":
        """A copy whose local storage path and data paths are absolute. Trials run in Ray worker
        processes whose working directory is not the command's: `./runs` must mean the same there."""
        spec = self.model_copy(deep=True)
        data = spec._base_data = copy.deepcopy(self._base_data)
        store = data.setdefault("storage", {})
        store["path"] = absolute_path(store.get("path", "./runs"))
        if isinstance(paths := (data.get("data") or {}).get("paths"), list):
            data["data"]["paths"] = [absolute_path(p) for p in paths]
        spec._grid_index = None
        return spec

    # ------------------------------------------------------------------------------ expansion
    @property
    def sweep_uri(self) -> str:
        """`<storage.path>/<sweep name>`: trial runs and results.jsonl live here."""
        # Resolved as a run's storage.path is (a relative path: from where the sweep was loaded).
        path = StorageConfig.model_validate(self._base_data.get("storage") or {}).path
        return path.rstrip("/") + "/" + self.name

    @property
    def results_uri(self) -> str:
        return self.sweep_uri + "/results.jsonl"

    def base_data(self) -> dict[str, Any]:
        """The base run config as data, with the sweep's overrides, storage and resources applied."""
        return copy.deepcopy(self._base_data)

    @property
    def base_config(self) -> RunConfig:
        """The base run config with the sweep's overrides, storage and resources applied; an error
        in a field that `overrides` set is named `overrides.<key>`."""
        try:
            return RunConfig.model_validate(copy.deepcopy(self._base_data))
        except ValidationError as e:
            detail = format_validation_error(e, "base").removeprefix("base: ")
            raise ConfigError(f"{self._source}: {blame_override(detail, list(self.overrides))}") from None

    def num_trials(self) -> int:
        grid = math.prod(len(d.grid) for d in self.search_space.values() if d.kind == "grid")
        return grid * max(len(self.points), 1) * self.num_samples

    def _grid_params(self) -> Iterator[dict[str, Any]]:
        grid_keys = [k for k, d in self.search_space.items() if d.kind == "grid"]
        for combo in itertools.product(*(self.search_space[k].grid for k in grid_keys)):
            for point in self.points or [{}]:
                yield {**dict(zip(grid_keys, combo)), **point}

    def trial_params(self) -> list[dict[str, Any]]:
        """Every trial's flat params, in index order. Random sweeps: the very draws and order of the
        sweep's Tuner, whose BasicVariantGenerator(random_state=seed) (runner.build_tuner) runs
        Tune's `generate_variants` once per sample with one rng; the index is Tune's trial counter."""
        if self.search == "grid":
            return list(self._grid_params())
        from ray.tune.search.variant_generator import generate_variants

        rng = np.random.default_rng(self.seed)  # what the generator makes of an int random_state
        space = self.tune_param_space()
        return [flatten_params(config) for _ in range(self.num_samples)
                for _, config in generate_variants(space, random_state=rng)]

    def trial_configs(self) -> list[tuple[dict[str, Any], RunConfig]]:
        """(params, RunConfig) of every trial, named `<sweep>-t<index>-<hash>`."""
        return [(p, self.run_config_for(p, index=i)) for i, p in enumerate(self.trial_params())]

    def tune_param_space(self) -> dict[str, Any]:
        """Ray Tune param_space: `{dotted key: tune domain}`, tied points as one grid_search under
        POINT_KEY. A trial's Tune config goes back through `run_config_for` unchanged."""
        space: dict[str, Any] = {k: d.to_tune() for k, d in self.search_space.items()}
        if self.points:
            from ray import tune

            space[POINT_KEY] = tune.grid_search([dict(p) for p in self.points])
        return space

    def run_config_for(self, params: dict[str, Any], index: int | None = None) -> RunConfig:
        """Base + params -> the trial's RunConfig: a unique name `<sweep>-t<index>-<hash>`,
        tracking.group = sweep name, storage under the sweep folder. `params` are flat dotted keys
        or a Tune config (with POINT_KEY). For grid sweeps `index` defaults to the point's place in
        the grid (stable across resumes); random sweeps must pass it (e.g. from the Tune trial id)."""
        flat = flatten_params(params)
        allowed = set(self.search_space) | (set(self.points[0]) if self.points else set())
        if unknown := sorted(set(flat) - allowed):
            raise ConfigError(f"{self._source}: {unknown[0]} is not a parameter of this sweep")
        if index is None:
            if self.search != "grid":
                raise ValueError("run_config_for: random sweeps need the trial index")
            if self._grid_index is None:
                self._grid_index = {canon(p): i for i, p in enumerate(self._grid_params())}
            index = self._grid_index.get(canon(flat))
            if index is None:
                raise ConfigError(f"{self._source}: {show_params(flat)} is not a point of this sweep")
        data = self._apply(flat)
        data["name"] = f"{self.name}-t{index:03d}-{canon_hash(flat)}"
        return validate_run_config(data, f"{self._source} [{show_params(flat)}]")

    def _apply(self, flat: dict[str, Any]) -> dict[str, Any]:
        data = copy.deepcopy(self._base_data)
        for key, value in flat.items():
            try:
                data = set_dotted(data, key, value, merge=True)
            except ValueError as e:  # a key below a plain value of a free-form mapping
                raise ConfigError(f"{self._source} [{show_params(flat)}]: {key}: {e}") from None
        data.setdefault("tracking", {})["group"] = self.name
        data.setdefault("storage", {})["path"] = self.sweep_uri
        return data

    # ----------------------------------------------------------------------------- validation
    def _check(self) -> None:
        """Every key names a run-config field; every combination is a valid run config."""
        if not self.search_space and not self.points:
            raise ConfigError(f"{self._source}: nothing to sweep: give search_space and/or points")
        base_cfg = self.base_config
        for where, keys in (("search_space", self.search_space), ("points", self.points[0] if self.points else {})):
            for key in keys:
                check_key(base_cfg, key, f"{self._source}: {where}")
        dims = {k: d.check_values() for k, d in self.search_space.items()}
        combos = math.prod(len(v) for v in dims.values()) * max(len(self.points), 1)
        if combos > MAX_VALIDATED:
            raise ConfigError(f"{self._source}: search_space has {combos} combinations to validate "
                              f"(max {MAX_VALIDATED}); split the sweep")
        keys = list(dims)
        for combo in itertools.product(*dims.values()):
            for point in self.points or [{}]:
                flat = {**dict(zip(keys, combo)), **point}
                validate_run_config(self._apply(flat), f"{self._source} [{show_params(flat)}]")


# -------------------------------------------------------------------------------------- loading
def load_sweep(path: str | Path, overrides: list[str] | None = None) -> SweepSpec:
    """Read, override and fully validate a sweep file; every failure is one ConfigError line.

    `--set` items: `<sweep field>=v` (e.g. `num_samples=2`, `scheduler.max_t=4`);
    `search_space.<dotted key>={grid: [..]}`; and run-config keys, which override the base for every
    trial: `trainer.max_steps=5`, `base.trainer.max_steps=5` or `overrides.trainer.max_steps=5` alike
    (`storage.path=s3://b/p` sets the sweep's storage).
    """
    source = str(path)
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"sweep file not found: {source}")
    data = read_yaml_with_includes(str(p))  # YAML errors and `include:` exactly as for run configs
    data = apply_sweep_overrides(data, overrides or [], SweepSpec.model_fields)
    try:
        spec = SweepSpec.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source)) from None
    spec._source = source
    spec._base_data = resolve_base(spec, p.resolve().parent, source)
    spec._check()
    return spec
