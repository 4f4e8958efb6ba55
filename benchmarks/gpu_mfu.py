"""Throughput of the same model and batch several ways, in one run, on one device.

    python benchmarks/gpu_mfu.py --shape gpt2-small        # one H100/H200 (bf16)
    python benchmarks/gpu_mfu.py --shape tiny --steps 6    # CPU smoke run (the test suite does this)

Rows: plain PyTorch eager, plain torch.compile, raw DeepSpeed ZeRO-1/2/3 loops (no Ray; DeepSpeed as
usually configured, not compiled), and our e2e-dist path through Ray Train (1 worker) for ZeRO-2/3.
When our rows compile the model (`trainer.compile` via `--compile-ours`, on by default on GPU),
raw DeepSpeed ZeRO-2/3 rows with `engine.compile()` are added, so Ray Train's own overhead is
measured like for like.
Columns: tokens/s, MFU (FlopCounterMode count / known peak; achieved GFLOP/s where the peak is
unknown, e.g. CPU), peak memory, ratio to the compile baseline.

Every row uses our ByteGPT, the same micro-batch and sequence length, torch AdamW (fused on CUDA),
gradient clipping at trainer.grad_clip and the same precision (bf16 on GPU, fp32 on CPU).
On CPU every row runs like a 1-CPU Ray worker: one intra-op thread (with more threads than free
cores, OpenMP's spin waits make tiny models 10-200x slower on a busy machine) and, for the rows
in this process, the niceness Ray gives its workers (`--nice`, 15). Step times cover `--steps`
steps after `--warmup` steps, as the median over windows of `--window` steps (noise on a shared
machine only ever slows a window down); our rows run 2x`--steps` steps and take the median of the
loop's own logging windows (trainer.log_every = `--window`) over the second half.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from e2e_dist.config import RunConfig, load_run_config  # noqa: E402
from e2e_dist.models.registry import build_model  # noqa: E402
from e2e_dist.train.flops import mfu, peak_flops, train_flops_per_batch  # noqa: E402
from e2e_dist.train.ray_env import LOOPBACK, free_port  # noqa: E402
from e2e_dist.train.rendezvous import init_loopback_process_group  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_overhead import ray_session, run_ours_recorded  # noqa: E402  (shared by the benchmarks)
from mfu_report import format_table, goal_checks  # noqa: E402

SHAPES = {
    # GPT-2-small shape with our byte vocabulary (259): 12 layers, width 768, 12 heads, T=1024, batch 32.
    "gpt2-small": dict(n_layer=12, n_head=12, d_model=768, seq_len=1024, batch=32, max_files=400,
                       max_bytes=8_000_000),
    "tiny": dict(n_layer=2, n_head=2, d_model=64, seq_len=64, batch=4, max_files=40, max_bytes=400_000),
}

# Row keys (for --rows) and the names the table prints, in table order.
ROWS = {
    "eager": "plain eager",
    "compile": "plain torch.compile",
    "ds1": "raw DeepSpeed ZeRO-1",
    "ds2": "raw DeepSpeed ZeRO-2",
    "ds3": "raw DeepSpeed ZeRO-3",
    "ds2c": "raw DeepSpeed ZeRO-2 + compile",
    "ds3c": "raw DeepSpeed ZeRO-3 + compile",
    "ours2": "e2e-dist Ray Train ZeRO-2",
    "ours3": "e2e-dist Ray Train ZeRO-3",
}


@dataclass
class Row:
    key: str
    name: str
    step_s: float | None = None
    peak_mem_gib: float | None = None
    compiled: bool = False
    error: str | None = None


def run_config(shape: dict, zero: int, steps: int, window: int, name: str, storage: str,
               compile_: bool) -> RunConfig:
    """Our run config for one row: 1 worker, `steps` warm-up steps, then `steps` measured ones in
    logging windows of `window` steps (no evaluation or checkpoint before the last flush)."""
    return load_run_config("tiny-text", [
        f"name={name}", f"storage.path={storage}", "tracking.wandb=false",
        f"model.n_layer={shape['n_layer']}", f"model.n_head={shape['n_head']}", f"model.d_model={shape['d_model']}",
        f"model.max_seq_len={shape['seq_len']}", f"data.seq_len={shape['seq_len']}",
        f"data.max_files={shape['max_files']}", f"data.max_bytes={shape['max_bytes']}",
        f"trainer.micro_batch_size={shape['batch']}", f"trainer.max_steps={2 * steps}", "trainer.num_workers=1",
        f"trainer.log_every={window}", f"trainer.eval_every={2 * steps}", "trainer.eval_samples=16",
        f"trainer.ckpt_every={2 * steps}", "trainer.warmup_steps=1", f"deepspeed.zero_stage={zero}",
        f"trainer.compile={str(compile_).lower()}",
    ])


def timed(step_fn: Callable[[], None], steps: int, warmup: int, window: int, device: torch.device) -> float:
    """Seconds per step: the median over windows of `window` steps (synchronized on CUDA at window
    ends only) of `steps` steps after `warmup`. A window is only ever slowed by other load."""
    for _ in range(warmup):
        step_fn()
    means = []
    for _ in range(steps // window):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(window):
            step_fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        means.append((time.perf_counter() - t0) / window)
    return statistics.median(means)


def plain_row(cfg: RunConfig, device: torch.device, batch, steps: int, warmup: int, window: int,
              compiled: bool) -> float:
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.data).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    fwd = torch.compile(model) if compiled else model
    # bf16 autocast on GPU (what DeepSpeed's bf16 mode computes in); fp32 on CPU like our CPU default.
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    clip = cfg.trainer.grad_clip  # the same work as the DeepSpeed rows (gradient_clipping)

    def step() -> None:
        with amp:
            loss = fwd(batch)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return timed(step, steps, warmup, window, device)


@contextlib.contextmanager
def _env(**values: str) -> Iterator[None]:
    """Set environment variables for the duration only: Ray workers started later inherit the
    driver's environment, and a stray RANK/WORLD_SIZE/MASTER_PORT there would be wrong."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def one_rank_group(device: torch.device) -> Iterator[None]:
    """A private one-rank process group (nccl on GPU, gloo on CPU) on a free loopback port.

    Reuses an existing one-rank group (a test process may already hold one) and destroys only a
    group it created, so our Ray Train rows afterwards and the caller's own group are untouched.
    """
    import torch.distributed as dist

    port = free_port()
    env = dict(MASTER_ADDR=LOOPBACK, MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    with _env(**env):
        if dist.is_initialized():
            if dist.get_world_size() != 1:
                raise RuntimeError("gpu_mfu needs a one-rank process group; this process has a bigger one")
            yield
            return
        init_loopback_process_group("nccl" if device.type == "cuda" else "gloo", port=port)
        try:
            yield
        finally:
            destroy_default_group()


def destroy_default_group() -> None:
    """Destroy this process's default group, through DeepSpeed once it has used it: DeepSpeed
    caches groups it derived (a clone of the world group) that would outlive the group and break
    the next engine built in this process (a test process builds many)."""
    import torch.distributed as dist

    ds_comm = sys.modules.get("deepspeed.comm")
    if ds_comm is not None and ds_comm.is_initialized():
        ds_comm.destroy_process_group()
    else:
        dist.destroy_process_group()


def deepspeed_row(cfg: RunConfig, device: torch.device, batch, steps: int, warmup: int, window: int) -> float:
    """The plain DeepSpeed loop a user would write: our AdamW handed to `deepspeed.initialize`."""
    import deepspeed

    from e2e_dist.train.deepspeed_config import build_deepspeed_config
    from e2e_dist.train.build import skip_cpu_shm_comm as _skip_cpu_shm_comm

    if device.type != "cuda":
        _skip_cpu_shm_comm()  # what our loop does on CPU: plain gloo collectives, no JIT build
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.data).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    ds = build_deepspeed_config(cfg, world_size=1, on_gpu=device.type == "cuda")
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds, dist_init_required=False)
    if cfg.trainer.compile:
        engine.compile()

    def step() -> None:
        loss = engine(batch)
        engine.backward(loss)
        engine.step()

    try:
        return timed(step, steps, warmup, window, device)
    finally:
        engine.destroy()


