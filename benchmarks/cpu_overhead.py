"""Step time of our Ray Train + DeepSpeed path vs a raw torch.distributed DDP loop (gloo, 2 procs).

    .venv/bin/python benchmarks/cpu_overhead.py [--steps 40] [--rounds 3] [--zero 2]

Three sides, same model (the tiny-text ByteGPT), micro-batch, sequence length and optimizer,
measured in one run: raw DDP (2 spawned processes, gloo), the same DeepSpeed engine our loop
builds but in 2 spawned processes without Ray (splits our overhead into "DeepSpeed vs DDP" and
"Ray Train + data feeding + our loop vs a bare DeepSpeed loop"), and our whole path
(`run_training`, 2 Ray Train workers). Every side runs like a 1-CPU Ray worker: one intra-op
thread (OMP_NUM_THREADS=1) and the niceness Ray gives its workers (15), so no side gets a
scheduling priority another lacks on a shared machine.

Noise control (2 shared cores, other jobs running): the sides take turns for `--rounds` rounds,
in a rotated order; each side's step time is measured in windows of `--window` steps after
`--warmup` steps, and ratios are of median windows (a window is only ever inflated by other
load, so medians are robust where means are not). Our windows are the training loop's own logging
intervals, read from every progress update of the run (`run_ours_recorded`), so our side is
exactly `run_training`: Ray Data feeding real batches (the other sides reuse one random batch
already in memory), metrics reduced once per window, the progress actor, DeepSpeed ZeRO.
Goal: ours / DDP <= 1.10x.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from e2e_dist.config import RunConfig, load_run_config  # noqa: E402
from e2e_dist.models.registry import build_model  # noqa: E402
from e2e_dist.train.ray_env import free_port  # noqa: E402
from e2e_dist.train.rendezvous import init_loopback_process_group  # noqa: E402

RAY_WORKER_NICENESS = 15  # Ray's default `worker_niceness`: every Ray worker process runs at it


# ------------------------------------------------------------------------------- our path, recorded
@contextlib.contextmanager
def recording_progress() -> Iterator[list[dict[str, Any]]]:
    """Inside this context, `run_training`'s progress actor keeps every update it receives.

    Rank 0 of the loop sends one update per logging interval (and at evaluations and the end) to
    the run's progress actor, fire-and-forget: that is the loop's own per-window metrics
    (step_time_s, ckpt_stall_s, loss, ...). The display class is swapped for one whose actor
    records them; the yielded list is filled when the run's display closes. Nothing else in the
    run changes, and run_training's display always has such an actor anyway.
    """
    import ray

    from e2e_dist.train import progress

    @ray.remote(num_cpus=0)
    class Recorder:
        def __init__(self) -> None:
            self.updates: list[dict[str, Any]] = []

        def put(self, state: dict[str, Any]) -> None:
            self.updates.append(state)

        def history(self) -> list[dict[str, Any]]:
            return self.updates

        def drain(self) -> list[dict[str, Any]]:  # a live display reads these; history keeps them all
            out, self.cursor = self.updates[getattr(self, "cursor", 0):], len(self.updates)
            return out

    updates: list[dict[str, Any]] = []
    original = progress.ProgressDisplay

    class RecordingDisplay(original):  # type: ignore[misc, valid-type]
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            ray.kill(self.actor)
            self.actor = Recorder.remote()

        def __exit__(self, *exc) -> None:
            try:
                updates.extend(ray.get(self.actor.history.remote(), timeout=60))
            finally:
                super().__exit__(*exc)

    progress.ProgressDisplay = RecordingDisplay
    try:
        yield updates
    finally:
        progress.ProgressDisplay = original


def windows(updates: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per logging window, in step order (evaluation-only and final repeats dropped)."""
    seen: dict[int, dict[str, Any]] = {}
    for u in updates:
        if "step_time_s" in u["metrics"] and u["step"] not in seen:
            seen[u["step"]] = {"step": u["step"], **u["metrics"]}
    return [seen[s] for s in sorted(seen)]


def run_ours_recorded(cfg: RunConfig):
    """run_training(cfg) -> (RunSummary, the loop's metric windows)."""
    from e2e_dist.train.launcher import run_training

    with recording_progress() as updates:
        summary = run_training(cfg, quiet=True)
    return summary, windows(updates)


