"""What a plug-in declares besides its builder: a typed section for its own options.

    from pydantic import BaseModel
    from e2e_dist import plugins

    class ConformerOptions(BaseModel):
        model_config = {"extra": "forbid"}
        depth: int = 4

    @plugins.options(ConformerOptions)
    def build_conformer(model_cfg, data_cfg=None):
        opts = model_cfg.options      # a validated ConformerOptions
        ...

`model.options` / `data.options` in a run config are validated against that model when the config
is loaded, before Ray starts: an unknown or ill-typed option is one line naming the field
(`model.options.depth: ...`). The contract a model and a data source must keep: docs/plugins.md;
`e2e-dist check-plugin` verifies it. This module must not import torch or Ray.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from e2e_dist.errors import ConfigError

F = TypeVar("F", bound=Callable)


def options(model: type[BaseModel]) -> Callable[[F], F]:
    """Declare the pydantic model of a builder's `options` section."""
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        raise TypeError(f"plugins.options takes a pydantic BaseModel class, got {model!r}")

    def deco(fn: F) -> F:
        fn.options_model = model  # type: ignore[attr-defined]
        return fn

    return deco


def validated_options(builder: Callable, raw: Any, field: str) -> BaseModel | None:
    """`raw` options validated against the builder's declared model (None when it declares none
    and none were given); a ConfigError naming `field.<name>` otherwise."""
    model = getattr(builder, "options_model", None)
    if model is None:
        if raw:
            raise ConfigError(f"{field}: this plug-in declares no options (got {sorted(raw)})")
        return None
    if isinstance(raw, model):
        return raw
    try:
        return model.model_validate(raw or {})
    except ValidationError as e:
        from e2e_dist.config_data import describe_first_error

        loc, msg, got_txt = describe_first_error(e, unknown="unknown option")
        raise ConfigError(f"{'.'.join([field, *loc])}: {msg}{got_txt}") from None


def source_options(source: str, raw: Any) -> BaseModel | None:
    """`data.options` validated for the source `data.source` names. The built-in sources take
    none (their settings are data.* fields); their module is not imported here (config loading
    stays light)."""
    from e2e_dist.registry import declared_builtin, is_import_path

    if not is_import_path(source) and declared_builtin("e2e_dist.data_sources", source):
        if raw:
            raise ConfigError(f"data.options: source {source!r} is built in and takes its settings from data.* "
                              f"fields (options are for plug-in sources)")
        return None
    from e2e_dist.data.registry import SOURCES

    return validated_options(SOURCES.get(source), raw, "data.options")


def cmd_check_plugin(args) -> int:
    from e2e_dist.config import load_run_config
    from e2e_dist.console import RunLog, default_log_path
    from e2e_dist.plugin_check import check_plugin

    cfg = load_run_config(args.config, args.overrides)
    with RunLog(default_log_path(None, f"{cfg.name}-check-plugin")) as run_log:
        failures = check_plugin(cfg, data=not args.no_data, engines=not args.no_engines)
    what = f"model {cfg.model.kind!r}" + ("" if args.no_data else f", data {cfg.data.source!r}")
    for line in failures:
        print(f"check-plugin: {line}")
    print(f"check-plugin: {what}: {len(failures)} problem(s)" if failures else f"check-plugin: {what}: the contract holds "
          f"(forward/backward, eval sums, FLOPs{'' if args.no_engines else ', ZeRO-2/3 save-load, export'}"
          f"{'' if args.no_data else ', data order'}); log file {run_log.path}")
    return 1 if failures else 0


def register_cli(sub) -> None:
    p = sub.add_parser("check-plugin", help="check a model / data plug-in against the contract (docs/plugins.md)",
                       description="Build a config's model and data on CPU and check what training relies on.")
    p.add_argument("config", help="a run YAML file or a preset naming the plug-in (model.kind / data.source)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field (repeatable)")
    p.add_argument("--no-data", action="store_true", help="check the model only (example batches)")
    p.add_argument("--no-engines", action="store_true", help="skip the ZeRO-2/3 save-load checks (faster)")
    p.set_defaults(func=cmd_check_plugin)
