"""Which files of a checkpoint one rank reads when DeepSpeed 0.19.8 loads it, so a node fetches only those.

Checked in deepspeed/runtime/engine.py and zero/stage_1_and_2.py / stage3.py (and by wrapping
torch.load around real loads, tests/test_checkpoint_spread.py):

- Native load (same world size and stage): the model states - `mp_rank_00_model_states.pt`
  (ZeRO-0/1/2: one file, holding the weights, scheduler and client state) or
  `zero_pp_rank_<r>_mp_rank_00_model_states.pt` (ZeRO-3: one per rank) - and the rank's own
  optimizer partition `zero_pp_rank_<r>_mp_rank_00_optim_states.pt`. `_get_all_zero_checkpoint_state_dicts`
  builds a list over every rank but torch.loads only the rank's own entry, unless
  `zero_optimization.elastic_checkpoint` is set (ZeRO-1/2 then merges every partition).
  Nothing outside the tag's directory is read: `latest` (we pass the tag) and the recovery scripts
  (`zero_to_fp32.py`, `zero_to_torch.py`) sit next to it.
- Universal form, ZeRO-1/2 engine: the model states `mp_rank_00_model_states.pt`, `zero/optimizer_state.pt`,
  and every file of `zero/<name>/` for the parameters whose flat partition overlaps this rank's
  (`_hp_mapping` set) - about 1/W of them, plus the parameter at each edge.
- Universal form, ZeRO-3 engine: `zero_pp_rank_0_mp_rank_00_model_states.pt`, `zero/optimizer_state.pt`
  and fp32 / exp_avg / exp_avg_sq of *every* parameter: ZeRO-3 splits each parameter over all ranks,
  and the loader torch.loads each file whole to cut out its slice. A byte-range fetch of just the
  slice would need a file DeepSpeed cannot open (its zip reader wants the whole file) and could not
  be checked against the manifest's sha256, so a ZeRO-3 node fetches the whole universal form.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from e2e_dist.checkpoint.layout import DS_TAG

_RANK_FILE = re.compile(rf"{DS_TAG}/(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_\d+_(optim|model)_states\.pt")
UNIVERSAL_MODEL_STATES = {False: "mp_rank_00_model_states.pt", True: "zero_pp_rank_0_mp_rank_00_model_states.pt"}
"""The model-states file a ZeRO-1/2 (False) and a ZeRO-3 (True) engine reads from a universal folder."""
UNIVERSAL_OPTIMIZER_STATE = "zero/optimizer_state.pt"


def rank_of_shard(path: str) -> int | None:
    """The rank a per-rank DeepSpeed file (optimizer partition, ZeRO-3 model states) belongs to."""
    m = _RANK_FILE.fullmatch(path)
    return int(m.group(1)) if m else None


def is_optimizer_shard(path: str) -> bool:
    m = _RANK_FILE.fullmatch(path)
    return bool(m) and m.group(2) == "optim"


def native_files(paths: Iterable[str], *, rank: int, elastic: bool = False) -> list[str]:
    """The files of a native checkpoint (paths as its manifest lists them) that `rank` reads when it
    loads it at the same world size and stage. Files under the tag we do not know are kept: better
    fetched once too often than a load that fails on a cluster."""
    out = []
    for p in paths:
        owner = rank_of_shard(p)
        if not p.startswith(f"{DS_TAG}/") or (owner is not None and owner != rank
                                              and not (elastic and is_optimizer_shard(p))):
            continue
        out.append(p)
    return sorted(out)


def elastic_checkpoint(deepspeed_cfg: Any) -> bool:
    """Whether this run's DeepSpeed config makes ZeRO-1/2 read every optimizer partition on load."""
    zero = deepspeed_cfg.overrides.get("zero_optimization", {})
    return bool(isinstance(zero, dict) and zero.get("elastic_checkpoint"))


def universal_files(paths: Iterable[str], engine: Any, *, zero_stage: int) -> list[str]:
    """The files of a universal form (paths relative to its folder) that this rank's `engine`
    (built with load_universal) reads."""
    stage3 = zero_stage == 3
    names = None if stage3 else engine_partition_params(engine)
    wanted = {UNIVERSAL_MODEL_STATES[stage3], UNIVERSAL_OPTIMIZER_STATE}
    for p in paths:
        parts = p.split("/")
        if len(parts) != 3 or parts[0] != "zero":
            continue
        if stage3 and parts[2] != "step.pt" or not stage3 and (names is None or parts[1] in names):
            wanted.add(p)
    return sorted(wanted)


def engine_partition_params(engine: Any) -> set[str] | None:
    """Names of the parameters a ZeRO-1/2 engine holds a piece of (what its universal loader opens:
    `bit16_groups`, or `bf16_groups` for DeepSpeed's BF16_Optimizer at ZeRO-1); None for an
    optimizer we do not know, whose node then fetches every parameter's files."""
    opt = engine.optimizer
    groups = getattr(opt, "bit16_groups", None) or getattr(opt, "bf16_groups", None)
    if groups is None or not hasattr(opt, "param_names"):
        return None
    return {opt.param_names[lp] for group in groups for lp in group if getattr(lp, "_hp_mapping", None) is not None}