def ours_row(cfg: RunConfig, steps: int) -> tuple[float, float | None]:
    """Our whole path: run_training -> Ray Train TorchTrainer (1 worker) -> our loop. Its step time
    is the median of the loop's own logging windows after the first `steps` (warm-up) steps."""
    summary, wins = run_ours_recorded(cfg)
    measured = [w["step_time_s"] for w in wins if w["step"] > steps]
    return statistics.median(measured), summary.metrics.get("peak_mem_gb")


@contextlib.contextmanager
def niceness(nice: int) -> Iterator[None]:
    """Run this thread at `nice` for the duration (Linux niceness is per thread).

    Ray runs every worker process at niceness 15 (its `worker_niceness`). On a CPU machine shared
    with other jobs, rows run in this process at 0 would get a larger share of the cores than our
    rows' Ray worker; matching the niceness compares the training paths, not the scheduler.
    """
    if not nice:
        yield
        return
    old = os.getpriority(os.PRIO_PROCESS, 0)
    os.setpriority(os.PRIO_PROCESS, 0, old + nice)
    try:
        yield
    finally:
        try:
            os.setpriority(os.PRIO_PROCESS, 0, old)
        except PermissionError:  # lowering niceness needs root: say so, keep going
            print(f"note: could not restore niceness {old} (not root); later rows run at {old + nice}")


