"""Resharding: a checkpoint written by N ranks at ZeRO-s resumes on M ranks at ZeRO-s'.

DeepSpeed's native checkpoint is a set of per-rank shards that only the same world size and stage
can read. Its *universal* form (`deepspeed.checkpoint.ds_to_universal`) holds every parameter
whole: `zero/<name>/fp32.pt`, `exp_avg.pt`, `exp_avg_sq.pt`, `step.pt`, plus the model-states file
(LR scheduler, our client state), and any engine at any world size and stage loads it with
`{"checkpoint": {"load_universal": true}}`. We convert lazily - the first time a run resumes with
another layout - on every rank of the resuming group at once, each a slice of the parameters
(spread.py), and cache the result in storage next to the checkpoint:

    <run_uri>/step_00000100/universal/
        mp_rank_00_model_states.pt, zero/...   DeepSpeed's universal files
        manifest.json                           written LAST: kind "universal", the source's id

The cache is a checkpoint of its own: uploaded file by file, committed by its manifest, verified by
sha256 on download. A crash mid-conversion leaves files without a manifest, which read as absent
(the next resume converts again); the original checkpoint is never touched. A cache converted from
an earlier write of the same step (a re-done step after a restart) is recognised by its `source`
id and converted again.

One cache serves both ZeRO families, whichever wrote the source. ds_to_universal writes what the
source's family reads back (checked on DeepSpeed 0.19.8): a ZeRO-1/2 source gives `{"param":
tensor, "cat_dim": 0}` files, a step.pt per parameter and `mp_rank_00_model_states.pt`; a ZeRO-3
source bare flat tensors, no step.pt and `zero_pp_rank_*` model states, and the ZeRO-3 loader wants
an `optimizer_state_dict` (and `ds_version`) in zero/optimizer_state.pt that the ZeRO-1/2 converter
leaves out. We write the union: every parameter file as `{"param": tensor of its shape, "cat_dim": 0}`
with a step.pt, that optimizer state, and the model states under both names (only their scheduler,
counters and client state are read on a universal load).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from e2e_dist import storage
from e2e_dist.checkpoint.layout import MANIFEST, CommittedCheckpoint, ListedFile, validate_json
from e2e_dist.checkpoint.ranks import Ledger, Ranks
from e2e_dist.checkpoint.spread import convert_spread
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


def ensure_universal(ckpt: CommittedCheckpoint, local: Path, ranks: Ranks, storage_cfg: Any, ledger: Ledger,
                     ) -> tuple[CommittedCheckpoint | None, list[str]]:
    """Collective: the committed universal cache of `ckpt`, found (rank 0 looks) or converted now by
    every rank (spread.py), with the native files fetched into `local` (this node's copy of the
    checkpoint) as far as its ranks' slices need them and the converted files left in
    `local/universal`. (None, problems) when a node's native files failed their checksums."""
    found, why = find_universal(ckpt, storage_cfg) if ranks.rank == 0 else (None, "")
    found, why = ranks.from_rank0((found, why))
    if found is not None:
        return found, []
    if ranks.rank == 0:
        log.warning("converting checkpoint step %d to DeepSpeed's universal form on %d worker(s) (%s)",
                    ckpt.step, ranks.world, why)
    return convert_spread(ckpt, zero_stage=layout_of(ckpt.manifest).zero_stage, uri=universal_uri(ckpt),
                          source=source_id(ckpt.manifest), local=local, out=local / UNIVERSAL_DIR, ranks=ranks,
                          storage_cfg=storage_cfg, ledger=ledger)


def discard(universal: CommittedCheckpoint, storage_cfg: Any) -> None:
    """Uncommit a cache that failed verification (the next ensure_universal converts again)."""
    storage.delete_file(storage.join(universal.uri, MANIFEST), storage_cfg)
