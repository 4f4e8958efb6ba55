"""Training stall per checkpoint, sync vs async upload, as a fraction of the checkpoint interval.

    .venv/bin/python benchmarks/ckpt_stall.py [--ckpt-every 20] [--checkpoints 3] [--local]

Three runs of the same config through `run_training` (2 CPU workers, DeepSpeed ZeRO-2), in one
invocation: checkpoints with synchronous upload, checkpoints with asynchronous upload
(`trainer.async_checkpoint`: training goes on while the previous checkpoint uploads, at most one in
flight), and a control run without mid-run checkpoints. Storage is a local S3 endpoint (moto's
server in a subprocess, spoken to over HTTP like AWS) unless --local (a local directory).

Each run takes `--checkpoints` mid-run checkpoints, one at the start of each measured interval of
`--ckpt-every` steps (the first interval warms up and is not measured; the final checkpoint, always
synchronous, comes after the last measured step). The numbers come from the training loop's own
per-window metrics (two logging windows per interval; see cpu_overhead.run_ours_recorded):

- stall: `ckpt_stall_s`, the seconds the training thread stood still in the checkpoint (waiting for
  the previous upload, DeepSpeed's local save, the report; with sync upload the upload itself),
  over the clean interval (2 x the checkpoint-free second half of the same interval).
  Goal for async: <= 5%.
- extra wall time: (first half - second half) / clean interval. It also counts steps slowed by an
  upload running beside training (on 2 cores every CPU cycle of the upload and of the S3 server is
  taken from training); the control run shows what noise alone gives.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cpu_overhead import ray_session, run_ours_recorded  # noqa: E402
from e2e_dist.config import RunConfig, load_run_config  # noqa: E402

MODES = ("sync", "async", "none")


def stall_config(args: argparse.Namespace, storage: str, endpoint: str | None, name: str, mode: str) -> RunConfig:
    every = args.ckpt_every
    total = (args.checkpoints + 1) * every
    return load_run_config("tiny-text", [
        f"name={name}", f"storage.path={storage}", "tracking.wandb=false",
        *([f"storage.endpoint_url={endpoint}"] if endpoint else []),
        f"model.n_layer={args.n_layer}", f"model.d_model={args.d_model}", "model.n_head=4",
        f"trainer.micro_batch_size={args.batch}", f"trainer.max_steps={total}",
        f"trainer.log_every={every // 2}", f"trainer.eval_every={total}", "trainer.eval_samples=16",
        f"trainer.ckpt_every={every if mode != 'none' else total}", "trainer.keep_last=2",
        f"trainer.async_checkpoint={'true' if mode == 'async' else 'false'}", "trainer.num_workers=2",
        "deepspeed.zero_stage=2", *args.set,
    ])


def intervals(wins: list[dict[str, Any]], every: int, n: int) -> list[dict[str, float]]:
    """Per measured interval i (steps i*every .. (i+1)*every, checkpoint at its start).

    first_s: wall seconds of its first half (holds the checkpoint's stall and, with async upload,
    most of the upload running beside training); second_s: its second half. The clean interval is
    estimated as 2 x second_s: the same run, seconds later, so a shared machine's slow load swings
    mostly cancel (the run without checkpoints shows what is left of them).
    """
    by_end = {w["step"]: w for w in wins}
    half = every // 2
    out = []
    for i in range(1, n + 1):
        a, b = by_end[i * every + half], by_end[(i + 1) * every]
        first, second = a["step_time_s"] * half, b["step_time_s"] * half
        out.append({"first_s": first, "second_s": second, "clean_interval_s": 2 * second,
                    # the checkpoint at step i*every is reported by the first window after it
                    "stall_s": float(a.get("ckpt_stall_s", 0.0))})
    return out


def checkpoint_mb(cfg: RunConfig) -> float | None:
    """Size of the run's newest committed checkpoint (all ranks), from its manifest."""
    from e2e_dist import checkpoint as ckpt

    found, _ = ckpt.find_latest_committed(cfg.run_uri, cfg.storage)
    return sum(f["size"] for f in found.manifest.get("files", [])) / 1e6 if found else None


