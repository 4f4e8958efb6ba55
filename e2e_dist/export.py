"""One consolidated file from a sharded checkpoint, and a plain-PyTorch way back in.

`export_checkpoint` downloads a committed checkpoint (verifying every checksum), consolidates the
shards of any ZeRO stage with DeepSpeed's own `zero_to_fp32` (lazy mode: one parameter gathered at
a time, shards memory-mapped, so host RAM holds about one copy of the model, not two), and writes
ONE safetensors file whose metadata carries the (redacted) run config. safetensors refuses tensors
that share memory, so a tied weight (the GPT's embedding = output head) is stored once and its
alias recorded in the metadata; `load_exported` re-ties it before a strict `load_state_dict`.

Loading needs torch, safetensors and this package's model registry: no DeepSpeed, no Ray.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from e2e_dist import storage
from e2e_dist.checkpoint.discover import download_checkpoint, inspect, restore_latest
from e2e_dist.checkpoint.layout import DS_TAG, MANIFEST, CommittedCheckpoint, step_of
from e2e_dist.config import RunConfig, redact, validate_run_config
from e2e_dist.errors import CheckpointError, ConfigError, UserError

EXPORT_FORMAT = "1"
META_FORMAT, META_CONFIG, META_TIED = "e2e_dist.format", "e2e_dist.config", "e2e_dist.tied"
DEFAULT_NAME = "model.safetensors"


# -------------------------------------------------------------------------------------- export
def export_checkpoint(source_uri: str, out_uri: str, storage_cfg: Any = None) -> dict[str, Any]:
    """Checkpoint dir (or run dir: its newest committed checkpoint) -> one safetensors file at `out_uri`.

    Returns a summary: source, step, out, num_tensors, num_params, bytes, tied, skipped (newer
    checkpoints passed over).
    """
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory(prefix="e2e-export-") as tmp:
        ckpt, local, skipped = _fetch_source(source_uri, storage_cfg, Path(tmp) / "ckpt")
        cfg = _config_of(ckpt)
        tensors, tied = _materialize(_consolidated_state_dict(local), where=ckpt.uri)
        param_names = _check_against_model(cfg, tensors, tied, where=ckpt.uri)
        metadata = {
            "format": "pt", META_FORMAT: EXPORT_FORMAT, META_CONFIG: json.dumps(cfg.to_public_dict()),
            META_TIED: json.dumps(tied), "e2e_dist.step": str(ckpt.step), "e2e_dist.source": redact(ckpt.uri),
            "e2e_dist.zero_stage": str(ckpt.manifest.get("zero_stage")),
        }
        out_uri = _file_target(out_uri, storage_cfg)
        if storage.is_s3(out_uri):
            staged = Path(tmp) / DEFAULT_NAME
            save_file(tensors, str(staged), metadata=metadata)
            size = staged.stat().st_size
            storage.upload_file(staged, out_uri, storage_cfg)
        else:
            size = _save_local_atomic(tensors, metadata, Path(out_uri), save_file)
    return {
        "source": ckpt.uri, "step": ckpt.step, "out": out_uri, "num_tensors": len(tensors),
        # Parameters as training counts them (its summary's "params"); buffers (normalization
        # statistics) travel in the file too but are not learned.
        "num_params": sum(t.numel() for k, t in tensors.items() if k in param_names),
        "num_buffer_values": sum(t.numel() for k, t in tensors.items() if k not in param_names),
        "bytes": size, "tied": tied, "skipped": skipped,
    }


def _fetch_source(source_uri: str, storage_cfg: Any, local_dir: Path) -> tuple[CommittedCheckpoint, Path, list[str]]:
    """A checkpoint directory (must be committed) or a run directory (newest that verifies)."""
    source_uri = source_uri.rstrip("/")
    if storage.exists(storage.join(source_uri, MANIFEST), storage_cfg):
        name = source_uri.rsplit("/", 1)[-1]
        step = step_of(name)
        if step is None:  # a copied/renamed checkpoint directory: trust the manifest's own step
            raw = json.loads(storage.read_text(storage.join(source_uri, MANIFEST), storage_cfg))
            step = raw.get("step") if isinstance(raw, dict) and isinstance(raw.get("step"), int) else -1
        info = inspect(source_uri, step, storage_cfg)
        if not info.committed:
            raise CheckpointError(f"{redact(source_uri)}: not a committed checkpoint ({info.reason})")
        ckpt = CommittedCheckpoint(source_uri, step, info.manifest or {}, storage_cfg)
        return ckpt, download_checkpoint(ckpt, local_dir, verify=True, storage_cfg=storage_cfg), []
    if not storage.exists(source_uri, storage_cfg):
        raise CheckpointError(f"{redact(source_uri)}: no such checkpoint or run directory")
    ckpt, local, skipped = restore_latest(source_uri, storage_cfg, local_dir)
    if ckpt is None or local is None:
        why = f" ({skipped[0]}{' ...' if len(skipped) > 1 else ''})" if skipped else ""
        raise CheckpointError(f"{redact(source_uri)}: no committed checkpoint to export{why}")
    return ckpt, local, skipped


def _config_of(ckpt: CommittedCheckpoint) -> RunConfig:
    raw = ckpt.meta.get("config")
    if not isinstance(raw, dict):
        raise CheckpointError(f"{ckpt.uri}: manifest meta has no run config ('config'); cannot rebuild the model")
    try:
        return validate_run_config(raw, source=f"{ckpt.uri}/{MANIFEST} meta.config")
    except ConfigError as e:
        raise CheckpointError(str(e)) from None


def _consolidated_state_dict(local: Path) -> dict[str, Any]:
    """name -> tensor or DeepSpeed lazy tensor, full (unsharded) fp32 weights of any ZeRO stage."""
    ds_dir = local / DS_TAG
    if any(ds_dir.glob("*optim_states.pt")):  # ZeRO 1-3: shards of the fp32 master weights
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        chatter = io.StringIO()  # zero_to_fp32 prints progress; keep the CLI's output ours
        try:
            with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
                return get_fp32_state_dict_from_zero_checkpoint(str(local), tag=DS_TAG, lazy_mode=True)
        except ValueError as e:
            if "zero" not in str(e).lower():
                raise CheckpointError(f"{local}: DeepSpeed could not consolidate it ({e})") from None
            # not a ZeRO optimizer checkpoint (e.g. stage 0 with bf16): fall through to the module weights
    model_files = sorted(ds_dir.glob("mp_rank_*_model_states.pt"))
    if not model_files:
        raise CheckpointError(f"{local}: no DeepSpeed model states in {DS_TAG}/")
    # Stage 0 keeps the whole module in the model-states file. mmap: no second copy in RAM.
    return torch.load(model_files[0], map_location="cpu", weights_only=False, mmap=True)["module"]


def _materialize(state: dict[str, Any], *, where: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """One real, unshared fp32 tensor per distinct weight, plus {alias: stored name} for tied ones.

    Tied weights arrive as one object under two names (zero_to_fp32 re-ties them) or as two views
    of one storage (a module state dict); either way the first name is stored, later ones alias it.
    """
    tensors: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    seen: dict[Any, str] = {}
    for name, value in state.items():
        if isinstance(value, torch.Tensor) and value.numel() == 0:
            key: Any = ("empty", name)  # empty tensors may all report data_ptr 0: never "tied"
        elif isinstance(value, torch.Tensor):
            key = ("t", value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape),
                        tuple(value.stride()))
        else:
            key = ("lazy", id(value))
        if key in seen:
            tied[name] = seen[key]
            continue
        seen[key] = name
        t = value if isinstance(value, torch.Tensor) else value.contiguous()  # gathers this one weight now
        t = t.detach().to("cpu")
        if t.is_floating_point():
            t = t.float()
        # Views into a flat shard buffer (ZeRO 1/2) or an mmap share storage: give each its own.
        if not t.is_contiguous() or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.contiguous().clone()
        tensors[name] = t
    if not tensors:
        raise CheckpointError(f"{where}: the checkpoint holds no weights")
    return tensors, tied


def _check_against_model(cfg: RunConfig, tensors: dict[str, torch.Tensor], tied: dict[str, str], *,
                         where: str) -> set[str]:
    """Every weight the model has, with its shape, and nothing else (model built on 'meta': no
    memory). Returns the names that are parameters (the rest are buffers)."""
    from e2e_dist.models.registry import build_model

    with torch.device("meta"):
        model = build_model(cfg.model, cfg.data)
        want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        param_names = {k for k, _ in model.named_parameters(remove_duplicate=False)}
    have = {k: tuple(v.shape) for k, v in tensors.items()} | {a: tuple(tensors[c].shape) for a, c in tied.items()}
    missing, extra = sorted(want.keys() - have.keys()), sorted(have.keys() - want.keys())
    # State newer than the checkpoint, with a default the model fills in on load (a classifier's temperature)
    optional = set(model.optional_state()) if hasattr(model, "optional_state") else set()
    missing = [k for k in missing if k not in optional]
    if missing or extra:
        raise CheckpointError(f"{where}: weights do not match model {cfg.model.kind!r} "
                              f"(missing {missing[:3]}, unexpected {extra[:3]})")
    for k, shape in want.items():
        if k in have and have[k] != shape:
            raise CheckpointError(f"{where}: weight {k} has shape {list(have[k])}, the model wants {list(shape)}")
    return param_names


def _file_target(out_uri: str, storage_cfg: Any) -> str:
    """A directory (existing, or written with a trailing '/') gets model.safetensors inside it."""
    if out_uri.endswith("/"):
        return storage.join(out_uri, DEFAULT_NAME)
    if not storage.is_s3(out_uri) and Path(out_uri).expanduser().is_dir():
        return str(Path(out_uri).expanduser() / DEFAULT_NAME)
    return out_uri


def _save_local_atomic(tensors: dict[str, torch.Tensor], metadata: dict[str, str], out: Path, save_file) -> int:
    out = out.expanduser().resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        # mkstemp makes the file 0600; an exported model is for sharing: the mode open() would give.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out.stat().st_size


# ---------------------------------------------------------------------------------------- load
def load_exported(path_or_uri: str, storage_cfg: Any = None) -> tuple[torch.nn.Module, RunConfig]:
    """An exported file -> (model in eval mode with the exported weights, its RunConfig)."""
    if storage.is_s3(path_or_uri):
        with tempfile.TemporaryDirectory(prefix="e2e-load-") as tmp:
            local = Path(tmp) / DEFAULT_NAME
            storage.download_file(path_or_uri, local, storage_cfg)
            return _load_local(local, shown=path_or_uri)
    path = Path(path_or_uri).expanduser()
    if not path.is_file():
        raise CheckpointError(f"{path_or_uri}: no such exported file")
    return _load_local(path, shown=path_or_uri)


def _load_local(path: Path, *, shown: str) -> tuple[torch.nn.Module, RunConfig]:
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    from e2e_dist.models.registry import build_model

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{shown}: not a readable safetensors file ({str(e).splitlines()[0]})") from None
    if metadata.get(META_FORMAT) != EXPORT_FORMAT or META_CONFIG not in metadata:
        raise CheckpointError(f"{shown}: not an e2e-dist export (no {META_CONFIG} in its metadata)")
    try:
        cfg = validate_run_config(json.loads(metadata[META_CONFIG]), source=f"{shown} metadata")
        tied = json.loads(metadata.get(META_TIED, "{}"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{shown}: corrupt metadata ({e.msg})") from None
    for alias, stored in tied.items():
        tensors[alias] = tensors[stored]
    model = build_model(cfg.model, cfg.data)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{shown}: weights do not fit model {cfg.model.kind!r} ({str(e).splitlines()[0]})") from None
    return model.eval(), cfg


def generate_from_export(path_or_uri: str, prompt: str, *, max_new_bytes: int = 200, temperature: float = 0.8,
                         top_k: int | None = 40, top_p: float = 1.0, seed: int = 0, storage_cfg: Any = None) -> str:
    """Load an exported text model and continue `prompt`: the continuation only (`e2e-dist generate`
    prints the prompt, then this)."""
    model, _ = load_exported(path_or_uri, storage_cfg)
    if not hasattr(model, "generate"):
        raise UserError(f"{path_or_uri}: a {model.input_kind} model cannot generate text (use `predict`)")
    gen = torch.Generator().manual_seed(seed)
    out = model.generate(prompt.encode("utf-8"), max_new_bytes=max_new_bytes, temperature=temperature,
                         top_k=top_k, top_p=top_p, generator=gen)
    return out.decode("utf-8", errors="replace")
