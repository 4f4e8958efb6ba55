"""DeepSpeed's own save/load, always with the tag "ds", into and out of a local directory.

Every rank saves into its *own* local directory (DeepSpeed writes only that rank's shards there,
plus `latest` and the recovery scripts on rank 0); the upload step merges them in storage.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from e2e_dist.checkpoint.layout import DS_TAG
from e2e_dist.errors import CheckpointError


def save_engine(engine: Any, local_dir: Path, client_state: dict[str, Any]) -> Path:
    """engine.save_checkpoint(local_dir, tag="ds"): module, optimizer, LR scheduler and `client_state`.

    Collective: every rank must call it (DeepSpeed synchronizes ranks inside).
    """
    local_dir = Path(local_dir)
    local_dir.mkdir(parents=True, exist_ok=True)
    engine.save_checkpoint(str(local_dir), tag=DS_TAG, client_state=client_state, save_latest=True)
    return local_dir


def load_engine(engine: Any, local_dir: Path) -> dict[str, Any]:
    """Restore module, optimizer and LR scheduler from a downloaded checkpoint; return client_state."""
    local_dir = Path(local_dir)
    if not (local_dir / DS_TAG).is_dir():
        raise CheckpointError(f"{local_dir}: no DeepSpeed checkpoint (directory {DS_TAG}/ missing)")
    path, client_state = engine.load_checkpoint(
        str(local_dir), tag=DS_TAG, load_module_strict=True,
        load_optimizer_states=True, load_lr_scheduler_states=True,
    )
    if path is None:
        raise CheckpointError(f"{local_dir}: DeepSpeed found no checkpoint with tag {DS_TAG!r}")
    return dict(client_state or {})


def load_universal(engine: Any, local_dir: Path, *, zero_stage: int) -> dict[str, Any]:
    """Restore from a downloaded universal form (`local_dir/universal`, see universal.py) into an
    engine built with `load_universal` (any world size, ZeRO 1-3); return client_state."""
    from e2e_dist.checkpoint.universal import UNIVERSAL_DIR

    local_dir = Path(local_dir)
    path, client_state = engine.load_checkpoint(
        str(local_dir), tag=UNIVERSAL_DIR, load_module_strict=True,
        load_optimizer_states=True, load_lr_scheduler_states=True,
    )
    if path is None:
        raise CheckpointError(f"{local_dir}: DeepSpeed found no universal checkpoint under {UNIVERSAL_DIR}/")
    if zero_stage == 3:
        _repair_zero3_param_groups(engine, local_dir / UNIVERSAL_DIR / "zero" / "optimizer_state.pt")
    return dict(client_state or {})


def _repair_zero3_param_groups(engine: Any, optimizer_state: Path) -> None:
    """Undo two things DeepSpeed 0.19.8's ZeRO-3 universal load gets wrong (found by comparing the
    next step with an uninterrupted run): it copies group 0's hyperparameters into every group (our
    no-decay group would decay) and gives all groups one shared `step` tensor (counted once per group
    on the next step). Put each group's own settings back and give each its own step."""
    import torch

    saved = torch.load(optimizer_state, weights_only=False)["param_groups"]
    torch_optimizer = engine.optimizer.optimizer
    for group, saved_group in zip(torch_optimizer.param_groups, saved):
        group.update({k: v for k, v in saved_group.items() if k != "params"})
    for state in torch_optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()