def measure(args: argparse.Namespace) -> dict[str, Any]:
    stamp = f"{int(time.time())}-{uuid.uuid4().hex[:6]}"
    moto = None
    tmp = tempfile.mkdtemp(prefix="e2e-stall-")
    try:
        if args.local:
            storage, endpoint = f"{tmp}/runs", None
        else:
            from s3_upload import start_moto

            for k, v in {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                         "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1",
                         "AWS_EC2_METADATA_DISABLED": "true"}.items():
                os.environ.setdefault(k, v)  # fake keys: this endpoint is ours; never a real account
            moto, endpoint = start_moto()
            os.environ["AWS_ENDPOINT_URL"] = endpoint  # Ray workers started below inherit it
            import boto3

            bucket = f"stall-{uuid.uuid4().hex[:8]}"
            boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
            storage = f"s3://{bucket}/runs"
        per_mode: dict[str, Any] = {}
        with ray_session():
            for mode in MODES:
                cfg = stall_config(args, storage, endpoint, f"stall-{stamp}-{mode}", mode)
                _, wins = run_ours_recorded(cfg)
                per_mode[mode] = {"intervals": intervals(wins, args.ckpt_every, args.checkpoints),
                                  "checkpoint_mb": checkpoint_mb(cfg),
                                  "step_time_s": statistics.median(w["step_time_s"] for w in wins[2:])}
                iv = per_mode[mode]["intervals"]
                print(f"{mode:5}: half-intervals {[(round(x['first_s'], 2), round(x['second_s'], 2)) for x in iv]} s, "
                      f"stalls {[round(x['stall_s'], 2) for x in iv]} s", flush=True)
    finally:
        if moto is not None:
            moto.terminate()
            moto.wait(timeout=30)
        shutil.rmtree(tmp, ignore_errors=True)

    rows = []
    for mode in MODES:
        iv = per_mode[mode]["intervals"]
        med = lambda key: statistics.median(x[key] for x in iv)  # noqa: E731
        rows.append({"mode": mode, "checkpoint_mb": per_mode[mode]["checkpoint_mb"],
                     "clean_interval_s": med("clean_interval_s"),
                     "stall_s": med("stall_s") if mode != "none" else None,
                     "stall_fraction": statistics.median(x["stall_s"] / x["clean_interval_s"] for x in iv)
                     if mode != "none" else None,
                     "extra_fraction": statistics.median((x["first_s"] - x["second_s"]) / x["clean_interval_s"]
                                                         for x in iv),
                     "intervals": iv})
    return {"storage": "local disk" if args.local else "S3 (moto server, subprocess, HTTP on 127.0.0.1)",
            "model": f"{args.n_layer}x{args.d_model}", "batch": args.batch, "ckpt_every": args.ckpt_every,
            "checkpoints": args.checkpoints, "cores": os.cpu_count(), "rows": rows}


def format_result(res: dict[str, Any]) -> str:
    mb = next((r["checkpoint_mb"] for r in res["rows"] if r["checkpoint_mb"]), None)
    size = f"{mb:.1f} MB" if mb is not None else "?"
    out = [f"model {res['model']}, batch {res['batch']}x128, 2 workers, ZeRO-2, storage {res['storage']}; "
           f"checkpoint {size} every {res['ckpt_every']} steps, {res['checkpoints']} measured per run (medians)",
           "| upload | clean interval s | stall per checkpoint s | stall / interval | extra wall time / interval |",
           "|---|---:|---:|---:|---:|"]
    for r in res["rows"]:
        name = "no checkpoint (control)" if r["mode"] == "none" else r["mode"]
        stall = f"{r['stall_s']:.2f}" if r["stall_s"] is not None else "-"
        frac = f"{r['stall_fraction']:.1%}" if r["stall_fraction"] is not None else "-"
        out.append(f"| {name} | {r['clean_interval_s']:.2f} | {stall} | {frac} | {r['extra_fraction']:+.1%} |")
    a = next(r for r in res["rows"] if r["mode"] == "async")
    out.append(f"\nasync stall per checkpoint: {a['stall_fraction']:.1%} of the interval (goal <= 5%: "
               f"{'ok' if a['stall_fraction'] <= 0.05 else 'below goal'})")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt-every", type=int, default=20, help="steps per checkpoint interval (even)")
    ap.add_argument("--checkpoints", type=int, default=3, help="measured mid-run checkpoints per run")
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--local", action="store_true", help="local disk instead of the moto S3 endpoint")
    ap.add_argument("--set", action="append", default=[], help="extra config override, key=value")
    ap.add_argument("--json", help="also write the result as JSON here")
    args = ap.parse_args(argv)
    if args.ckpt_every % 2:
        ap.error("--ckpt-every must be even (two logging windows per interval)")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    res = measure(args)
    print(format_result(res), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
