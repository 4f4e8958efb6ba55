"""Resharding cost at 1 and 2 workers (issue 29, items 3-4): conversion time and bytes each node fetches.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/resharding.py [--shape cpu-large] [--rounds 2]

Real DeepSpeed engines in gloo process groups on this machine (torch.multiprocessing, one process
per rank, 127.0.0.1), local storage. Each rank plays its own node (its own restore directory, node
rank = rank), so what one node fetches is what a rank fetches on a cluster of one GPU per node.

1. A ZeRO-2 checkpoint is written and committed by 2 ranks (and, for the 1 -> 2 case, by 1 rank).
2. It is resumed through the loop's own path (train/resume.py: choose, build, restore) as:
     2->1 z2     1 worker at ZeRO-2: universal form, converted by 1 worker
     2->2 z1     2 workers at ZeRO-1: universal form, converted by 2 workers (same source as 2->1)
     1->2 z2     2 workers at ZeRO-2 from the 1-rank checkpoint (both need its one optimizer file)
     2->2 z2     2 workers at ZeRO-2: the same layout, native load (no conversion)
   each `--rounds` times with the cache dropped first (conversion included), and the universal cases
   once more with the cache kept (what every later resume pays).
Reported per case: the slowest rank's seconds in `choose` (finding, fetching, converting, committing)
and in `restore` (fetching its share, loading), and the bytes each node downloaded (counted at
storage.download_dir, so the project's own counter is checked, not trusted). One JSON line at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {
    "tiny-text": ["model.n_layer=2", "model.d_model=128", "model.n_head=4", "model.max_seq_len=128", "data.seq_len=128"],
    # ~25M parameters, ~400 MB per checkpoint with Adam moments (benchmarks/reshard_resume.py's cpu-large)
    "cpu-large": ["model.n_layer=8", "model.d_model=512", "model.n_head=8", "model.max_seq_len=256", "data.seq_len=256"],
}


def config(root: Path, shape: str, stage: int, world: int):
    from e2e_dist.config import load_run_config

    return load_run_config("tiny-text", [f"storage.path={root}/runs", "name=bench", f"trainer.num_workers={world}",
                                         "trainer.micro_batch_size=2", f"trainer.global_batch_size={2 * world}",
                                         f"deepspeed.zero_stage={stage}", *SHAPES[shape]])


def _start_rank(rank: int, world: int, port: int, root: Path) -> None:
    os.environ.update(LOCAL_RANK="0", RANK=str(rank), WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
    os.nice(15)  # like a Ray worker (BENCHMARKS.md: every side runs like a 1-CPU Ray worker)
    import torch

    torch.set_num_threads(1)
    node_tmp = root / f"node{rank}"
    node_tmp.mkdir(parents=True, exist_ok=True)
    tempfile.tempdir = str(node_tmp)  # this rank's node: its own restore directory
    from e2e_dist.train.rendezvous import init_loopback_process_group

    init_loopback_process_group("gloo", rank=rank, world_size=world, port=port)


def save_worker(rank: int, world: int, port: int, root: str, shape: str, run: str) -> None:
    import torch

    from e2e_dist.checkpoint import save_engine
    from e2e_dist.train.build import build_engine
    from tests.fixtures.tiny_deepspeed import upload

    _start_rank(rank, world, port, Path(root))
    cfg = config(Path(root), shape, 2, world)
    built = build_engine(cfg, device=torch.device("cpu"), world=world)
    batch = built.model.example_batch(2, torch.device("cpu"))
    for _ in range(2):  # optimizer state exists
        loss = built.engine(batch)
        built.engine.backward(loss)
        built.engine.step()
    client = {"step": 2, "data": {"epoch": 0, "samples": 4 * world}, "units_seen": 0, "logged": {}}
    local = save_engine(built.engine, Path(root) / f"save-{run}-{rank}", client)
    upload(local, f"{root}/runs/{run}", 2, rank=rank, world_size=world, zero_stage=2, storage_cfg=cfg.storage,
           meta={"config": cfg.to_public_dict(), "model_kind": "gpt"}, timeout=600)


def resume_worker(rank: int, world: int, port: int, root: str, shape: str, run: str, stage: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    from e2e_dist import storage
    from e2e_dist.train import resume
    from e2e_dist.train.build import build_engine

    _start_rank(rank, world, port, Path(root))
    fetched = [0]
    real = storage.download_dir

    def counting(*args, **kwargs):
        entries = real(*args, **kwargs)
        fetched[0] += sum(e.size for e in entries)
        return entries

    storage.download_dir = counting
    cfg = config(Path(root), shape, stage, world).model_copy(update={"name": run})
    choose_kw = {"local_rank": 0} if "local_rank" in resume.choose.__code__.co_varnames else {}
    dist.barrier()
    t0 = time.perf_counter()
    plan = resume.choose(cfg, rank=rank, world=world, node_rank=rank, **choose_kw)
    t1 = time.perf_counter()
    engine = build_engine(cfg, device=torch.device("cpu"), world=world, load_universal=plan.load_universal).engine
    dist.barrier()
    t2 = time.perf_counter()
    state = resume.restore(engine, plan, cfg, rank=rank, world=world, local_rank=0, node_rank=rank)
    t3 = time.perf_counter()
    assert state.step == 2, state.step
    ledger = getattr(plan, "ledger", None)  # the project's own counter (absent before issue 29)
    Path(out, f"rank{rank}.json").write_text(json.dumps({
        "choose_s": t1 - t0, "restore_s": t3 - t2, "fetched": fetched[0], "universal": plan.load_universal,
        "counted": ledger.bytes if ledger else None, "converted": len(ledger.converted) if ledger else None}))


def spawn(fn, world: int, *args) -> None:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(fn, args=(world, port, *args), nprocs=world)


def resume_case(root: Path, shape: str, run: str, world: int, stage: int, *, drop_cache: bool) -> list[dict]:
    if drop_cache:
        shutil.rmtree(root / "runs" / run / "step_00000002" / "universal", ignore_errors=True)
    out = Path(tempfile.mkdtemp(dir=root, prefix="out-"))
    spawn(resume_worker, world, str(root), shape, run, stage, str(out))
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="cpu-large")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="e2eb-resharding-"))
    try:
        spawn(save_worker, 2, str(root), args.shape, "from2")
        spawn(save_worker, 1, str(root), args.shape, "from1")
        sizes = {run: sum(f.stat().st_size for f in (root / "runs" / run / "step_00000002").rglob("*") if f.is_file())
                 for run in ("from2", "from1")}
        cases = {"2->1 z2": ("from2", 1, 2), "2->2 z1": ("from2", 2, 1), "1->2 z2": ("from1", 2, 2),
                 "2->2 z2 native": ("from2", 2, 2)}
        # Rounds take turns, in rotating order (the machine is shared: see BENCHMARKS.md).
        order, first = list(cases), {name: [] for name in cases}
        for r in range(args.rounds):
            for name in order[r % len(order):] + order[: r % len(order)]:
                first[name].append(resume_case(root, args.shape, *cases[name], drop_cache=True))
        results: dict[str, dict] = {}
        for name, (run, world, stage) in cases.items():
            cached = [] if name.endswith("native") else [resume_case(root, args.shape, run, world, stage,
                                                                     drop_cache=False)]
            results[name] = summarize(first[name], cached, sizes[run])
            print(name, json.dumps(results[name]), flush=True)
        print(f"shape {args.shape}: checkpoints {sizes['from2'] / 1e6:.1f} MB (2 ranks), {sizes['from1'] / 1e6:.1f} MB "
              f"(1 rank), load avg {os.getloadavg()[0]:.1f}")
        print(json.dumps({"shape": args.shape, "checkpoint_mb": {k: round(v / 1e6, 1) for k, v in sizes.items()},
                          "cases": results}))
    finally:
        shutil.rmtree(root, ignore_errors=True)


def summarize(first: list[list[dict]], cached: list[list[dict]], ckpt_bytes: int) -> dict:
    """Slowest rank per round, medians over rounds; MB each node fetched (first round, then cached)."""
    def med(rounds, key):
        return round(statistics.median(max(r[key] for r in ranks) for ranks in rounds), 3) if rounds else None

    return {"choose_s": med(first, "choose_s"), "restore_s": med(first, "restore_s"),
            "choose_cached_s": med(cached, "choose_s"), "restore_cached_s": med(cached, "restore_s"),
            "node_fetched_mb": [round(r["fetched"] / 1e6, 1) for r in first[0]],
            "node_fetched_cached_mb": [round(r["fetched"] / 1e6, 1) for r in cached[0]] if cached else None,
            "counter_agrees": all(r["counted"] in (None, r["fetched"]) for ranks in first + cached for r in ranks),
            "params_converted_per_rank": [r["converted"] for r in first[0]],
            "source_checkpoint_mb": round(ckpt_bytes / 1e6, 1)}


if __name__ == "__main__":
    main()
