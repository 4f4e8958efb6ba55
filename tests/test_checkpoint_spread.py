"""Restores that fetch per node, conversions spread over ranks (issue 29, items 3-4): real DeepSpeed
engines in gloo process groups of 1 or 2 processes on this machine (127.0.0.1), each rank playing
its own node - its own restore directory, node rank = rank - so what a node fetches is exactly
what one rank needs, as on a cluster of one GPU per node. The restore path is the loop's own
(train/resume.py choose -> build -> restore), storage local.

- Same layout (2 ranks, ZeRO-2): each node fetches the model states and its rank's optimizer
  partition - exactly the files DeepSpeed then torch.loads - and less than the whole checkpoint.
- Another layout (2 ranks ZeRO-2 -> 2 ranks ZeRO-1): each rank converts its own slice of the
  parameters (disjoint, all of them together), keeps its files, and fetches the rest of what its
  engine opens and nothing more. fp32 weights and Adam moments equal the writer's, exactly.
- World-size changes 2 -> 1 and 1 -> 2 at ZeRO-2 (the universal form, converted by 1 and by 2 ranks)
  load the writer's state exactly.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def _start_rank(rank: int, world: int, port: int, root: Path) -> None:
    os.environ.update(LOCAL_RANK="0", RANK=str(rank), WORLD_SIZE=str(world))
    node_tmp = root / f"node{rank}"
    node_tmp.mkdir(parents=True, exist_ok=True)
    tempfile.tempdir = str(node_tmp)  # this rank's node: its own restore directory
    from e2e_dist.train.rendezvous import init_loopback_process_group

    init_loopback_process_group("gloo", rank=rank, world_size=world, port=port)


def _cfg(root: Path, run: str, stage: int):
    from tests.fixtures.tiny_deepspeed import tiny_cfg

    return tiny_cfg(stage, storage_path=str(root / "runs"), name=run)


def _state(engine) -> dict:
    from tests.test_checkpoint_universal import snapshot

    return snapshot(engine)


def save_worker(rank: int, world: int, port: int, root: str, run: str) -> None:
    import torch

    from e2e_dist.checkpoint import save_engine
    from e2e_dist.train.build import build_engine
    from tests.fixtures.tiny_deepspeed import batch, upload

    _start_rank(rank, world, port, Path(root))
    cfg = _cfg(Path(root), run, 2)
    engine = build_engine(cfg, device=torch.device("cpu"), world=world).engine
    for s in range(3):
        loss = engine(batch(s * world + rank))
        engine.backward(loss)
        engine.step()
    expected = _state(engine)
    client = {"step": 3, "data": {"epoch": 0, "samples": 6 * world}, "units_seen": 0, "logged": {}}
    local = save_engine(engine, Path(root) / f"save-{run}-{rank}", client)
    upload(local, cfg.run_uri, 3, rank=rank, world_size=world, zero_stage=2, storage_cfg=cfg.storage,
           meta={"config": cfg.to_public_dict(), "model_kind": "gpt"})
    if rank == 0:
        torch.save(expected, Path(root) / f"expected-{run}.pt")


def resume_worker(rank: int, world: int, port: int, root: str, cases: list) -> None:
    import torch

    from e2e_dist.train import resume
    from e2e_dist.train.build import build_engine

    _start_rank(rank, world, port, Path(root))
    real_load = torch.load
    for run, stage in cases:
        cfg = _cfg(Path(root), run, stage)
        node_dir = str(resume.node_restore_dir(cfg))
        plan = resume.choose(cfg, rank=rank, world=world, node_rank=rank)
        engine = build_engine(cfg, device=torch.device("cpu"), world=world, load_universal=plan.load_universal).engine
        opened: set[str] = set()

        def watched(f, *args, node_dir=node_dir, opened=opened, **kwargs):
            if isinstance(f, (str, os.PathLike)) and str(f).startswith(node_dir):
                opened.add(os.path.relpath(f, node_dir).split("/", 1)[1])  # relative to the checkpoint
            return real_load(f, *args, **kwargs)

        torch.load = watched
        try:
            state = resume.restore(engine, plan, cfg, rank=rank, world=world)
        finally:
            torch.load = real_load
        expected = torch.load(Path(root) / f"expected-{run}.pt", weights_only=False)
        got = _state(engine)
        differs = [f"{n} {k}" for n, ts in expected.items() for k, v in ts.items() if not torch.equal(got[n][k], v)]
        out = {"step": state.step, "differs": differs, "opened": sorted(opened), "bytes": plan.ledger.bytes,
               "fetched": {uri: sorted(paths) for uri, paths in plan.ledger.files.items()},
               "converted": plan.ledger.converted, "traffic": plan.traffic(),
               "checkpoint": plan.found.uri, "universal": plan.universal.manifest if plan.universal else None,
               "native_files": {f["path"]: f["size"] for f in plan.found.files}}
        Path(root, f"result-{run}-{world}-{stage}-{rank}.json").write_text(json.dumps(out))


def _spawn(fn, world: int, *args) -> None:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(fn, args=(world, port, *args), nprocs=world)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Checkpoints from 2 ranks ("two") and 1 rank ("one"), then every resume; result files by case."""
    root = tmp_path_factory.mktemp("spread")
    _spawn(save_worker, 2, str(root), "two")
    _spawn(save_worker, 1, str(root), "one")
    _spawn(resume_worker, 1, str(root), [("two", 2)])  # 2 -> 1: converted by 1 rank
    shutil.rmtree(root / "runs" / "two" / "step_00000003" / "universal")  # so that 2 ranks convert it again
    _spawn(resume_worker, 2, str(root), [("two", 2), ("two", 1), ("one", 2)])

    def get(run: str, world: int, stage: int) -> list[dict]:
        return [json.loads(Path(root, f"result-{run}-{world}-{stage}-{r}.json").read_text()) for r in range(world)]

    get.root = root
    return get


