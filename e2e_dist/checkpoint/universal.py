"""Resharding: a checkpoint written by N ranks at ZeRO-s resumes on M ranks at ZeRO-s'.

DeepSpeed's native checkpoint is a set of per-rank shards that only the same world size and stage
can read. Its *universal* form (`deepspeed.checkpoint.ds_to_universal`) holds every parameter
whole: `zero/<name>/fp32.pt`, `exp_avg.pt`, `exp_avg_sq.pt`, `step.pt`, plus the model-states file
(LR scheduler, our client state), and any engine at any world size and stage loads it with
`{"checkpoint": {"load_universal": true}}`. We convert lazily - the first time a run resumes with
another layout - on rank 0, and cache the result in storage next to the checkpoint:

    <run_uri>/step_00000100/universal/
        mp_rank_00_model_states.pt, zero/...   DeepSpeed's universal files
        manifest.json                           written LAST: kind "universal", the source's id

The cache is a checkpoint of its own: uploaded file by file, committed by its manifest, verified by
sha256 on download. A crash mid-conversion leaves files without a manifest, which read as absent
(the next resume converts again); the original checkpoint is never touched. A cache converted from
an earlier write of the same step (a re-done step after a restart) is recognised by its `source`
id and converted again.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from e2e_dist import storage
from e2e_dist.checkpoint.layout import DS_TAG, FORMAT_VERSION, MANIFEST, CommittedCheckpoint, ListedFile, now_utc, validate_json
from e2e_dist.errors import CheckpointError

log = logging.getLogger(__name__)
UNIVERSAL_DIR = "universal"
"""The cache's directory inside a checkpoint, and the DeepSpeed tag it is loaded with."""


class Layout(BaseModel):
    """How a checkpoint's optimizer state is sharded: what must match for DeepSpeed's native load."""

    model_config = ConfigDict(frozen=True)

    world_size: int
    zero_stage: int
    offload_optimizer: bool = False

    def __str__(self) -> str:
        return f"{self.world_size} worker(s), ZeRO-{self.zero_stage}{' + CPU offload' if self.offload_optimizer else ''}"


def layout_of(manifest: dict[str, Any]) -> Layout:
    """The layout a committed checkpoint was written with (manifest + the run config in its meta)."""
    ds = manifest.get("meta", {}).get("config", {}).get("deepspeed", {})
    stage = manifest.get("zero_stage")
    return Layout(world_size=manifest["world_size"], zero_stage=ds.get("zero_stage", 0) if stage is None else stage,
                  offload_optimizer=bool(ds.get("offload_optimizer", False)))


def run_layout(deepspeed_cfg: Any, world_size: int) -> Layout:
    """The layout a run with this `deepspeed` config section writes and reads at `world_size`."""
    return Layout(world_size=world_size, zero_stage=deepspeed_cfg.zero_stage,
                  offload_optimizer=deepspeed_cfg.offload_optimizer)


def needs_universal(saved: Layout, here: Layout, step: int) -> bool:
    """Whether a checkpoint written with `saved` must go through the universal form to load `here`.

    A ZeRO-0 checkpoint holds the whole model and optimizer in one file: any world size at ZeRO-0
    loads it natively. Between ZeRO-0 and ZeRO-1..3 DeepSpeed 0.19.8 has no route (its converter
    needs ZeRO optimizer shards; a ZeRO-0 engine ignores `load_universal`): a clear refusal."""
    if saved == here or saved.zero_stage == here.zero_stage == 0:
        return False
    if 0 in (saved.zero_stage, here.zero_stage):
        raise CheckpointError(f"checkpoint step {step} was written with {saved}, this run uses {here}: resharding "
                              f"between ZeRO-0 and ZeRO-1..3 is not supported (resume with "
                              f"deepspeed.zero_stage={saved.zero_stage})")
    return True