@contextlib.contextmanager
def ray_session(num_cpus: int | None = None) -> Iterator[None]:
    """The caller's Ray if this process has one; else a private local instance, shut down after."""
    import ray

    from e2e_dist.train.ray_env import LocalRayOptions, init_ray

    if ray.is_initialized():
        yield
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # Ray's workers import this checkout too, also where the package is not installed (a GPU
    # machine that got the working tree and a bundle of wheels): they inherit this from the raylet.
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *(p for p in paths if p != str(ROOT))])
    temp_dir = tempfile.mkdtemp(prefix="e2eb-", dir="/tmp")  # short: Ray's socket paths live under it
    init_ray(None, LocalRayOptions(num_cpus=num_cpus, temp_dir=temp_dir))
    try:
        yield
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


# ------------------------------------------------------------------- the sides without Ray
def _ddp_step_fn(cfg: RunConfig, rank: int):
    """Plain torch DDP: what a user writes without any toolkit."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    model = DDP(build_model(cfg.model, cfg.data))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.trainer.lr)
    batch = model.module.example_batch(cfg.trainer.micro_batch_size)

    def step() -> None:
        loss = model(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.trainer.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _deepspeed_step_fn(cfg: RunConfig, rank: int):
    """The engine our loop builds (same optimizer groups, schedule and DeepSpeed config), no Ray."""
    import deepspeed

    from e2e_dist.train.deepspeed_config import build_deepspeed_config, lr_lambda
    from e2e_dist.train.build import param_groups as _param_groups, skip_cpu_shm_comm as _skip_cpu_shm_comm

    os.environ["LOCAL_RANK"] = str(rank)
    _skip_cpu_shm_comm()
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.data)
    t = cfg.trainer
    opt = torch.optim.AdamW(_param_groups(model, t.weight_decay), lr=t.lr, betas=t.betas)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, dist_init_required=False,
                                      config=build_deepspeed_config(cfg, world_size=2, on_gpu=False))
    batch = model.example_batch(t.micro_batch_size)

    def step() -> None:
        loss = engine(batch)
        engine.backward(loss)
        engine.step()

    return step


SIDES = {"ddp": _ddp_step_fn, "deepspeed": _deepspeed_step_fn}


def side_worker(kind: str, rank: int, world: int, port: int, cfg_dict: dict, steps: int, warmup: int, nice: int,
                out) -> None:
    """One rank of a side without Ray, run like a 1-CPU Ray worker (1 thread, Ray's niceness)."""
    os.nice(nice)
    torch.set_num_threads(1)
    cfg = RunConfig.model_validate(cfg_dict)
    init_loopback_process_group("gloo", rank=rank, world_size=world, port=port)
    step = SIDES[kind](cfg, rank)
    times = []
    for i in range(warmup + steps):
        if i == warmup:
            dist.barrier()
        t0 = time.perf_counter()
        step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    dist.barrier()
    if rank == 0:
        out.put(times)
    dist.destroy_process_group()


def measure_side(kind: str, cfg: RunConfig, steps: int, warmup: int, nice: int = RAY_WORKER_NICENESS) -> list[float]:
    """Per-step seconds of rank 0 over `steps` steps after `warmup`, 2 spawned gloo processes."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # what Ray sets for a 1-CPU worker; spawned children inherit it
    try:
        procs = [ctx.Process(target=side_worker,
                             args=(kind, r, 2, port, cfg.model_dump(mode="json"), steps, warmup, nice, q))
                 for r in range(2)]
        for p in procs:
            p.start()
    finally:
        if old is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = old
    try:
        return q.get(timeout=1200)
    finally:
        for p in procs:
            p.join(timeout=60)


def window_means(step_times: list[float], window: int) -> list[float]:
    return [statistics.fmean(step_times[i:i + window]) for i in range(0, len(step_times) - window + 1, window)]


# --------------------------------------------------------------------------------------- the run
def overhead_config(args: argparse.Namespace, name: str) -> RunConfig:
    total = args.warmup + args.steps
    return load_run_config("tiny-text", [
        f"name={name}", f"storage.path={args.storage}", "tracking.wandb=false",
        f"trainer.max_steps={total}", f"trainer.log_every={args.window}", f"trainer.eval_every={total}",
        "trainer.eval_samples=16", f"trainer.ckpt_every={total}", f"deepspeed.zero_stage={args.zero}",
        "trainer.num_workers=2", *args.set,
    ])


def measure(args: argparse.Namespace) -> dict[str, Any]:
    stamp = f"{int(time.time())}-{uuid.uuid4().hex[:6]}"
    cfg0 = overhead_config(args, f"overhead-{stamp}-0")
    sides: dict[str, list[float]] = {"ddp": [], "deepspeed": [], "ours": []}
    rounds = []
    with ray_session():
        for r in range(args.rounds):
            got: dict[str, list[float]] = {}
            # rotate the order each round: no side always runs first (or right after Ray's start)
            for kind in (["ddp", "deepspeed", "ours"] * 2)[r % 3:][:3]:
                if kind == "ours":
                    _, wins = run_ours_recorded(overhead_config(args, f"overhead-{stamp}-{r}"))
                    got[kind] = [w["step_time_s"] for w in wins[args.warmup // args.window:]]
                else:
                    got[kind] = window_means(measure_side(kind, cfg0, args.steps, args.warmup), args.window)
            med = {k: statistics.median(v) for k, v in got.items()}
            rounds.append({**{f"{k}_windows_s": v for k, v in got.items()},
                           "ratio": med["ours"] / med["ddp"], "ratio_vs_deepspeed": med["ours"] / med["deepspeed"]})
            for k, v in got.items():
                sides[k].extend(v)
            print(f"round {r + 1}: DDP {med['ddp'] * 1e3:.1f}, raw DeepSpeed {med['deepspeed'] * 1e3:.1f}, ours "
                  f"{med['ours'] * 1e3:.1f} ms/step; ours/DDP {rounds[-1]['ratio']:.3f}x, ours/raw DeepSpeed "
                  f"{rounds[-1]['ratio_vs_deepspeed']:.3f}x", flush=True)
    med = {k: statistics.median(v) for k, v in sides.items()}
    mean = {k: statistics.fmean(v) for k, v in sides.items()}
    m = cfg0.model
    return {
        "model": f"{m.n_layer}x{m.d_model}", "micro_batch": cfg0.trainer.micro_batch_size, "seq_len": cfg0.data.seq_len,
        "zero_stage": args.zero, "workers": 2, "cores": os.cpu_count(), "steps": args.steps, "warmup": args.warmup,
        "window": args.window, "rounds": rounds, "median_s": med, "mean_s": mean,
        "ratio": med["ours"] / med["ddp"], "ratio_of_means": mean["ours"] / mean["ddp"],
        "ratio_vs_deepspeed": med["ours"] / med["deepspeed"], "deepspeed_vs_ddp": med["deepspeed"] / med["ddp"],
    }


def format_result(res: dict[str, Any]) -> str:
    med, mean = res["median_s"], res["mean_s"]
    return "\n".join([
        f"model {res['model']}, micro-batch {res['micro_batch']}x{res['seq_len']}, {res['workers']} workers, "
        f"{res['cores']} cores, {len(res['rounds'])} rounds x {res['steps']} steps per side (windows of "
        f"{res['window']}; median window, mean in brackets)",
        f"raw DDP (gloo)                   {med['ddp'] * 1e3:8.1f} ms/step  ({mean['ddp'] * 1e3:.1f})",
        f"raw DeepSpeed ZeRO-{res['zero_stage']} (no Ray)     {med['deepspeed'] * 1e3:8.1f} ms/step  "
        f"({mean['deepspeed'] * 1e3:.1f})",
        f"e2e-dist Ray Train + ZeRO-{res['zero_stage']}      {med['ours'] * 1e3:8.1f} ms/step  "
        f"({mean['ours'] * 1e3:.1f})",
        f"ratio ours / DDP                 {res['ratio']:8.3f}x  (goal <= 1.10x; ratio of means "
        f"{res['ratio_of_means']:.3f}x)",
        f"ratio ours / raw DeepSpeed       {res['ratio_vs_deepspeed']:8.3f}x  (Ray Train + data feeding + loop)",
        f"ratio raw DeepSpeed / DDP        {res['deepspeed_vs_ddp']:8.3f}x",
    ])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40, help="timed steps per side per round")
    ap.add_argument("--warmup", type=int, default=20, help="untimed steps first (a multiple of --window)")
    ap.add_argument("--window", type=int, default=10, help="steps per window (our loop's trainer.log_every)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--zero", type=int, default=2)
    ap.add_argument("--storage", default=None, help="run storage for our side (default: a temp dir, removed)")
    ap.add_argument("--set", action="append", default=[], help="extra config override for both sides, key=value")
    ap.add_argument("--json", help="also write the result as JSON here")
    args = ap.parse_args(argv)
    if args.warmup % args.window or args.steps % args.window:
        ap.error("--warmup and --steps must be multiples of --window")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    own_storage = args.storage is None
    args.storage = args.storage or tempfile.mkdtemp(prefix="e2e-bench-runs-")
    try:
        res = measure(args)
    finally:
        if own_storage:
            shutil.rmtree(args.storage, ignore_errors=True)
    print(format_result(res), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
