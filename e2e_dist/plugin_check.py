"""`e2e-dist check-plugin CONFIG`: build a config's model and data on CPU and check the contract
of docs/plugins.md, one line per breach.

What a run needs from a plug-in, each checked the way the trainer relies on it:
- model: builds (and builds on 'meta': FLOPs, plan and export use that), its loss is a finite
  scalar whose backward gives finite gradients, `eval_sums` are additive (the loop adds them over
  batches and ranks), `summarize_eval` gives `val_loss`, the FLOP count from shapes agrees with
  PyTorch's count on real weights, ZeRO-2 and ZeRO-3 engines save and load bit-exact (resume);
  the weights a checkpoint holds fit the model built on 'meta' (export);
- data: the same config gives the same samples (every rank and every resume computes positions
  from sample numbers), and a reader returns the same rows however the ids are grouped into reads
  (a resumed run reads its tail in other groups).

A plug-in's own tests call `check_plugin(cfg)` and assert it returns [].
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from e2e_dist.config import RunConfig

SAMPLES = 4
"""Samples per check batch (split in halves for the additivity check)."""


def check_plugin(cfg: RunConfig, *, data: bool = True, engines: bool = True) -> list[str]:
    """The contract breaches of cfg's model and data source ([] when none). Needs a one-rank
    process group for the engine checks (`engines`): started on 127.0.0.1 when there is none."""
    failures: list[str] = []
    batch = None
    if data:
        _, batch = _run(failures, "data", lambda: _data_checks(cfg, failures))
    model = _run(failures, "model", lambda: _build(cfg))
    if model is None:
        return failures
    batch = batch if batch is not None else model.example_batch(SAMPLES)
    before = len(failures)
    _run(failures, "forward/backward", lambda: _forward_backward(model, batch, failures))
    _run(failures, "eval sums", lambda: _eval_additive(model, batch, failures))
    if len(failures) > before:  # what follows trains the model: it would only fail the same way again
        return failures
    _run(failures, "FLOPs", lambda: _flops(cfg, model, failures))
    if engines:
        initial = {stage: _run(failures, f"ZeRO-{stage} checkpoint", lambda s=stage: _round_trip(cfg, s, batch, failures))
                   for stage in (2, 3)}
        if all(w is not None for w in initial.values()):
            differ = [k for k, w in initial[2].items() if not torch.equal(w, initial[3][k])]
            if differ:
                failures.append(f"ZeRO-3: initial weights differ from ZeRO-2's in {differ[:3]}: initialize them in "
                                f"init_module, not in __init__ after the children exist (docs/plugins.md)")
    return failures


def _run(failures: list[str], what: str, fn: Callable[[], Any]) -> Any:
    """fn(), or None with one line naming `what` when it raises."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - every breach is a line, the checks go on
        first = (str(e).splitlines() or [""])[0]
        failures.append(f"{what}: {type(e).__name__}: {first}")
        return (None, None) if what == "data" else None


def _build(cfg: RunConfig):
    from e2e_dist.models.registry import build_model

    torch.manual_seed(cfg.trainer.seed)
    return build_model(cfg.model, cfg.data)


def _forward_backward(model, batch: dict, failures: list[str]) -> None:
    model.train()
    model.zero_grad(set_to_none=True)
    loss = model(batch)
    if not (torch.is_tensor(loss) and loss.dim() == 0):
        failures.append(f"forward: must return a scalar loss tensor (got {_shape_of(loss)})")
        return
    if not torch.isfinite(loss):
        failures.append(f"forward: the loss is {float(loss)}")
        return
    loss.backward()
    bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    if bad:
        failures.append(f"backward: non-finite gradients in {bad[:3]}")
    model.zero_grad(set_to_none=True)


def _shape_of(x: Any) -> str:
    return f"a tensor of shape {list(x.shape)}" if torch.is_tensor(x) else type(x).__name__


