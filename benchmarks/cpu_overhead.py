"""Step time of our Ray Train + DeepSpeed path vs a raw torch.distributed DDP loop (gloo, 2 procs).

    .venv/bin/python benchmarks/cpu_overhead.py [--steps 40] [--zero 2]

Same model (the tiny-text ByteGPT), same micro-batch and sequence length, same optimizer, one
thread per worker on both sides, measured in one run. Our number is the mean step time over the
second half of the run (the first half warms up), as the loop itself reports it; it includes
Ray Data feeding real batches, which the DDP loop (random tokens already in memory) does not pay.
Prints the ratio; the goal is <= 1.10x.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from e2e_dist.config import load_run_config  # noqa: E402
from e2e_dist.models.registry import build_model  # noqa: E402
from e2e_dist.train.ray_env import free_port  # noqa: E402


def ddp_worker(rank: int, world: int, port: int, cfg_dict: dict, steps: int, warmup: int, out) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from e2e_dist.config import RunConfig

    torch.set_num_threads(1)
    cfg = RunConfig.model_validate(cfg_dict)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = DDP(build_model(cfg.model, cfg.data))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.trainer.lr)
    batch = model.module.example_batch(cfg.trainer.micro_batch_size)
    for i in range(warmup + steps):
        if i == warmup:
            dist.barrier()
            t0 = time.perf_counter()
        loss = model(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.trainer.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    dist.barrier()
    if rank == 0:
        out.put((time.perf_counter() - t0) / steps)
    dist.destroy_process_group()


def measure_ddp(cfg, steps: int, warmup: int) -> float:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=ddp_worker, args=(r, 2, port, cfg.model_dump(mode="json"), steps, warmup, q))
             for r in range(2)]
    for p in procs:
        p.start()
    result = q.get(timeout=600)
    for p in procs:
        p.join()
    return result


def measure_ours(cfg) -> float:
    from e2e_dist.train.launcher import run_training

    return run_training(cfg, quiet=True).metrics["step_time_s"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40, help="timed steps (ours runs 2x, first half warms up)")
    ap.add_argument("--zero", type=int, default=2)
    ap.add_argument("--storage", default=".cache/bench-runs")
    args = ap.parse_args(argv)
    s = args.steps
    cfg = load_run_config("tiny-text", [
        f"name=overhead-{int(time.time())}", f"storage.path={args.storage}", "tracking.wandb=false",
        f"trainer.max_steps={2 * s}", f"trainer.log_every={s}", f"trainer.eval_every={2 * s}", "trainer.eval_batches=1",
        f"trainer.ckpt_every={2 * s}", f"deepspeed.zero_stage={args.zero}", "trainer.num_workers=2",
    ])
    ddp = measure_ddp(cfg, s, warmup=s // 2)
    ours = measure_ours(cfg)
    print(f"model {cfg.model.n_layer}x{cfg.model.d_model}, micro-batch {cfg.trainer.micro_batch_size}x{cfg.data.seq_len}, "
          f"2 workers, {os.cpu_count()} cores")
    print(f"raw DDP (gloo)                  {ddp * 1000:8.1f} ms/step")
    print(f"e2e-dist Ray Train + ZeRO-{args.zero}     {ours * 1000:8.1f} ms/step")
    print(f"ratio                           {ours / ddp:8.3f}x  (goal <= 1.10x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
