"""Resharding through DeepSpeed's universal form, with real engines built the way the loop builds
them (our two AdamW param groups, warmup/cosine LambdaLR) and real commits in storage.

A checkpoint is committed at one ZeRO stage, converted (once: the cache is committed next to it),
loaded by an engine of another stage, and then both engines train on: the reloaded engine must hold
the same fp32 weights and Adam moments (exactly: they are copied, not recomputed) and take the same
next steps as the engine that never stopped (to 1e-5: ZeRO-3 and ZeRO-1/2 compute the clipping norm
and apply the update through different flat buffers, so the last bits of float32 sums may differ).
Ranks: one per process here; tests/train/test_reshard_e2e.py resizes 2 -> 1 -> 2 workers under Ray.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from e2e_dist import storage
from e2e_dist.checkpoint import find_latest_committed, save_engine, universal
from e2e_dist.checkpoint.layout import MANIFEST
from e2e_dist.errors import CheckpointError
from tests.fixtures.tiny_deepspeed import batch, tiny_cfg, upload


def engine_at(stage: int, *, offload: bool = False, load_universal: bool = False):
    from e2e_dist.train.build import build_engine

    cfg = tiny_cfg(stage)
    cfg.deepspeed.offload_optimizer = offload
    return build_engine(cfg, device=torch.device("cpu"), world=1, load_universal=load_universal).engine


def snapshot(engine) -> dict[str, dict[str, torch.Tensor]]:
    """Every parameter's fp32 master value and Adam moments, whole, by name (DeepSpeed's own API)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    opt = engine.optimizer
    if hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
        # DeepSpeed 0.19.8 links ZeRO-1/2 moments to parameters once, before the second param group
        # has state; relink so the getter sees every group's moments.
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()
    return {name: {"fp32": safe_get_full_fp32_param(p).clone(),
                   **{k: safe_get_full_optimizer_state(p, k).clone() for k in ("exp_avg", "exp_avg_sq")}}
            for name, p in engine.module.named_parameters()}


def steps(engine, first: int, n: int) -> list[float]:
    out = []
    for s in range(first, first + n):
        loss = engine(batch(s))
        engine.backward(loss)
        engine.step()
        out.append(loss.item())
    return out


def commit(engine, run_uri: str, tmp_path: Path, *, stage: int, offload: bool = False, step: int = 3) -> None:
    cfg = tiny_cfg(stage)
    cfg.deepspeed.offload_optimizer = offload
    client = {"step": step, "data": {"epoch": 0, "samples": 6}, "units_seen": 96, "logged": {}}
    local = save_engine(engine, tmp_path / f"save{step}", client)
    upload(local, run_uri, step, zero_stage=stage, meta={"config": cfg.to_public_dict(), "model_kind": "gpt"})


def reload(run_uri: str, tmp_path: Path, *, stage: int, offload: bool = False):
    """What a resume on another layout does (train/resume.py, one rank): choose (find; convert or
    reuse the universal form), build, restore (fetch the rank's share, verified; load)."""
    from e2e_dist.train.resume import choose, restore

    cfg = tiny_cfg(stage, storage_path=str(Path(run_uri).parent))
    cfg.deepspeed.offload_optimizer = offload
    plan = choose(cfg, rank=0, world=1, node_rank=0)
    assert plan.load_universal
    engine = engine_at(stage, offload=offload, load_universal=True)
    state = restore(engine, plan, cfg, rank=0, world=1)
    return engine, state, plan.universal


@pytest.mark.parametrize("source, target", [
    ((2, False), (3, False)),
    ((3, False), (1, False)),
    ((1, True), (2, False)),
    ((2, False), (3, True)),
], ids=["z2-to-z3", "z3-to-z1", "z1offload-to-z2", "z2-to-z3offload"])
def test_a_checkpoint_resumes_at_another_zero_stage_with_its_optimizer_state(ds, tmp_path, source, target):
    run_uri = str(tmp_path / "runs" / "ck")
    before = engine_at(source[0], offload=source[1])
    steps(before, 0, 3)
    commit(before, run_uri, tmp_path, stage=source[0], offload=source[1])
    expected = snapshot(before)

    after, state, _ = reload(run_uri, tmp_path, stage=target[0], offload=target[1])
    assert state.step == 3 and state.data == {"epoch": 0, "samples": 6}
    got = snapshot(after)
    for name, tensors in expected.items():
        for key, value in tensors.items():
            assert torch.equal(got[name][key], value), f"{name} {key} differs after the reload"
    assert after.lr_scheduler.get_last_lr() == before.lr_scheduler.get_last_lr()
    assert after.global_steps == before.global_steps == 3
    assert steps(after, 3, 3) == pytest.approx(steps(before, 3, 3), rel=1e-5)