def test_a_node_fetches_only_what_its_ranks_load_at_the_same_layout(results):
    ranks = results("two", 2, 2)
    for rank, res in enumerate(ranks):
        assert res["step"] == 3 and res["differs"] == [] and res["universal"] is None
        (fetched,) = res["fetched"].values()
        assert fetched == res["opened"] == ["ds/mp_rank_00_model_states.pt",
                                             f"ds/zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"]
        sizes = res["native_files"]
        assert res["bytes"] == sum(sizes[p] for p in fetched) < sum(sizes.values())
        assert res["traffic"].startswith(f"fetched {res['bytes'] / 1e6:,.1f} MB on this node, ")


def test_a_resharded_restore_converts_a_slice_per_rank_and_fetches_only_the_rest_of_its_share(results):
    ranks = results("two", 2, 1)  # 2 ranks ZeRO-2 -> 2 ranks ZeRO-1: the universal form
    assert all(res["step"] == 3 and res["differs"] == [] for res in ranks)
    manifest = ranks[0]["universal"]
    assert manifest["converted_by"] == 2
    params = {p.split("/")[1] for p in (f["path"] for f in manifest["files"]) if p.count("/") == 2}
    slices = [set(res["converted"]) for res in ranks]
    assert slices[0] and slices[1] and not slices[0] & slices[1] and slices[0] | slices[1] == params
    shared = {"universal/zero/optimizer_state.pt", "universal/mp_rank_00_model_states.pt"}  # rank 0 writes them
    for rank, (res, mine) in enumerate(zip(ranks, slices)):
        uni = [f"universal/{p}" for uri, paths in res["fetched"].items() if uri.endswith("/universal") for p in paths]
        kept = {p for p in res["opened"] if (p.startswith("universal/zero/") and p.split("/")[2] in mine)
                or (rank == 0 and p in shared)}
        # what DeepSpeed opened = what this node converted itself + what it fetched; nothing fetched twice
        assert set(res["opened"]) == set(uni) | kept and not set(uni) & kept
        # conversion input: the model states and its own shard; the piece of the parameter at the edge
        # of its block that lies in the other shard came as fragment files, not as that whole shard
        assert sorted(res["fetched"][res["checkpoint"]]) == [
            "ds/mp_rank_00_model_states.pt", f"ds/zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"]
        assert res["bytes"] < sum(res["native_files"].values())  # the old restore: all of it, then more
    assert any(uri.endswith("/universal/_fragments") for res in ranks for uri in res["fetched"])
    assert not (results.root / "runs" / "two" / "step_00000003" / "universal" / "_fragments").exists()


def test_world_size_changes_load_the_writers_state_exactly(results):
    for run, world in (("two", 1), ("one", 2)):
        ranks = results(run, world, 2)
        assert [r["step"] for r in ranks] == [3] * world and all(r["differs"] == [] for r in ranks), (run, world)
        assert ranks[0]["universal"]["converted_by"] == world
        slices = [set(r["converted"]) for r in ranks]
        assert all(slices) and (world == 1 or not slices[0] & slices[1])
