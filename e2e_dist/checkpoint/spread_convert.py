"""The local steps of a spread conversion (spread.py), each a call into DeepSpeed 0.19.8's own
ds_to_universal functions cut down to one rank's parameters: extract fragments from shards, merge
a parameter's fragments into its universal files, complete what merge leaves out, and (rank 0)
the files every loader reads.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from e2e_dist.checkpoint.layout import DS_TAG, CommittedCheckpoint
from e2e_dist.checkpoint.needs import (
    UNIVERSAL_MODEL_STATES,
    UNIVERSAL_OPTIMIZER_STATE,
    is_optimizer_shard,
    rank_of_shard,
)
from e2e_dist.errors import CheckpointError


@dataclass(frozen=True)
class Source:
    """The native checkpoint being converted, as its manifest describes it."""

    ckpt: CommittedCheckpoint
    stage3: bool
    shards: tuple[str, ...]
    """Optimizer shard paths, by the rank that wrote them."""
    model_states: str
    """The model-states file conversion reads: param_shapes, and (ZeRO-1/2) the weights."""

    @classmethod
    def of(cls, ckpt: CommittedCheckpoint, zero_stage: int) -> "Source":
        paths = {f["path"] for f in ckpt.files}
        shards = sorted((p for p in paths if is_optimizer_shard(p)), key=lambda p: rank_of_shard(p) or 0)
        stage3 = zero_stage == 3
        model = f"{DS_TAG}/{UNIVERSAL_MODEL_STATES[stage3]}"
        if not shards or [rank_of_shard(p) for p in shards] != list(range(len(shards))) or model not in paths:
            raise CheckpointError(f"checkpoint {ckpt.uri}: no complete set of ZeRO shards to convert")
        return cls(ckpt, stage3, tuple(shards), model)

    def own_block(self, rank: int, world: int) -> list[int]:
        """The shards whose fragment map this rank reads (ZeRO-1/2): its contiguous 1/W of them."""
        n = len(self.shards)
        return [i for i in range(n) if i * world // n == rank]


def extract(src: Source, local: Path, temp: Path, names_by_shard: dict[int, list[str]],
            shapes: list[dict[str, Any]]) -> None:
    """DeepSpeed's extract step for the given parameters of each given shard (on this node, under
    `local`): fragment files `temp/<name>/0/<state>.<shard>`, the layout its merge reads."""
    from deepspeed.checkpoint import ds_to_universal as dsu

    with _mmap_loads():
        for i, names in sorted(names_by_shard.items()):
            if not names:
                continue
            if src.stage3:
                grid = [[str(local / s) for s in src.shards]]
                others = {name for group in shapes for name in group} - set(names)
                dsu.extract_zero_shards_stage3(grid, [shapes], len(src.shards), str(temp), (0, i),
                                               exclude_param_names=others)
            else:
                dsu.extract_zero_shards(str(temp), _ShardView({i: local / src.shards[i]}, set(names)), (0, 0, i))


def merge(src: Source, local: Path, temp: Path, out: Path, mine: list[str], shapes: list[dict[str, Any]], *,
          rank: int) -> list[str]:
    """DeepSpeed's merge step for this rank's parameters (their fragments all in `temp`), straight
    into the universal files both ZeRO families load, plus (rank 0) the shared files; returns the
    files written, relative to `out`."""
    import torch
    from deepspeed.checkpoint import ds_to_universal as dsu
    from deepspeed.checkpoint.constants import (
        UNIVERSAL_CHECKPOINT_INFO,
        UNIVERSAL_CHECKPOINT_VERSION_KEY,
        UNIVERSAL_CHECKPOINT_VERSION_VALUE,
    )

    shape_of = {name: shape for group in shapes for name, shape in group.items()}
    with _mmap_loads():
        states = torch.load(local / src.model_states, map_location="cpu", weights_only=False)
        # What ds_to_universal --inject_missing_state adds: our saves carry no Megatron-style info.
        uc_info = states.get(UNIVERSAL_CHECKPOINT_INFO) or {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}
        for name in mine:
            # with the parameter's shape, merge saves {"param": tensor of that shape, "cat_dim": 0}
            dsu.merge_tp_slices(uc_info, str(out / "zero"), str(temp), 1, (name, [shape_of[name]]))
        step = _step_of(src, local) if src.stage3 or rank == 0 else None
        for name in mine:
            _complete(out / "zero" / name, states.get("module") or {}, name, step)
        written = [f"zero/{name}/{f.name}" for name in mine if (out / "zero" / name).is_dir()
                   for f in sorted((out / "zero" / name).iterdir())]
        if rank == 0:
            written += _shared_files(src, local, out, step)
    shutil.rmtree(temp, ignore_errors=True)
    return written


class _ShardView:
    """What ds_to_universal.extract_zero_shards asks of its DeepSpeedCheckpoint, for one rank: a
    shard's state with the fragment map cut down to the rank's parameters (and no Megatron patterns)."""

    def __init__(self, files: dict[int, Path], names: set[str]) -> None:
        self.files, self.names = files, names

    def get_zero_checkpoint_state(self, pp_index: int, tp_index: int, dp_index: int) -> dict[str, Any]:
        import torch
        from deepspeed.checkpoint.constants import (
            GROUP_PADDINGS,
            OPTIMIZER_STATE_DICT,
            PARAM_SLICE_MAPPINGS,
        )

        sd = torch.load(self.files[dp_index], map_location="cpu", weights_only=False)
        osd = sd[OPTIMIZER_STATE_DICT]
        osd[PARAM_SLICE_MAPPINGS] = [{n: f for n, f in g.items() if n in self.names} for g in osd[PARAM_SLICE_MAPPINGS]]
        if osd.get(GROUP_PADDINGS):  # as DeepSpeedCheckpoint hands it out: the paddings stripped
            osd[GROUP_PADDINGS] = [0] * len(osd[GROUP_PADDINGS])
        return sd

    def get_checkpoint_info(self, info_key: str = "") -> dict[str, Any]:
        return {}


def _step_of(src: Source, local: Path) -> Any:
    """Adam's step count, from shard 0 (every rank of a ZeRO-3 conversion has it; rank 0 always)."""
    import torch
    from deepspeed.checkpoint.constants import (
        BASE_OPTIMIZER_STATE,
        OPTIMIZER_STATE_DICT,
    )

    osd = torch.load(local / src.shards[0], map_location="cpu", weights_only=False)[OPTIMIZER_STATE_DICT]
    state = osd[OPTIMIZER_STATE_DICT]["state"] if src.stage3 else osd[BASE_OPTIMIZER_STATE]["state"]
    return state[0]["step"]


