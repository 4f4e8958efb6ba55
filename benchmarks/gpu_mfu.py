"""Throughput of the same model and batch five ways, in one run, on one device.

    python benchmarks/gpu_mfu.py --shape gpt2-small        # one H100/H200 (bf16)
    python benchmarks/gpu_mfu.py --shape tiny --steps 6    # CPU smoke run (the test suite does this)

Rows: plain PyTorch eager, plain torch.compile, raw DeepSpeed ZeRO-1/2/3 loops (no Ray), and our
e2e-dist path through Ray Train for ZeRO-2/3. Columns: tokens/s, MFU (FlopCounterMode count /
known peak), peak memory, ratio to the compile baseline. Every row uses our ByteGPT, the same
micro-batch and sequence length, torch AdamW (fused on CUDA) and the same precision.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from e2e_dist.config import load_run_config  # noqa: E402
from e2e_dist.models.registry import build_model  # noqa: E402
from e2e_dist.train.flops import mfu, peak_flops, train_flops_per_batch  # noqa: E402

SHAPES = {
    # GPT-2-small shape with our byte vocabulary (259): 12 layers, width 768, 12 heads, T=1024, batch 32.
    "gpt2-small": dict(n_layer=12, n_head=12, d_model=768, seq_len=1024, batch=32),
    "tiny": dict(n_layer=2, n_head=2, d_model=64, seq_len=64, batch=4),
}


def run_config(shape: dict, zero: int, steps: int, name: str, storage: str, compile_: bool):
    return load_run_config("tiny-text", [
        f"name={name}", f"storage.path={storage}", "tracking.wandb=false",
        f"model.n_layer={shape['n_layer']}", f"model.n_head={shape['n_head']}", f"model.d_model={shape['d_model']}",
        f"model.max_seq_len={shape['seq_len']}", f"data.seq_len={shape['seq_len']}",
        f"trainer.micro_batch_size={shape['batch']}", f"trainer.max_steps={steps}", "trainer.num_workers=1",
        f"trainer.log_every={steps // 2}", f"trainer.eval_every={steps}", "trainer.eval_batches=1",
        f"trainer.ckpt_every={steps}", f"deepspeed.zero_stage={zero}", f"trainer.compile={str(compile_).lower()}",
        "data.max_files=200", "data.max_bytes=2000000",
    ])


def timed(step_fn, steps: int, warmup: int, device) -> float:
    """Seconds per step after `warmup` steps (synchronized)."""
    for _ in range(warmup):
        step_fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step_fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def plain_row(cfg, device, batch, steps, warmup, compiled: bool) -> float:
    model = build_model(cfg.model, cfg.data).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    fwd = torch.compile(model) if compiled else model
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step():
        with amp:
            loss = fwd(batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return timed(step, steps, warmup, device)


def deepspeed_row(cfg, device, batch, steps, warmup) -> float:
    import deepspeed

    from e2e_dist.train.deepspeed_config import build_deepspeed_config

    model = build_model(cfg.model, cfg.data).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    ds = build_deepspeed_config(cfg, world_size=1, on_gpu=device.type == "cuda")
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
    if cfg.trainer.compile:
        engine.compile()

    def step():
        loss = engine(batch)
        engine.backward(loss)
        engine.step()

    t = timed(step, steps, warmup, device)
    engine.destroy()
    return t


def ours_row(cfg) -> tuple[float, float | None]:
    from e2e_dist.train.launcher import run_training

    summary = run_training(cfg, quiet=True)
    return summary.metrics["step_time_s"], summary.metrics.get("peak_mem_gb")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="gpt2-small" if torch.cuda.is_available() else "tiny")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per row (ours: 2x, half warmup)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--compile-ours", action="store_true", help="torch.compile under DeepSpeed in our rows")
    ap.add_argument("--storage", default=".cache/bench-runs")
    ap.add_argument("--json", help="also write the table as JSON here")
    args = ap.parse_args(argv)

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(0)
        torch.backends.cuda.matmul.allow_tf32 = True
    shape = SHAPES[args.shape]
    stamp = str(int(time.time()))
    base = run_config(shape, 2, 2 * args.steps, f"bench-{stamp}", args.storage, False)
    model = build_model(base.model, base.data).to(device)
    batch = model.example_batch(shape["batch"], device)
    flops = train_flops_per_batch(model, batch)
    del model
    peak = peak_flops(device)
    tokens = shape["batch"] * shape["seq_len"]

    rows: list[tuple[str, float, float | None]] = []

    def add(name: str, step_s: float, mem: float | None = None) -> None:
        if mem is None and device.type == "cuda":
            mem = torch.cuda.max_memory_allocated() / 2**30
        rows.append((name, step_s, mem))
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        print(f"  {name}: {tokens / step_s:,.0f} tokens/s", flush=True)

    add("plain eager", plain_row(base, device, batch, args.steps, args.warmup, compiled=False))
    add("plain torch.compile", plain_row(base, device, batch, args.steps, args.warmup, compiled=True))
    for z in (1, 2, 3):
        cfg = run_config(shape, z, 2 * args.steps, f"bench-{stamp}", args.storage, args.compile_ours)
        add(f"raw DeepSpeed ZeRO-{z}", deepspeed_row(cfg, device, batch, args.steps, args.warmup))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # our path's workers bring their own
    for z in (2, 3):
        cfg = run_config(shape, z, 2 * args.steps, f"bench-{stamp}-ours-z{z}", args.storage, args.compile_ours)
        step_s, mem = ours_row(cfg)
        add(f"e2e-dist Ray Train ZeRO-{z}", step_s, mem)

    compile_s = rows[1][1]
    dev_name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"\n{dev_name} | shape {args.shape} {shape} | {flops / 1e9:.2f} GFLOP per step (FlopCounterMode)")
    print(f"| row | tokens/s | MFU | peak mem GiB | vs compile |\n|---|---:|---:|---:|---:|")
    table = []
    for name, step_s, mem in rows:
        m = mfu(flops, step_s, peak)
        table.append({"row": name, "tokens_per_s": tokens / step_s, "mfu": m, "peak_mem_gib": mem,
                      "ratio_to_compile": compile_s / step_s})
        print(f"| {name} | {tokens / step_s:,.0f} | {f'{m:.1%}' if m is not None else f'{flops / step_s / 1e9:.1f} GFLOP/s'} "
              f"| {f'{mem:.1f}' if mem is not None else '-'} | {compile_s / step_s:.2f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": dev_name, "shape": shape, "rows": table}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
