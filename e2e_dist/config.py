"""The one composed run config: data / model / trainer / deepspeed / storage / tracking.

Loaded from a YAML file (with `include:` of other YAML files) or a built-in preset name, then
`--set key.sub=value` overrides, then validated. Every validation failure becomes a one-line
`ConfigError` naming the field (reading the files: config_files.py). This module must not import
Ray, DeepSpeed or torch.
"""

from __future__ import annotations

import os
import re
from typing import Any, Literal

import yaml
from pydantic import (
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from e2e_dist.config_data import (
    DataConfig,
    Section,
    describe_first_error,
    refuse_retired,
)
from e2e_dist.config_files import (  # noqa: F401 - re-exported: their users import them from here
    apply_overrides,
    deep_merge,
    override_value,
    preset_names,
    read_yaml_with_includes,
    set_dotted,
)
from e2e_dist.config_model import (  # noqa: F401 - re-exported
    BUILTIN_MODEL_KINDS,
    CTCSpeechConfig,
    GPTConfig,
    ModelConfig,
    PluginModelConfig,
    ResNetConfig,
)
from e2e_dist.errors import ConfigError

SECRET_KEYS = re.compile(r"(secret|password|token|api_key|access_key|session_key)", re.IGNORECASE)


def absolute_path(path: str) -> str:
    """A local path (`~`, relative, or `file://`) -> absolute, from the working directory of this
    moment; a URI of another scheme (`s3://...`) unchanged. The one rule for making paths absolute:
    Ray runs workers and trials in directories of their own, where a relative path is another place."""
    if "://" in path and not path.startswith("file://"):
        return path
    return os.path.abspath(os.path.expanduser(path.removeprefix("file://")))


# -------------------------------------------------------------------------------------- trainer
class TrainerConfig(Section):
    max_steps: int = Field(100, ge=1)
    """Optimizer steps to train for (each = grad_accum micro-batches per worker)."""
    micro_batch_size: int = Field(8, ge=1)
    """Examples per worker per micro-batch."""
    grad_accum: int = Field(1, ge=1)
    """Micro-batches accumulated per optimizer step (with global_batch_size unset)."""
    global_batch_size: int | None = Field(None, ge=1)
    """Examples (text windows of seq_len bytes, images, clips) per optimizer step over all workers.
    Set, it holds the optimization fixed whatever the live world size: grad_accum is derived as
    global_batch_size / (micro_batch_size x world size), so 2 or 8 workers take the same steps.
    None: micro_batch_size x grad_accum x world size."""
    lr: float = Field(1e-3, gt=0)
    """Peak learning rate."""
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    """Cosine decay floor as a fraction of lr."""
    warmup_steps: int = Field(10, ge=0)
    """Linear warmup steps before cosine decay."""
    weight_decay: float = Field(0.1, ge=0)
    """AdamW weight decay."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    grad_clip: float = Field(1.0, ge=0)
    """Gradient norm clip (0 disables)."""
    log_every: int = Field(10, ge=1)
    """Steps between metric reports (losses are reduced across ranks only then: no per-step sync)."""
    eval_every: int = Field(50, ge=1)
    """Steps between validation passes."""
    eval_samples: int = Field(256, ge=1)
    """Validation samples each evaluation scores (all of a smaller split): a fixed selection spread
    over the split, shared out among the workers, so the same weights score the same at any world
    size."""
    ckpt_every: int = Field(50, ge=1)
    """Steps between checkpoints (a final one is always taken)."""
    keep_last: int = Field(2, ge=1)
    """Committed checkpoints kept; older ones are deleted only after a newer one commits."""
    num_workers: int | tuple[int, int] = 2
    """Ray Train workers (data-parallel ranks). `[min, max]` makes the run elastic: it starts with
    what the cluster can give (at least min), continues on fewer workers after a node is lost and
    grows back up to max when capacity returns (checkpoints reshard on resume)."""
    resize_check_s: float = Field(60.0, gt=0)
    """Elastic runs: seconds between Ray Train's checks for capacity to grow the worker group."""
    cpus_per_worker: float = Field(1.0, gt=0)
    """CPUs reserved per worker."""
    use_gpu: bool | None = None
    """One GPU per worker; None = use GPUs when the Ray cluster has any."""
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """torch.distributed backend; auto = nccl on GPU, gloo on CPU."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """auto = bf16 on GPU, fp32 on CPU."""
    activation_checkpointing: bool = False
    """Recompute block activations in backward (saves memory, costs ~30% compute)."""
    compile: bool | None = None
    """torch.compile the model under DeepSpeed (`engine.compile()`); None = on for GPU workers, off
    on CPU (where compile time outweighs the gain for the small models people run there)."""
    check_memory: bool = True
    """On GPU, refuse at the start a setting that `e2e-dist plan` estimates cannot fit the card (one line
    naming what to change); false: try anyway (the estimate is conservative, see plan/)."""
    prefetch_batches: int = Field(2, ge=0)
    """Micro-batches prepared ahead in a background thread (read, collated, pinned and copied to
    the GPU), so the step never waits on input."""
    max_failures: int = Field(0, ge=-1)
    """Ray Train FailureConfig: worker-group restarts allowed (-1 = unlimited)."""
    async_checkpoint: bool = True
    """Upload checkpoints in the background while training continues."""
    seed: int = 0
    """Seed of model init and dropout."""
    sample_every_eval: bool = False
    """Text: log a generated sample at each evaluation."""
    early_stop_patience: int | None = Field(None, ge=1)
    """Stop the run after this many evaluations in a row that bring the val loss no lower than
    early_stop_min_delta below the best so far (max_steps is then only a cap); val_loss_best keeps
    the best evaluation, and the summary says why the run stopped. None: train all max_steps."""
    early_stop_min_delta: float = Field(0.0, ge=0)
    """How far below the best so far a val loss must fall to count as an improvement (nats)."""

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        return refuse_retired(data, "eval_batches", "is now eval_samples: validation samples per evaluation over all "
                              "workers (e.g. eval_batches 8 x micro_batch_size 8 x 2 workers = eval_samples 128)")

    @field_validator("num_workers")
    @classmethod
    def _worker_range(cls, v: int | tuple[int, int]) -> int | tuple[int, int]:
        lo, hi = (v, v) if isinstance(v, int) else v
        if lo < 1 or hi < lo:
            raise ValueError(f"need 1 <= min <= max workers, got {v!r}")
        return v

    @property
    def worker_range(self) -> tuple[int, int]:
        """(min, max) workers; equal for a fixed-size run."""
        n = self.num_workers
        return (n, n) if isinstance(n, int) else n

    @property
    def elastic(self) -> bool:
        return self.worker_range[0] != self.worker_range[1]

    @model_validator(mode="after")
    def _global_batch_divides(self) -> TrainerConfig:
        g, m = self.global_batch_size, self.micro_batch_size
        if g is None:
            return self
        if self.grad_accum != 1:
            raise ValueError("set global_batch_size or grad_accum, not both (grad_accum is derived from it)")
        lo, hi = self.worker_range
        if not any(g % (m * w) == 0 for w in range(lo, hi + 1)):
            raise ValueError(f"global_batch_size={g} is not micro_batch_size={m} x a whole number of micro-batches "
                             f"for any world size in [{lo}, {hi}]")
        return self

    def grad_accum_at(self, world: int) -> int:
        """Micro-batches per worker per optimizer step at this world size (see global_batch_size)."""
        g, m = self.global_batch_size, self.micro_batch_size
        if g is None:
            return self.grad_accum
        if g % (m * world):
            raise ConfigError(f"trainer.global_batch_size={g} cannot be split over {world} workers with "
                              f"micro_batch_size={m}: use a multiple of {m * world} or another world size")
        return g // (m * world)


class DeepSpeedConfig(Section):
    zero_stage: int = Field(2, ge=0, le=3)
    """ZeRO stage: 0 = plain data parallel, 1 = optimizer, 2 = + gradients, 3 = + parameters sharded."""
    offload_optimizer: bool = False
    """Keep optimizer state (and the step) on CPU (ZeRO >= 1)."""
    offload_params: bool = False
    """Keep parameters on CPU between uses (ZeRO 3 only)."""
    overrides: dict[str, Any] = {}
    """Raw DeepSpeed config keys merged over the generated config (expert escape hatch)."""

    @model_validator(mode="after")
    def _offload_needs_stage(self) -> DeepSpeedConfig:
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("offload_params needs zero_stage=3")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage>=1")
        return self


class StorageConfig(Section):
    path: str = Field("./runs", validate_default=True)
    """Where runs live: a local directory (made absolute at load) or `s3://bucket/prefix`. A run is
    `<path>/<name>`."""
    endpoint_url: str | None = None
    """S3-compatible endpoint (MinIO, Ceph, R2); falls back to AWS_ENDPOINT_URL. Credentials come
    only from the standard AWS chain, never from this file."""
    region: str | None = None
    """S3 region; falls back to AWS_REGION / AWS_DEFAULT_REGION."""

    @field_validator("path")
    @classmethod
    def _path_scheme(cls, v: str) -> str:
        if "://" in v and not v.startswith(("s3://", "file://")):
            raise ValueError(f"unsupported scheme in {v!r} (use a local path or s3://)")
        if v.startswith("s3://") and len(v[5:].split("/")[0]) < 3:
            raise ValueError(f"bad bucket name in {v!r}")
        # Absolute from where the config is loaded: Ray Train runs workers in a directory of its
        # own, where `./runs` would be another place (checkpoints there, resume looking here).
        return absolute_path(v)


class TrackingConfig(Section):
    wandb: bool = True
    """Log to Weights & Biases (rank 0 only)."""
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    """auto = online when WANDB_API_KEY is set, else offline."""
    project: str = "e2e-dist"
    """W&B project."""
    entity: str | None = None
    """W&B entity (team/user)."""
    group: str | None = None
    """W&B group (sweeps set it to the sweep name)."""
    dir: str | None = None
    """Local directory for W&B files; default `<storage.path>/<name>/wandb` for local storage,
    else `$WANDB_DIR` or `~/.cache/e2e-dist/wandb/<run id>`, copied to `<run>/wandb/` in storage
    at every checkpoint and at the end."""
    tags: list[str] = []
    """W&B tags."""


class RunConfig(Section):
    name: str = "run"
    """Run name: the run directory, the Ray Train run name and the W&B run id derive from it."""
    data: DataConfig = DataConfig()
    """What to read and how to batch it."""
    model: ModelConfig = GPTConfig()
    """Which network (registry `kind`) and its size."""
    trainer: TrainerConfig = TrainerConfig()
    """Steps, batch, optimizer, schedule, workers, failures."""
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    """ZeRO sharding and offload."""
    # Built at load, not at import: a relative storage.path resolves from the cwd of that moment.
    storage: StorageConfig = Field(default_factory=StorageConfig)
    """Run and checkpoint storage."""
    tracking: TrackingConfig = TrackingConfig()
    """Metrics tracking."""

    @model_validator(mode="before")
    @classmethod
    def _default_model_kind(cls, data: Any) -> Any:
        # `model: {n_layer: 4}` means the default kind, not "missing discriminator".
        if isinstance(data, dict) and isinstance(data.get("model"), dict) and "kind" not in data["model"]:
            data = {**data, "model": {"kind": "gpt", **data["model"]}}
        return data

    @field_validator("name")
    @classmethod
    def _name_is_path_safe(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}", v):
            raise ValueError(f"{v!r} must be letters, digits, '_', '.', '-' (max 128)")
        return v

    @model_validator(mode="after")
    def _data_source_options(self) -> RunConfig:
        from e2e_dist.plugins import source_options

        try:
            typed = source_options(self.data.source, self.data.options)
        except ConfigError as e:
            raise ValueError(str(e)) from None
        if typed is not None and typed is not self.data.options:
            self.data.options = typed
        return self

    @model_validator(mode="after")
    def _cross_section(self) -> RunConfig:
        if isinstance(self.model, GPTConfig) and self.model.max_seq_len < self.data.seq_len:
            raise ValueError(
                f"model.max_seq_len={self.model.max_seq_len} < data.seq_len={self.data.seq_len}"
            )
        return self

    @property
    def run_uri(self) -> str:
        return self.storage.path.rstrip("/") + "/" + self.name

    def to_public_dict(self) -> dict[str, Any]:
        """The config as saved with runs and sent to W&B: secret-looking keys are redacted."""
        return redact(self.model_dump(mode="json"))


def redact(obj: Any) -> Any:
    """Replace the values of secret-looking keys (and URL credentials) with '***'."""
    if isinstance(obj, dict):
        return {k: ("***" if SECRET_KEYS.search(str(k)) else redact(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    if isinstance(obj, str):
        return re.sub(r"(://)[^/@\s]+:[^/@\s]+@", r"\1***@", obj)
    return obj


# -------------------------------------------------------------------------------------- loading
def format_validation_error(err: ValidationError, source: str) -> str:
    """First pydantic error as one line: `<source>: <dotted.field>: <message> (got <value>)`."""
    loc, msg, got_txt = describe_first_error(err)
    field = ".".join(p for p in loc if p not in (*BUILTIN_MODEL_KINDS, "plugin"))
    if re.match(r"(model|data)\.[\w.]+: ", msg):  # a plug-in's own error names its field in full
        field = ""
    if err.errors()[0]["type"] == "union_tag_invalid":
        msg = f"missing kind (known: {', '.join(BUILTIN_MODEL_KINDS)}, or a plug-in)"
    more = f" [+{len(err.errors()) - 1} more]" if len(err.errors()) > 1 else ""
    return f"{source}: {field + ': ' if field else ''}{msg}{got_txt}{more}"


def validate_run_config(data: dict[str, Any], source: str = "config") -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source)) from None


def load_run_config(source: str, overrides: list[str] | None = None) -> RunConfig:
    """Preset name or YAML path + `--set` overrides -> validated RunConfig (or ConfigError)."""
    data = apply_overrides(read_yaml_with_includes(source), overrides or [])
    return validate_run_config(data, source)


def dump_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_public_dict(), sort_keys=False)
