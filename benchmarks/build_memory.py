"""Peak memory per rank while building the training engine, full-model build vs ZeRO-3 `zero.Init`.

    .venv/bin/python benchmarks/build_memory.py [--d-model 1024] [--layers 20] [--ranks 2]

Spawns `--ranks` CPU processes (gloo on 127.0.0.1), each builds exactly what `train/build.py`
builds for a GPT of the given shape at ZeRO-3 (d 1024 x 20 layers: ~252M parameters, 1.0 GB of
fp32 weights), once the way the trainer used to (the whole model on every rank, then DeepSpeed
partitions it) and once through `build_model_for` (partitioned as it is built). Each phase's
peak is the process's high-water RSS (VmHWM, reset through /proc/self/clear_refs before it)
minus its RSS before the phase, as a multiple of the full fp32 model's bytes:

    model   building the module (and its weight init)
    engine  deepspeed.initialize on top: ZeRO-3's flat fp32 partitions and buffers

Prints one JSON line per rank and way.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import sys
import time
from pathlib import Path

import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> int:
    """Reset the high-water mark to the current RSS (Linux: clear_refs 5); returns RSS in KiB."""
    Path("/proc/self/clear_refs").write_text("5")
    return _rss_kib("VmRSS")


def phase_peak_bytes(fn):
    """(result of fn(), peak RSS growth while it ran, bytes)."""
    import gc

    gc.collect()
    before = _reset_peak()
    result = fn()
    return result, (_rss_kib("VmHWM") - before) * 1024


def cfg_for(d_model: int, layers: int):
    from e2e_dist.config import RunConfig

    return RunConfig.model_validate({
        "name": "build-memory", "storage": {"path": "/tmp/unused-build-memory"},
        "model": {"kind": "gpt", "n_layer": layers, "n_head": max(1, d_model // 64), "d_model": d_model,
                  "max_seq_len": 256},
        "data": {"seq_len": 256},
        "trainer": {"micro_batch_size": 1, "max_steps": 10, "warmup_steps": 1},
        "deepspeed": {"zero_stage": 3},
    })


def measure_rank(rank: int, world: int, port: int, d_model: int, layers: int, way: str) -> dict:
    """Build the engine one `way` ('full': the whole model first; 'zero_init': build_model_for)."""
    import deepspeed
    import torch

    from e2e_dist.models.registry import build_model
    from e2e_dist.train.build import (
        build_model_for,
        freed_memory_returned,
        skip_cpu_shm_comm,
    )
    from e2e_dist.train.deepspeed_config import build_deepspeed_config
    from e2e_dist.train.flops import shape_counts
    from e2e_dist.train.rendezvous import init_loopback_process_group

    os.environ["LOCAL_RANK"] = "0"
    torch.set_num_threads(1)
    init_loopback_process_group("gloo", rank=rank, world_size=world, port=port)
    skip_cpu_shm_comm()
    cfg = cfg_for(d_model, layers)
    n = shape_counts(cfg.model, cfg.data, 1).n_params
    ds_config = build_deepspeed_config(cfg, world_size=world, on_gpu=False, n_params=n)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    # as build_engine does at ZeRO-3 (the old way had no such context)
    with freed_memory_returned() if way == "zero_init" else contextlib.nullcontext():
        if way == "full":
            model, model_peak = phase_peak_bytes(lambda: build_model(cfg.model, cfg.data))
        else:
            model, model_peak = phase_peak_bytes(lambda: build_model_for(cfg, ds_config, torch.device("cpu")))
        t_model = time.perf_counter() - t0
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        _, engine_peak = phase_peak_bytes(
            lambda: deepspeed.initialize(model=model, optimizer=opt, config=ds_config, dist_init_required=False))
    full_bytes = 4 * n
    return {"rank": rank, "world": world, "way": way, "n_params": n, "model_build_s": round(t_model, 2),
            "build_s": round(time.perf_counter() - t0, 2),
            "model_peak_x_full": round(model_peak / full_bytes, 3), "engine_peak_x_full": round(engine_peak / full_bytes, 3),
            "total_peak_x_full": round((model_peak + engine_peak) / full_bytes, 3)}


def _worker(rank: int, world: int, port: int, d_model: int, layers: int, way: str, out_dir: str) -> None:
    result = measure_rank(rank, world, port, d_model, layers, way)
    Path(out_dir, f"{way}-{rank}.json").write_text(json.dumps(result))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(way: str, *, ranks: int, d_model: int, layers: int, out_dir: str) -> list[dict]:
    """Spawn `ranks` processes that build the engine one `way`; their results."""
    mp.spawn(_worker, args=(ranks, _free_port(), d_model, layers, way, out_dir), nprocs=ranks, join=True)
    return [json.loads(Path(out_dir, f"{way}-{r}.json").read_text()) for r in range(ranks)]


def main() -> None:
    import tempfile

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d-model", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=20)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--ways", default="full,zero_init")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as out:
        for way in args.ways.split(","):
            for row in measure(way, ranks=args.ranks, d_model=args.d_model, layers=args.layers, out_dir=out):
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