def _complete(folder: Path, module: dict[str, Any], name: str, step: Any) -> None:
    """What merge leaves out: the weights of a parameter with no optimizer fragment (taken from the
    module, as ds_to_universal does) and a step.pt where the source had none (ZeRO-3 sources:
    ZeRO-1/2 loaders read one per parameter)."""
    import torch

    if not (folder / "fp32.pt").exists() and name in module:
        folder.mkdir(parents=True, exist_ok=True)
        torch.save({"param": module[name].float()}, folder / "fp32.pt")
    if folder.is_dir() and not (folder / "step.pt").exists() and step is not None:
        torch.save(step, folder / "step.pt")


def _shared_files(src: Source, local: Path, out: Path, step: Any) -> list[str]:
    """Rank 0: zero/optimizer_state.pt (with what the ZeRO-3 loader needs and a ZeRO-1/2 source leaves
    out: ds_version, optimizer_state_dict) and the model states under both names (each ZeRO family
    looks for its own; only the scheduler, counters and client state in them are read)."""
    import deepspeed
    import torch
    from deepspeed.checkpoint import ds_to_universal as dsu

    args = argparse.Namespace(output_folder=str(out))
    if src.stage3:
        dsu._save_optimizer_state_stage3(args, [str(local / src.shards[0])])
    else:
        dsu._save_optimizer_state(args, _ShardView({0: local / src.shards[0]}, set()))
    opt_path = out / UNIVERSAL_OPTIMIZER_STATE
    opt = torch.load(opt_path, map_location="cpu", weights_only=False, mmap=False)  # rewritten in place below
    opt.setdefault("ds_version", deepspeed.__version__)
    opt.setdefault("optimizer_state_dict", {"state": {0: {"step": step}}, "param_groups": opt["param_groups"]})
    torch.save(opt, opt_path)
    states = torch.load(local / src.model_states, map_location="cpu", weights_only=False)
    # A universal load takes the weights from zero/<name>/fp32.pt and never reads the module: without
    # it every node's fetch of these files is ~1/3 smaller (a ZeRO-1/2 source keeps the whole model there).
    states["module"] = {}
    for name in UNIVERSAL_MODEL_STATES.values():
        torch.save(states, out / name)
    return [UNIVERSAL_OPTIMIZER_STATE, *UNIVERSAL_MODEL_STATES.values()]


@contextlib.contextmanager
def _mmap_loads() -> Iterator[None]:
    """Every torch.load of a file maps it instead of reading it (DeepSpeed's extract functions call
    torch.load themselves): a rank reads only its parameters' bytes of each shard."""
    from torch.utils.serialization import config

    before = config.load.mmap
    config.load.mmap = True
    try:
        yield
    finally:
        config.load.mmap = before
