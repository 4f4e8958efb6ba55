"""Export: a real ZeRO checkpoint (committed to S3 or disk) -> one safetensors file whose tensors
equal the trained model's, loadable strictly into a plain ByteGPT without DeepSpeed or Ray."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from e2e_dist import storage
from e2e_dist.errors import CheckpointError
from e2e_dist.export import export_checkpoint, generate_from_export, load_exported
from tests.conftest import ROOT
from tests.fixtures.tiny_deepspeed import fake_rank_dir, tiny_cfg, tiny_engine, train, upload


def _commit(engine, cfg, tmp_path: Path, step: int, zero_stage: int) -> None:
    from e2e_dist.checkpoint import save_engine

    local = save_engine(engine, tmp_path / f"save{step}", {"step": step})
    upload(local, cfg.run_uri, step, zero_stage=zero_stage,
           meta={"config": cfg.to_public_dict(), "model_kind": cfg.model.kind}, storage_cfg=cfg.storage)


def test_export_zero3_from_s3_equals_gathered_weights(ds, s3_bucket, tmp_path):
    import deepspeed

    # Persistence threshold 0: every parameter really is partitioned (empty outside a gather).
    cfg = tiny_cfg(3, storage_path=f"{s3_bucket}/runs", name="exp3",
                   zero_optimization={"stage3_param_persistence_threshold": 0})
    engine = tiny_engine(cfg)
    train(engine, 3)
    assert all(p.numel() == 0 for p in engine.module.parameters())  # sharded, as ZeRO-3 should be
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        full = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
    _commit(engine, cfg, tmp_path, 3, zero_stage=3)

    out = f"{s3_bucket}/exports/model.safetensors"
    summary = export_checkpoint(cfg.run_uri, out)  # the run dir: its newest committed checkpoint
    assert summary["step"] == 3 and summary["out"] == out and summary["skipped"] == []
    assert summary["tied"] == {"head.weight": "tok_emb.weight"}

    local = tmp_path / "model.safetensors"
    storage.download_file(out, local)
    blob = local.read_bytes()
    assert os.environ["AWS_SECRET_ACCESS_KEY"].encode() not in blob
    with safe_open(str(local), framework="pt") as f:
        assert set(f.keys()) == set(full) - {"head.weight"}  # the tied head is stored once
        meta = f.metadata()
    assert json.loads(meta["e2e_dist.config"]) == cfg.to_public_dict()

    model, loaded_cfg = load_exported(out)  # from s3://, strict load into a plain ByteGPT
    assert type(model).__name__ == "ByteGPT" and loaded_cfg == cfg
    assert model.head.weight is model.tok_emb.weight  # still tied after loading
    state = model.state_dict()
    assert state.keys() == full.keys()
    for k, v in full.items():
        assert torch.equal(state[k], v), k

    text = generate_from_export(out, "def ", max_new_bytes=24, seed=1)
    assert isinstance(text, str) and text == generate_from_export(str(local), "def ", max_new_bytes=24, seed=1)


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_export_other_stages_to_local_dir(ds, tmp_path, zero_stage):
    cfg = tiny_cfg(zero_stage, storage_path=str(tmp_path / "runs"), name=f"exp{zero_stage}")
    engine = tiny_engine(cfg, seed=zero_stage)
    train(engine, 2)
    _commit(engine, cfg, tmp_path, 1, zero_stage)
    train(engine, 1, first=2)
    _commit(engine, cfg, tmp_path, 2, zero_stage)
    full = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}

    out_dir = tmp_path / "out"
    out_dir.mkdir()
    summary = export_checkpoint(storage.join(cfg.run_uri, "step_00000002"), str(out_dir))
    assert summary["out"] == str(out_dir / "model.safetensors") and summary["step"] == 2
    model, _ = load_exported(summary["out"])
    for k, v in model.state_dict().items():
        assert torch.equal(v, full[k]), k

    if zero_stage == 2:
        # The proof that export is self-contained: a fresh interpreter loads and samples it
        # without importing DeepSpeed or Ray.
        code = (
            "import sys\n"
            "from e2e_dist.export import generate_from_export\n"
            f"print(repr(generate_from_export({summary['out']!r}, 'import ', max_new_bytes=16)))\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('deepspeed', 'ray'))\n"
            "assert not bad, bad\n"
        )
        proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.startswith("'")

        # DeepSpeed's own consolidation, as users reach for it: the zero_to_fp32.py saved into
        # the checkpoint, run with its defaults (sharding needs huggingface_hub: locked).
        ckpt_dir = Path(cfg.run_uri) / "step_00000002"
        proc = subprocess.run([sys.executable, str(ckpt_dir / "zero_to_fp32.py"), str(ckpt_dir), str(tmp_path / "ds_out")],
                              cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        got = torch.load(tmp_path / "ds_out" / "pytorch_model.bin", weights_only=True)
        assert set(full) - set(got) <= {"head.weight"}  # a tied head may be stored once
        for k, v in got.items():
            assert torch.equal(v, full[k]), k


@pytest.mark.parametrize("kind", ["resnet", "ctc-speech"])
def test_export_other_model_kinds_with_buffers(ds, tmp_path, kind):
    """Pixels and waveforms too: BatchNorm running stats (and their int step counter) survive."""
    from e2e_dist.config import RunConfig

    model_cfg = {"resnet": {"kind": "resnet", "widths": [4, 8], "num_classes": 3},
                 "ctc-speech": {"kind": "ctc-speech", "conv_channels": 8, "n_layer": 1, "d_model": 16}}[kind]
    cfg = RunConfig.model_validate({"name": f"exp-{kind}", "storage": {"path": str(tmp_path / "runs")},
                                    "model": model_cfg, "data": {"image_size": 8, "max_audio_seconds": 0.1},
                                    "trainer": {"micro_batch_size": 2}, "deepspeed": {"zero_stage": 2}})
    engine = tiny_engine(cfg)
    for _ in range(2):
        loss = engine(engine.module.example_batch(2))
        engine.backward(loss)
        engine.step()
    full = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
    _commit(engine, cfg, tmp_path, 2, zero_stage=2)
    summary = export_checkpoint(cfg.run_uri, str(tmp_path / "m.safetensors"))
    model, loaded = load_exported(summary["out"])
    assert loaded.model.kind == kind and summary["num_tensors"] == len(full)
    # The parameter count is training's (model.num_params()); buffers are counted apart.
    assert summary["num_params"] == engine.module.num_params()
    assert summary["num_buffer_values"] == sum(b.numel() for b in engine.module.buffers())
    assert summary["num_buffer_values"] > 0 or kind != "resnet"  # BatchNorm statistics
    # An exported model is for sharing: the mode a plain open() gives (umask applied), not 0600.
    umask = os.umask(0)
    os.umask(umask)
    assert Path(summary["out"]).stat().st_mode & 0o777 == 0o666 & ~umask
    state = model.state_dict()
    for k, v in full.items():
        assert state[k].dtype == v.dtype and torch.equal(state[k], v), k


def test_export_and_load_errors_are_one_line(tmp_path):
    def one_line(exc_info) -> str:
        assert "\n" not in str(exc_info.value)
        return str(exc_info.value)

    with pytest.raises(CheckpointError) as e:
        export_checkpoint(str(tmp_path / "nowhere"), str(tmp_path / "o.safetensors"))
    assert "no such checkpoint or run directory" in one_line(e)

    run = str(tmp_path / "runs" / "r")
    with pytest.raises(CheckpointError):
        upload(fake_rank_dir(tmp_path, 0), run, 4, world_size=2, timeout=0.3)  # never commits
    with pytest.raises(CheckpointError) as e:
        export_checkpoint(run, str(tmp_path / "o.safetensors"))
    assert "no committed checkpoint to export" in one_line(e) and "step_00000004" in str(e.value)

    upload(fake_rank_dir(tmp_path, 0), run, 5, meta={"data": {}})  # committed, but no run config in meta
    with pytest.raises(CheckpointError) as e:
        export_checkpoint(storage.join(run, "step_00000005"), str(tmp_path / "o.safetensors"))
    assert "no run config" in one_line(e)
    assert not (tmp_path / "o.safetensors").exists()

    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(CheckpointError) as e:
        load_exported(str(plain))
    assert "not an e2e-dist export" in one_line(e)
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors at all")
    with pytest.raises(CheckpointError) as e:
        load_exported(str(tmp_path / "junk.safetensors"))
    assert "not a readable safetensors file" in one_line(e)