def describe(manifest: dict[str, Any] | None, uri: str, storage_cfg: Any) -> str:
    """A checkpoint's layout for `e2e-dist checkpoints`: `2x ZeRO-2`, `1x ZeRO-3+offload`, with
    `+universal` when its resharded form is cached; `-` when there is no manifest to say."""
    if manifest is None:
        return "-"
    lay = layout_of(manifest)
    cached = storage.exists(storage.join(uri, UNIVERSAL_DIR, MANIFEST), storage_cfg)
    return (f"{lay.world_size}x ZeRO-{lay.zero_stage}{'+offload' if lay.offload_optimizer else ''}"
            f"{' +universal' if cached else ''}")


class UniversalManifest(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    format_version: Literal[1]
    kind: Literal["universal"]
    step: int
    source: str = Field(pattern=r"^[0-9a-f]{16}$")
    """source_id() of the checkpoint it was converted from."""
    files: list[ListedFile]


def source_id(manifest: dict[str, Any]) -> str:
    """Identifies one write of a checkpoint (its files' checksums), so a cache is never used for
    another write of the same step."""
    files = sorted((f["path"], f["sha256"]) for f in manifest["files"])
    return hashlib.sha256(json.dumps(files).encode()).hexdigest()[:16]


def universal_uri(ckpt: CommittedCheckpoint) -> str:
    return storage.join(ckpt.uri, UNIVERSAL_DIR)


def find_universal(ckpt: CommittedCheckpoint, storage_cfg: Any) -> tuple[CommittedCheckpoint | None, str]:
    """The committed universal cache of `ckpt`, or (None, why not)."""
    uri = universal_uri(ckpt)
    listing = storage.list_files(uri, storage_cfg)
    if MANIFEST not in listing:
        return None, "not converted yet" if not listing else "an earlier conversion did not finish"
    try:
        doc = validate_json(UniversalManifest, storage.read_text(storage.join(uri, MANIFEST), storage_cfg),
                        f"{uri}/{MANIFEST}")
    except CheckpointError as e:
        return None, str(e)
    if doc["step"] != ckpt.step or doc["source"] != source_id(ckpt.manifest):
        return None, "converted from an earlier write of this step"
    for f in doc["files"]:
        if listing.get(f["path"]) != f["size"]:
            return None, f"file {f['path']} is missing or has the wrong size"
    return CommittedCheckpoint(uri, ckpt.step, doc, storage_cfg), ""


def convert(native_dir: Path, out_dir: Path) -> None:
    """DeepSpeed's ds_to_universal on a downloaded checkpoint (`native_dir/ds`) into `out_dir`.

    In-process with one extract and one merge worker: its process pools would fork a Ray worker's
    threads. DeepSpeed's own progress output goes to the log, not the console."""
    import argparse

    from deepspeed.checkpoint import ds_to_universal

    args = argparse.Namespace(input_folder=str(native_dir / DS_TAG), output_folder=str(out_dir),
                              num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True,
                              # our saves carry no Megatron-style universal_checkpoint_info: derive it
                              inject_missing_state=True)
    chatter = io.StringIO()
    try:
        with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
            ds_to_universal.main(args)
    except Exception as e:  # noqa: BLE001 - any converter failure is one line about this checkpoint
        log.debug("ds_to_universal output:\n%s", chatter.getvalue())
        raise CheckpointError(f"{native_dir}: universal conversion failed: {type(e).__name__}: {e}") from None
    log.debug("ds_to_universal output:\n%s", chatter.getvalue())
    normalize(out_dir)


MODEL_STATES_NAMES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")
"""What a ZeRO-1/2 and a ZeRO-3 engine look for in a universal folder (DeepSpeed 0.19)."""


def normalize(out_dir: Path) -> None:
    """Make one universal folder loadable by both ZeRO families, whichever wrote it.

    ds_to_universal writes what the *source's* family reads back (checked on DeepSpeed 0.19.8): a
    ZeRO-1/2 source gives `{"param": tensor, "cat_dim": 0}` files, a `step.pt` per parameter and
    `mp_rank_00_model_states.pt`; a ZeRO-3 source gives bare flat tensors, no `step.pt`, no
    `ds_version`, and `zero_pp_rank_*` model states; the ZeRO-3 loader also wants an
    `optimizer_state_dict` the ZeRO-1/2 converter leaves out. We write the union. Only the model
    states' scheduler, counters and client state are read on load: a copy under the other name does.
    """
    import deepspeed
    import torch

    zero = out_dir / "zero"
    states = [out_dir / n for n in MODEL_STATES_NAMES if (out_dir / n).exists()]
    if not states:
        raise CheckpointError(f"{out_dir}: the universal conversion wrote no model-states file")
    for name in MODEL_STATES_NAMES:
        if not (out_dir / name).exists():
            shutil.copy2(states[0], out_dir / name)
    shapes = {k: v for group in torch.load(states[0], weights_only=False)["param_shapes"] for k, v in group.items()}
    opt_path = zero / "optimizer_state.pt"
    opt = torch.load(opt_path, weights_only=False)
    step_files = [zero / n / "step.pt" for n in shapes if (zero / n / "step.pt").exists()]
    step = (torch.load(step_files[0], weights_only=False) if step_files
            else opt["optimizer_state_dict"]["state"][0]["step"])
    opt.setdefault("ds_version", deepspeed.__version__)
    opt.setdefault("optimizer_state_dict", {"state": {0: {"step": step}}, "param_groups": opt["param_groups"]})
    torch.save(opt, opt_path)
    for name, shape in shapes.items():
        if not (zero / name / "step.pt").exists():
            torch.save(step, zero / name / "step.pt")
        for key in ("fp32", "exp_avg", "exp_avg_sq"):
            f = zero / name / f"{key}.pt"
            value = torch.load(f, weights_only=False)
            if torch.is_tensor(value):
                torch.save({"param": value.view(shape), "cat_dim": 0}, f)


def ensure_universal(ckpt: CommittedCheckpoint, native_dir: Path, storage_cfg: Any) -> CommittedCheckpoint:
    """The committed universal cache of `ckpt` (downloaded natively at `native_dir`): found, or
    converted now and committed (files first, manifest last)."""
    found, why = find_universal(ckpt, storage_cfg)
    if found is not None:
        return found
    log.warning("converting checkpoint step %d to DeepSpeed's universal form (%s)", ckpt.step, why)
    uri = universal_uri(ckpt)
    with tempfile.TemporaryDirectory(prefix="e2e-universal-") as tmp:
        out = Path(tmp) / UNIVERSAL_DIR
        convert(native_dir, out)
        try:
            storage.delete_file(storage.join(uri, MANIFEST), storage_cfg)  # uncommitted while it changes
            entries = storage.upload_dir(out, uri, storage_cfg, files=storage.local_files(out))
            doc = {"format_version": FORMAT_VERSION, "kind": "universal", "step": ckpt.step, "source": source_id(ckpt.manifest),
                   "files": [e.to_dict() for e in entries], "created_at": now_utc()}
            storage.write_text(storage.join(uri, MANIFEST), json.dumps(doc, indent=1), storage_cfg)
        except storage.StorageError as e:
            raise CheckpointError(f"universal form of {ckpt.uri} not committed: {e}") from None
    return CommittedCheckpoint(uri, ckpt.step, doc, storage_cfg)


def discard(universal: CommittedCheckpoint, storage_cfg: Any) -> None:
    """Uncommit a cache that failed verification (the next ensure_universal converts again)."""
    storage.delete_file(storage.join(universal.uri, MANIFEST), storage_cfg)


def local_copy_root(local_dir: Path) -> Path:
    """Where a downloaded cache sits so that DeepSpeed finds it as tag UNIVERSAL_DIR under `local_dir`."""
    shutil.rmtree(local_dir / UNIVERSAL_DIR, ignore_errors=True)
    return local_dir / UNIVERSAL_DIR