def test_the_universal_form_is_cached_committed_and_converted_again_when_bad(ds, tmp_path, caplog):
    run_uri = str(tmp_path / "runs" / "ck")
    engine = engine_at(2)
    steps(engine, 0, 2)
    commit(engine, run_uri, tmp_path, stage=2)
    found, _ = find_latest_committed(run_uri)
    assert universal.find_universal(found, None) == (None, "not converted yet")

    _, _, conv = reload(run_uri, tmp_path / "a", stage=3)
    uri = universal.universal_uri(found)
    doc = json.loads(storage.read_text(storage.join(uri, MANIFEST)))
    assert doc["kind"] == "universal" and doc["source"] == universal.source_id(found.manifest)
    assert universal.find_universal(found, None)[0].manifest == conv.manifest  # a second resume reuses it

    # A crash mid-conversion (files, no manifest) reads as absent, the original stays usable.
    storage.delete_file(storage.join(uri, MANIFEST))
    assert universal.find_universal(found, None) == (None, "an earlier conversion did not finish")
    reload(run_uri, tmp_path / "b", stage=3)

    # A cached file whose bytes rotted (same size) fails its checksum: uncommitted, converted again.
    victim = Path(uri, next(f["path"] for f in conv.manifest["files"] if f["path"].endswith("exp_avg.pt")))
    good = victim.read_bytes()
    victim.write_bytes(good[:-1] + bytes([good[-1] ^ 0xFF]))
    with caplog.at_level("WARNING", logger="e2e_dist"):
        reload(run_uri, tmp_path / "c", stage=3)
    assert "discarding the universal form of step 3: " in caplog.text and "is corrupt" in caplog.text
    assert victim.read_bytes() == good

    # An unknown format version of the cache is not trusted.
    bad = dict(doc, format_version=2)
    storage.write_text(storage.join(uri, MANIFEST), json.dumps(bad))
    assert "unknown format_version 2" in universal.find_universal(found, None)[1]


def test_zero0_and_zero123_do_not_mix_and_say_how_to_resume():
    saved = universal.Layout(world_size=2, zero_stage=0)
    assert not universal.needs_universal(saved, universal.Layout(world_size=1, zero_stage=0), 8)
    assert universal.needs_universal(universal.Layout(world_size=2, zero_stage=2),
                                     universal.Layout(world_size=2, zero_stage=2, offload_optimizer=True), 8)
    with pytest.raises(CheckpointError) as e:
        universal.needs_universal(saved, universal.Layout(world_size=1, zero_stage=3), 8)
    assert str(e.value) == ("checkpoint step 8 was written with 2 worker(s), ZeRO-0, this run uses 1 worker(s), "
                            "ZeRO-3: resharding between ZeRO-0 and ZeRO-1..3 is not supported (resume with "
                            "deepspeed.zero_stage=0)")


def test_a_zero0_checkpoint_is_refused_at_another_stage_before_ray_starts(ds, tmp_path):
    from e2e_dist.train.launcher import prepare_run_dir

    cfg = tiny_cfg(0, storage_path=str(tmp_path / "runs"))
    engine = engine_at(0)
    steps(engine, 0, 1)
    commit(engine, cfg.run_uri, tmp_path, stage=0, step=1)
    assert prepare_run_dir(cfg, resume=True).step == 1  # ZeRO-0 again: fine, at any world size
    with pytest.raises(CheckpointError, match=r"^checkpoint step 1 was written with 1 worker\(s\), ZeRO-0, this run "
                                              r"uses 1 worker\(s\), ZeRO-3: resharding between ZeRO-0 and ZeRO-1..3"):
        prepare_run_dir(tiny_cfg(3, storage_path=str(tmp_path / "runs")), resume=True)