def _halves(batch: dict) -> tuple[dict, dict]:
    n = next(iter(batch.values())).shape[0]
    return ({k: v[: n // 2] for k, v in batch.items()}, {k: v[n // 2:] for k, v in batch.items()})


def _eval_additive(model, batch: dict, failures: list[str]) -> None:
    model.eval()
    with torch.no_grad():
        whole = {k: float(v) for k, v in model.eval_sums(batch).items()}
        a, b = (model.eval_sums(h) for h in _halves(batch))
    model.train()
    keys = set(model.eval_sum_keys())
    if set(whole) != keys:
        failures.append(f"eval_sums: returns {sorted(whole)}, eval_sum_keys() says {sorted(keys)}")
    for k, v in whole.items():
        parts = float(a[k]) + float(b[k])
        if not math.isclose(v, parts, rel_tol=1e-4, abs_tol=1e-5):
            failures.append(f"eval_sums: {k!r} is not additive (whole batch {v:.6g}, sum of halves {parts:.6g}): "
                            f"the loop adds it over batches and ranks")
    metrics = model.summarize_eval(whole)
    if "val_loss" not in metrics:
        failures.append(f"summarize_eval: no 'val_loss' (got {sorted(metrics)}): early stopping and sweeps read it")


def _flops(cfg: RunConfig, model, failures: list[str]) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from e2e_dist.train.flops import shape_counts, train_flops_per_batch

    counts = shape_counts(cfg.model, cfg.data, 2)
    if counts.n_params != model.num_params():
        failures.append(f"meta build: {counts.n_params} parameters on 'meta', {model.num_params()} on CPU")
    with sdpa_kernel(SDPBackend.MATH):  # the kernels 'meta' runs: like for like
        real = train_flops_per_batch(model, model.example_batch(2))
    model.zero_grad(set_to_none=True)
    ours = counts.train_flops_per_micro_batch
    if ours <= 0 or not 0.5 <= ours / max(real, 1) <= 2.0:
        failures.append(f"train_flops: {ours:.3g} FLOPs per 2 examples from shapes, PyTorch counts {real:.3g} "
                        f"on real weights (MFU and the plan would be off)")


def _round_trip(cfg: RunConfig, stage: int, batch: dict, failures: list[str]) -> dict[str, torch.Tensor]:
    """Two steps, save, two more; a fresh engine loads the save and redoes the two: the same
    losses and weights bit for bit. Returns the engine's initial weights."""
    from e2e_dist.checkpoint import load_engine, save_engine

    _ensure_process_group()
    cfg = cfg.model_copy(update={"deepspeed": cfg.deepspeed.model_copy(update={"zero_stage": stage})})
    engine = _engine(cfg)
    initial = _gathered(engine)
    _steps(engine, batch, 2)
    with tempfile.TemporaryDirectory(prefix="e2e-check-plugin-") as tmp:
        save_engine(engine, Path(tmp), {"step": 2})
        after = _steps(engine, batch, 2)
        weights = _gathered(engine)
        fresh = _engine(cfg)
        load_engine(fresh, Path(tmp))
        again = _steps(fresh, batch, 2)
    _eval_through_engine(engine, batch, stage, failures)
    if after != again:
        failures.append(f"ZeRO-{stage} checkpoint: losses after a save/load {again} differ from {after}")
    elif any(not torch.equal(w, v) for w, v in zip(weights.values(), _gathered(fresh).values())):
        failures.append(f"ZeRO-{stage} checkpoint: weights after a save/load differ")
    if stage == 2:
        _export_fits(cfg, weights, failures)
    return initial


def _eval_through_engine(engine, batch: dict, stage: int, failures: list[str]) -> None:
    """eval_sums on the engine's module as the loop's evaluation calls it (train/evaluate.py)."""
    from e2e_dist.train.evaluate import own_parameters_gathered

    engine.eval()
    try:
        with torch.no_grad(), own_parameters_gathered(engine.module):
            engine.module.eval_sums(batch)
    except Exception as e:  # noqa: BLE001 - one line about what evaluation would hit
        failures.append(f"ZeRO-{stage} evaluation: {type(e).__name__}: {(str(e).splitlines() or [''])[0]}")
    engine.train()


def _export_fits(cfg: RunConfig, weights: dict[str, torch.Tensor], failures: list[str]) -> None:
    """What `e2e-dist export` checks: the saved names and shapes are the model's, built on 'meta'."""
    from e2e_dist.errors import CheckpointError
    from e2e_dist.export import _check_against_model

    try:
        _check_against_model(cfg, weights, {}, where="export")
    except CheckpointError as e:
        failures.append(str(e))


def _engine(cfg: RunConfig):
    from e2e_dist.train.build import build_engine

    return build_engine(cfg, device=torch.device("cpu"), world=1).engine


def _steps(engine, batch: dict, n: int) -> list[float]:
    losses = []
    for _ in range(n):
        loss = engine(batch)
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))
    return losses


def _gathered(engine) -> dict[str, torch.Tensor]:
    import deepspeed

    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=any(hasattr(p, "ds_id") for p in params)):
        return {k: v.detach().clone() for k, v in engine.module.state_dict().items()}


def _ensure_process_group() -> None:
    import os

    import torch.distributed as dist

    from e2e_dist.train.build import skip_cpu_shm_comm
    from e2e_dist.train.rendezvous import init_loopback_process_group

    os.environ.setdefault("LOCAL_RANK", "0")
    if not dist.is_initialized():
        init_loopback_process_group("gloo")
    skip_cpu_shm_comm()


def _data_checks(cfg: RunConfig, failures: list[str]) -> tuple[Any, dict | None]:
    """Build the data twice (Ray started locally unless connected), compare, and return the
    first bundle and a collated batch of its first training samples."""
    from e2e_dist.data.registry import build_data, check_data
    from e2e_dist.train.ray_env import init_ray

    check_data(cfg.data, cfg.storage)
    init_ray()
    first = build_data(cfg.data, cfg.model, cfg.storage)
    second = build_data(cfg.data, cfg.model, cfg.storage)
    for split in ("train", "val"):
        a, b = getattr(first, split), getattr(second, split)
        if a.n != b.n or not np.array_equal(np.asarray(a.starts), np.asarray(b.starts)):
            failures.append(f"data: the {split} split differs between two builds of one config "
                            f"({a.n} vs {b.n} samples): positions and resumes would shift")
    train = first.train
    ids = np.arange(min(SAMPLES, train.n), dtype=np.int64)
    if len(ids) < 2:
        failures.append(f"data: the train split has {train.n} sample(s)")
        return first, None
    whole, _ = train.read(ids)
    parts = [train.read(ids[:1])[0], train.read(ids[1:])[0]]
    for col, values in whole.items():
        joined = np.concatenate([p[col] for p in parts])
        if not np.array_equal(values, joined):
            failures.append(f"data: column {col!r} of samples {ids.tolist()} differs when read in other groups")
    again, _ = second.train.read(ids)
    if any(not np.array_equal(whole[c], again[c]) for c in whole):
        failures.append("data: the same sample ids read different rows in two builds of one config")
    valid = whole.get("valid", np.ones(len(ids), dtype=bool))
    return first, first.collate({k: v[valid] for k, v in whole.items()})

