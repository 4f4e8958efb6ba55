"""The commit protocol with real DeepSpeed engines and a real S3 endpoint (moto over HTTP).

Ray Train is not needed to exercise the protocol: the upload function is called exactly as Ray
calls it (a local `ray.train.Checkpoint` and the checkpoint dir name); several ranks are threads
with their own local directories. One slow test runs it under Ray Train itself.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import torch

from e2e_dist import storage
from e2e_dist.checkpoint import (
    MANIFEST, checkpoint_dir_name, find_latest_committed, list_checkpoints, load_engine, make_upload_fn,
    restore_latest, save_engine, step_of,
)
from e2e_dist.checkpoint.layout import parse_manifest, parse_part
from e2e_dist.config import StorageConfig
from e2e_dist.errors import CheckpointError
from tests.fixtures.tiny_deepspeed import fake_rank_dir, tiny_cfg, tiny_engine, train, upload


# ------------------------------------------------------------------------------ run locations
@pytest.fixture(params=["local", "s3"])
def run_uri(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "runs" / "ck")
    return request.getfixturevalue("s3_bucket") + "/runs/ck"


def steps_in(run_uri: str) -> list[int]:
    return sorted(s for s in map(step_of, storage.list_dir(run_uri)) if s is not None)


# ------------------------------------------------------------------------------------- tests
def test_checkpoint_dir_name_sorts_and_parses():
    assert checkpoint_dir_name(100) == "step_00000100" and step_of("step_00000100") == 100
    assert sorted([checkpoint_dir_name(s) for s in (100, 9, 20000)]) == [checkpoint_dir_name(s) for s in (9, 100, 20000)]
    assert step_of("step_1") is None and step_of("checkpoint_2024") is None and step_of("step_000000100") is None


def test_commit_then_resume_restores_model_optimizer_and_schedule(ds, run_uri, tmp_path):
    cfg = tiny_cfg(2)
    engine = tiny_engine(cfg, seed=0)
    train(engine, 3)
    local = save_engine(engine, tmp_path / "save", {"step": 3, "data": {"epoch": 0, "offset": 6}})
    meta = {"config": cfg.to_public_dict(), "data": {"epoch": 0, "offset": 6}, "model_kind": "gpt"}
    persisted = upload(local, run_uri, 3, meta=meta)

    fs, ckpt_path = storage.resolve(storage.join(run_uri, "step_00000003"))
    assert persisted.path == ckpt_path and persisted.filesystem.type_name == fs.type_name
    manifest = json.loads(storage.read_text(storage.join(run_uri, "step_00000003", MANIFEST)))
    local_files = storage.local_files(local)
    assert [f["path"] for f in manifest["files"]] == local_files
    assert all(f["sha256"] == storage.sha256_file(local / f["path"]) for f in manifest["files"])
    assert (manifest["step"], manifest["world_size"], manifest["zero_stage"], manifest["meta"]) == (3, 1, 2, meta)
    assert "_parts/rank_00000.json" in storage.list_files(storage.join(run_uri, "step_00000003"))

    ckpt, skipped = find_latest_committed(run_uri)
    assert ckpt is not None and ckpt.step == 3 and skipped == [] and ckpt.meta == meta

    fresh = tiny_engine(cfg, seed=1)
    got, path, messages = restore_latest(run_uri, None, tmp_path / "restore")
    assert got == ckpt and messages == []
    client_state = load_engine(fresh, path)
    assert client_state["step"] == 3 and client_state["data"] == {"epoch": 0, "offset": 6}
    assert fresh.lr_scheduler.get_last_lr() == engine.lr_scheduler.get_last_lr()
    for a, b in zip(engine.module.parameters(), fresh.module.parameters()):
        assert torch.equal(a, b)
    # Same next step on both: equal only if optimizer moments and the LR schedule came back too.
    assert train(engine, 1, first=3) == train(fresh, 1, first=3)
    for a, b in zip(engine.module.parameters(), fresh.module.parameters()):
        assert torch.equal(a, b)


def test_two_ranks_manifest_is_written_last(ds, run_uri, tmp_path):
    engine = tiny_engine(tiny_cfg(2))
    train(engine, 1)
    rank0 = save_engine(engine, tmp_path / "rank0", {"step": 1})
    rank1 = fake_rank_dir(tmp_path, 1)
    ckpt_uri = storage.join(run_uri, "step_00000001")
    errors: list[BaseException] = []

    def run(rank: int, local: Path) -> None:
        try:
            upload(local, run_uri, 1, rank=rank, world_size=2)
        except BaseException as e:  # surfaced by the assertions below
            errors.append(e)

    t0 = threading.Thread(target=run, args=(0, rank0))
    t0.start()
    deadline = time.monotonic() + 30
    while not storage.exists(storage.join(ckpt_uri, "_parts/rank_00000.json")) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # rank 0 is now polling for rank 1
    assert t0.is_alive() and not storage.exists(storage.join(ckpt_uri, MANIFEST))
    assert find_latest_committed(run_uri)[0] is None

    t1 = threading.Thread(target=run, args=(1, rank1))
    t1.start()
    t0.join(60)
    t1.join(60)
    assert not errors, errors
    manifest = json.loads(storage.read_text(storage.join(ckpt_uri, MANIFEST)))
    listed = {f["path"] for f in manifest["files"]}
    assert listed == set(storage.local_files(rank0)) | set(storage.local_files(rank1))
    assert "ds/zero_pp_rank_1_mp_rank_00_optim_states.pt" in listed and manifest["world_size"] == 2
    files = storage.list_files(ckpt_uri)
    assert {"_parts/rank_00000.json", "_parts/rank_00001.json"} <= files.keys()
    assert find_latest_committed(run_uri)[0].step == 1


def test_commit_times_out_when_a_rank_never_uploads(tmp_path):
    run = str(tmp_path / "runs" / "r")
    import ray.train

    rank0 = fake_rank_dir(tmp_path, 0)
    fn = make_upload_fn(run_uri=run, storage_cfg=None, rank=0, world_size=2, step=5, meta={}, keep_last=2,
                        commit_timeout_s=1.0, save_id="a")
    assert not fn.done.is_set()
    with pytest.raises(CheckpointError) as e:
        fn(ray.train.Checkpoint.from_directory(str(rank0)), checkpoint_dir_name(5))
    assert "no upload from rank(s) 1" in str(e.value) and "\n" not in str(e.value)
    assert fn.done.is_set() and fn.error is e.value  # what the loop watches to keep one upload in flight
    assert not storage.exists(storage.join(run, "step_00000005", MANIFEST))
    ckpt, skipped = find_latest_committed(run)
    assert ckpt is None and skipped == [f"skipped {run}/step_00000005: no manifest.json (upload never committed)"]


def test_part_left_by_a_dead_attempt_is_never_committed(tmp_path):
    run = str(tmp_path / "runs" / "r")
    rank0, rank1 = fake_rank_dir(tmp_path, 0), fake_rank_dir(tmp_path, 1)
    upload(rank1, run, 7, rank=1, world_size=2, save_id="attempt-1")  # then attempt 1 died
    with pytest.raises(CheckpointError, match=r"rank\(s\) 1"):
        upload(rank0, run, 7, world_size=2, save_id="attempt-2", timeout=1.0)
    assert find_latest_committed(run)[0] is None

    errors: list[BaseException] = []
    threads = [threading.Thread(target=lambda r=r, d=d: _catch(errors, upload, d, run, 7, rank=r, world_size=2,
                                                               save_id="attempt-2"))
               for r, d in ((0, rank0), (1, rank1))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    manifest = find_latest_committed(run)[0].manifest
    assert manifest["save_id"] == "attempt-2" and manifest["world_size"] == 2


def _catch(errors, fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except BaseException as e:
        errors.append(e)


def _overwrite(uri: str, data: bytes) -> None:
    if storage.is_s3(uri):
        storage.write_bytes(uri, data)
    else:
        Path(uri).write_bytes(data)


def test_discovery_skips_partial_truncated_and_corrupt(run_uri, tmp_path, capsys):
    local = fake_rank_dir(tmp_path, 0)
    shard = "ds/zero_pp_rank_0_mp_rank_00_optim_states.pt"
    for step in (1, 2, 3, 4, 5):
        upload(local, run_uri, step)
    ck = {s: storage.join(run_uri, checkpoint_dir_name(s)) for s in (1, 2, 3, 4, 5)}
    storage.delete_file(storage.join(ck[5], MANIFEST))                        # crash before the commit
    size = storage.list_files(ck[4])[shard]
    _overwrite(storage.join(ck[4], shard), b"x" * (size - 1))                 # truncated file
    _overwrite(storage.join(ck[3], shard), b"y" * size)                       # same size, wrong bytes

    ckpt, skipped = find_latest_committed(run_uri)  # structural check: sizes only, reads no data
    assert ckpt.step == 3
    assert skipped == [f"skipped {ck[5]}: no manifest.json (upload never committed)",
                       f"skipped {ck[4]}: file {shard} has {size - 1} bytes, manifest says {size}"]

    ckpt, skipped = find_latest_committed(run_uri, verify_checksums=True)
    assert ckpt.step == 2 and len(skipped) == 3
    assert skipped[2].startswith(f"skipped {ck[3]}: {shard} is corrupt (sha256 ")

    ckpt, path, messages = restore_latest(run_uri, None, tmp_path / "restore")
    assert ckpt.step == 2 and messages == skipped
    assert (path / shard).read_bytes() == (local / shard).read_bytes()
    assert not (tmp_path / "restore" / "step_00000003").exists()  # the corrupt copy was cleaned up

    infos = list_checkpoints(run_uri)
    assert [(i.step, i.committed) for i in infos] == [(5, False), (4, False), (3, True), (2, True), (1, True)]
    assert restore_latest(run_uri, None, tmp_path / "r2", step=1)[0].step == 1

    # `e2e-dist checkpoints --verify` says what resume would skip: step 3 is corrupt, not committed.
    from e2e_dist.cli import main

    assert main(["checkpoints", run_uri]) == 0
    plain = capsys.readouterr().out.splitlines()
    assert plain[2].split()[:2] == ["3", "committed"]
    assert main(["checkpoints", run_uri, "--verify"]) == 0
    verified = capsys.readouterr().out.splitlines()
    assert verified[2].split()[:2] == ["3", "CORRUPT"] and f"{shard} is corrupt (sha256" in verified[2]
    assert [line.split()[1] for line in verified[:5]] == ["PARTIAL", "PARTIAL", "CORRUPT", "committed", "committed"]
    assert verified[-1].startswith("2 of 5 checkpoint(s) verified")


def test_keep_last_deletes_only_after_a_newer_commit(run_uri, tmp_path):
    rank0, rank1 = fake_rank_dir(tmp_path, 0), fake_rank_dir(tmp_path, 1)
    for step in (1, 2, 3):
        upload(rank0, run_uri, step, keep_last=2)
    assert steps_in(run_uri) == [2, 3]
    # Step 4 never commits (rank 1 is gone): nothing may be deleted for it.
    with pytest.raises(CheckpointError):
        upload(rank0, run_uri, 4, world_size=2, keep_last=2, timeout=0.5)
    assert steps_in(run_uri) == [2, 3, 4]
    assert find_latest_committed(run_uri)[0].step == 3
    upload(rank0, run_uri, 5, keep_last=2)
    assert steps_in(run_uri) == [3, 5]  # 2: older than the newest two; 4: uncommitted debris
    assert [i.committed for i in list_checkpoints(run_uri)] == [True, True]
    del rank1


def test_s3_endpoint_dies_mid_upload(private_s3_server, tmp_path):
    from tests.fixtures.s3 import make_bucket

    cfg = StorageConfig(path="s3://placeholder", endpoint_url=private_s3_server.url)
    run = make_bucket(private_s3_server.url) + "/runs/crash"
    small = fake_rank_dir(tmp_path, 0)
    upload(small, run, 1, storage_cfg=cfg)

    big = fake_rank_dir(tmp_path / "big", 0)
    with open(big / "ds" / "huge.bin", "wb") as f:  # 128 MiB sparse file: seconds of multipart upload
        f.truncate(128 << 20)
    errors: list[BaseException] = []
    t = threading.Thread(target=_catch, args=(errors, upload, big, run, 2), kwargs={"storage_cfg": cfg})
    t.start()
    ckpt2 = storage.join(run, "step_00000002")
    deadline = time.monotonic() + 60
    while not storage.list_files(ckpt2, cfg) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert storage.list_files(ckpt2, cfg), "upload never started"
    private_s3_server.stop()
    t.join(120)
    assert not t.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], CheckpointError), errors
    msg = str(errors[0])
    assert "\n" not in msg and "step_00000002" in msg and private_s3_server.url in msg

    private_s3_server.start()  # same port, same (process-global) moto state
    ckpt, skipped = find_latest_committed(run, cfg)
    assert ckpt.step == 1
    assert skipped == [f"skipped {ckpt2}: no manifest.json (upload never committed)"]
    assert restore_latest(run, cfg, tmp_path / "restore")[0].step == 1


@pytest.mark.slow
def test_upload_fn_under_ray_train_two_workers_async(ray_local, s3_server, s3_bucket):
    """Ray Train itself calls the function (ASYNC mode, 2 workers): it accepts what we return, both
    ranks' files land in one directory, and the manifest commits."""
    from ray.train import CheckpointUploadMode, RunConfig as RayRunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    storage_cfg = StorageConfig(path=f"{s3_bucket}/runs", endpoint_url=s3_server.url)
    run = f"{s3_bucket}/runs/ray-ck"

    def per_worker(config):
        import tempfile

        import ray.train

        ctx = ray.train.get_context()
        rank, world = ctx.get_world_rank(), ctx.get_world_size()
        for step in (1, 2):
            local = Path(tempfile.mkdtemp())
            (local / "ds").mkdir()
            (local / "ds" / f"shard_{rank}.bin").write_bytes(bytes([rank, step]) * 1000)
            fn = make_upload_fn(run_uri=config["run"], storage_cfg=config["storage"], rank=rank, world_size=world,
                                step=step, meta={"step": step}, keep_last=1, commit_timeout_s=120)
            ray.train.report({"step": step}, checkpoint=ray.train.Checkpoint.from_directory(str(local)),
                             checkpoint_dir_name=checkpoint_dir_name(step), checkpoint_upload_fn=fn,
                             checkpoint_upload_mode=CheckpointUploadMode.ASYNC)

    trainer = TorchTrainer(
        per_worker, train_loop_config={"run": run, "storage": storage_cfg},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
        run_config=RayRunConfig(name="ray-ck", **storage.ray_storage_kwargs(storage_cfg.path, storage_cfg)),
    )
    result = trainer.fit()
    assert result.error is None
    assert result.checkpoint.path.endswith("ray-ck/step_00000002")
    ckpt, skipped = find_latest_committed(run, storage_cfg)
    assert ckpt.step == 2 and skipped == []
    assert {f["path"] for f in ckpt.files} == {"ds/shard_0.bin", "ds/shard_1.bin"}
    assert ckpt.manifest["save_id"]  # taken from Ray Train's worker group
    assert steps_in_cfg(run, storage_cfg) == [2]  # keep_last=1 pruned step 1 after step 2 committed