def in_process_rows(keys, base, cfg, device, batch, args, run_row) -> None:
    """The rows that run in this process: plain eager/compile, then raw DeepSpeed on a private group."""
    for key, compiled in (("eager", False), ("compile", True)):
        if key in keys:
            run_row(key, lambda c=compiled: (plain_row(base, device, batch, args.steps, args.warmup, args.window,
                                                       c), None), compiled)
    raw = [(k, int(k[2]), k.endswith("c")) for k in ("ds1", "ds2", "ds3", "ds2c", "ds3c") if k in keys]
    if raw:
        with one_rank_group(device):
            for key, z, compiled in raw:
                run_row(key, lambda z=z, c=compiled: (deepspeed_row(cfg(z, c), device, batch, args.steps,
                                                                    args.warmup, args.window), None), compiled)


def _one_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[-1] if lines else ''}"[:300]


def measure(args: argparse.Namespace) -> dict:
    """Run the selected rows; returns the table as a JSON-able dict."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(0)
    compile_ours = {"on": True, "off": False, "auto": device.type == "cuda"}[args.compile_ours]
    keys = [k for k in ROWS if k in args.rows]
    if not compile_ours:
        keys = [k for k in keys if k not in ("ds2c", "ds3c")]
    shape = SHAPES[args.shape]
    storage = args.storage or tempfile.mkdtemp(prefix="e2e-bench-runs-")
    stamp = f"{int(time.time())}-{uuid.uuid4().hex[:6]}"
    cfg = lambda z, compile_=False, tag="raw": run_config(  # noqa: E731
        shape, z, args.steps, args.window, f"bench-{stamp}-{tag}-z{z}", storage, compile_)
    base = cfg(2)

    model = build_model(base.model, base.data).to(device)
    batch = model.example_batch(shape["batch"], device)
    flops = train_flops_per_batch(model, batch)
    del model
    peak = peak_flops(device)
    tokens = shape["batch"] * shape["seq_len"]

    rows: list[Row] = []

    def run_row(key: str, fn: Callable[[], tuple[float, float | None]], compiled: bool = False) -> None:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        row = Row(key, ROWS[key], compiled=compiled)
        t0 = time.perf_counter()
        try:
            row.step_s, row.peak_mem_gib = fn()
            if row.peak_mem_gib is None and device.type == "cuda":
                row.peak_mem_gib = torch.cuda.max_memory_allocated() / 2**30
            print(f"  {row.name}: {tokens / row.step_s:,.0f} tokens/s ({time.perf_counter() - t0:.0f} s)", flush=True)
        except Exception as e:  # one broken row must not cost the others (one shot on a GPU machine)
            row.error = _one_line(e)
            print(f"  {row.name}: FAILED {row.error}", flush=True)
        rows.append(row)

    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    try:
        with niceness(args.nice if device.type == "cpu" else 0):
            in_process_rows(keys, base, cfg, device, batch, args, run_row)
        ours = [(k, int(k[4])) for k in ("ours2", "ours3") if k in keys]
        if ours:
            with ray_session():
                for key, z in ours:
                    run_row(key, lambda z=z: ours_row(cfg(z, compile_ours, "ours"), args.steps), compile_ours)
    finally:
        torch.set_num_threads(threads)
        if not args.storage:
            shutil.rmtree(storage, ignore_errors=True)

    by_key = {r.key: r for r in rows}
    compile_s = by_key["compile"].step_s if "compile" in by_key else None
    table = []
    for r in rows:
        ok = r.step_s is not None
        table.append({**asdict(r),
                      "tokens_per_s": tokens / r.step_s if ok else None,
                      "mfu": mfu(flops, r.step_s, peak) if ok else None,
                      "achieved_gflops": flops / r.step_s / 1e9 if ok else None,
                      "ratio_to_compile": compile_s / r.step_s if ok and compile_s else None})
    dev_name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    return {"device": dev_name, "shape_name": args.shape, "shape": shape, "flops_per_step": flops,
            "tokens_per_step": tokens, "threads": args.threads if device.type == "cpu" else None,
            "nice": args.nice if device.type == "cpu" else None,
            "compile_ours": compile_ours, "steps": args.steps, "warmup": args.warmup, "window": args.window,
            "rows": table,
            "checks": goal_checks(by_key, compile_s, compile_ours)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="gpt2-small" if torch.cuda.is_available() else "tiny")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per row (ours: 2x, first half warms up)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first (rows in this process)")
    ap.add_argument("--window", type=int, default=5, help="steps per timing window; a row's time is the median "
                    "window (ours: the loop's logging interval); must divide --steps")
    ap.add_argument("--compile-ours", choices=["auto", "on", "off"], default="auto",
                    help="trainer.compile in our rows (auto: on for GPU, off for CPU)")
    ap.add_argument("--rows", default=",".join(ROWS),
                    help=f"comma-separated subset of: {', '.join(ROWS)}")
    ap.add_argument("--threads", type=int, default=1, help="CPU only: intra-op threads for every row")
    ap.add_argument("--nice", type=int, default=15,
                    help="CPU only: niceness added for the in-process rows (15 = what Ray gives its workers; 0 = none)")
    ap.add_argument("--storage", default=None, help="run storage for our rows (default: a temp dir, removed)")
    ap.add_argument("--json", help="also write the table as JSON here")
    args = ap.parse_args(argv)
    if args.window < 1 or args.steps % args.window:
        ap.error(f"--window {args.window} must divide --steps {args.steps}")
    args.rows = [k.strip() for k in args.rows.split(",") if k.strip()]
    unknown = [k for k in args.rows if k not in ROWS]
    if unknown:
        ap.error(f"--rows: unknown {', '.join(unknown)} (known: {', '.join(ROWS)})")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    res = measure(args)
    print("\n" + format_table(res), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 1 if any(r["error"] for r in res["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