def steps_in_cfg(run_uri: str, cfg) -> list[int]:
    return sorted(s for s in map(step_of, storage.list_dir(run_uri, cfg)) if s is not None)


# ------------------------------------------------------------------------------ manifest schema
GOOD_MANIFEST = {"format_version": 1, "step": 3, "world_size": 2, "zero_stage": 2, "save_id": "a",
                 "files": [{"path": "ds/x.pt", "size": 5, "sha256": "0" * 64}], "created_at": "t", "meta": {"k": 1}}


@pytest.mark.parametrize("change,expected", [
    ({"format_version": 2}, "unknown format_version 2"),
    ({"step": 4}, "step 4 does not match directory step 3"),
    ({"world_size": 0}, "bad world_size 0"),
    ({"files": {}}, "'files' is not a list"),
    ({"files": [{"path": "../x", "size": 1, "sha256": "0" * 64}]}, "bad file entry {'path': '../x'"),
    ({"files": [{"path": "x", "size": -1, "sha256": "0" * 64}]}, "bad file entry {'path': 'x', 'size': -1"),
    ({"meta": []}, "'meta' is not an object"),
])
def test_bad_manifest_is_one_line_naming_file_and_field(change, expected):
    where = "s3://b/run/step_00000003/manifest.json"
    with pytest.raises(CheckpointError) as e:
        parse_manifest(json.dumps({**GOOD_MANIFEST, **change}), step=3, where=where)
    assert str(e.value).startswith(f"{where}: {expected}") and "\n" not in str(e.value)
    for text, problem in (("{", "not valid JSON"), ("[]", "not a JSON object")):
        with pytest.raises(CheckpointError, match=f"^{where}: {problem}"):
            parse_part(text, where=where)


def test_manifest_keeps_extra_keys_and_normalises_file_entries():
    extra_field = {**GOOD_MANIFEST, "files": [{**GOOD_MANIFEST["files"][0], "note": "dropped"}]}
    assert parse_manifest(json.dumps(extra_field), step=3) == GOOD_MANIFEST
    no_meta = {k: v for k, v in GOOD_MANIFEST.items() if k != "meta"}
    assert parse_manifest(json.dumps(no_meta), step=3) == no_meta
