"""Checkpoint upload throughput to a local S3 endpoint: our path vs a raw boto3 multipart upload.

    .venv/bin/python benchmarks/s3_upload.py [--size-mb 320] [--rounds 5] [--endpoint http://127.0.0.1:PORT]

Uploads a checkpoint-like directory (a few large shards + small files, random bytes) three ways,
rotating the order each round after one warm-up run each, and deletes the objects between runs:

- raw:     boto3's transfer manager (multipart, 10 threads) uploading the same files, nothing else;
- upload:  `e2e_dist.storage.upload_dir` (the same transfer manager + sha256 of every file);
- commit:  the whole commit protocol for one rank (`make_upload_fn`: upload, part file, manifest, prune).

Prints median seconds and MB/s per way and the throughput ratios vs raw (goal: >= 0.8x). Without
--endpoint it starts moto's server in a subprocess on 127.0.0.1 (its own process, so the server
does not compete with the uploader for this interpreter's GIL).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto() -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            urllib.request.urlopen(f"{url}/moto-api/", timeout=1)
            return proc, url
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("moto server did not start")


def make_checkpoint_dir(root: Path, size_mb: int) -> int:
    """Shards like a 2-rank ZeRO checkpoint: model states (20%), two optimizer shards (40% each), small files."""
    shards = {"ds/mp_rank_00_model_states.pt": 0.2, "ds/zero_pp_rank_0_mp_rank_00_optim_states.pt": 0.4,
              "ds/zero_pp_rank_1_mp_rank_00_optim_states.pt": 0.4}
    total = 0
    for rel, frac in shards.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        n = int(size_mb * frac) << 20
        with open(p, "wb") as f:
            for _ in range(n >> 20):
                f.write(os.urandom(1 << 20))
        total += n
    (root / "latest").write_text("ds")
    (root / "zero_to_fp32.py").write_bytes(os.urandom(38_000))
    return total + 2 + 38_000


def raw_boto3(client, local: Path, bucket: str, prefix: str) -> None:
    from boto3.s3.transfer import TransferConfig, create_transfer_manager

    files = sorted(p for p in local.rglob("*") if p.is_file())
    with create_transfer_manager(client, TransferConfig()) as tm:
        futures = [tm.upload(str(p), bucket, f"{prefix}/{p.relative_to(local).as_posix()}") for p in files]
        for f in futures:
            f.result()


def empty_bucket(client, bucket: str) -> None:
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=bucket, Delete={"Objects": keys})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, default=320)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--endpoint", default=None, help="an S3 endpoint to use instead of starting moto")
    args = ap.parse_args()

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    proc, url = (None, args.endpoint) if args.endpoint else start_moto()
    try:
        import ray.train  # imported up front so the commit timing does not include it

        from e2e_dist import storage
        from e2e_dist.checkpoint import checkpoint_dir_name, make_upload_fn
        from e2e_dist.config import StorageConfig

        cfg = StorageConfig(path="s3://bench-ckpt", endpoint_url=url)
        client = storage.boto3_client(cfg)
        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        client.create_bucket(Bucket=bucket)
        with tempfile.TemporaryDirectory(prefix="e2e-bench-") as tmp:
            local = Path(tmp) / "ckpt"
            nbytes = make_checkpoint_dir(local, args.size_mb)

            def run_commit(i: int) -> None:
                fn = make_upload_fn(run_uri=f"s3://{bucket}/commit{i}", storage_cfg=cfg, rank=0, world_size=1,
                                    step=i, meta={}, keep_last=1, save_id="bench")
                fn(ray.train.Checkpoint.from_directory(str(local)), checkpoint_dir_name(i))

            ways = {
                "raw": lambda i: raw_boto3(client, local, bucket, f"raw{i}"),
                "upload": lambda i: storage.upload_dir(local, f"s3://{bucket}/upload{i}", cfg),
                "commit": run_commit,
            }
            for name in ways:  # warm-up: connections, imports, moto's first-request costs
                ways[name](0)
                empty_bucket(client, bucket)
            times: dict[str, list[float]] = {k: [] for k in ways}
            for r in range(args.rounds):
                order = list(ways)[r % 3:] + list(ways)[:r % 3]  # rotate: no way always goes first
                for name in order:
                    t0 = time.perf_counter()
                    ways[name](r + 1)
                    times[name].append(time.perf_counter() - t0)
                    empty_bucket(client, bucket)
        med = {k: statistics.median(v) for k, v in times.items()}
        mb = nbytes / 1e6
        print(f"checkpoint: {mb:.0f} MB in 5 files, {args.rounds} rounds, endpoint {url}"
              f"{' (moto, subprocess)' if proc else ''}")
        print(f"{'way':8} {'median s':>9} {'MB/s':>8} {'vs raw':>7}   all runs (s)")
        for k in ways:
            print(f"{k:8} {med[k]:9.2f} {mb / med[k]:8.1f} {med['raw'] / med[k]:6.2f}x   "
                  + " ".join(f"{t:.2f}" for t in times[k]))
        print(json.dumps({"bytes": nbytes, "rounds": args.rounds, "median_s": med,
                          "ratio_upload_vs_raw": med["raw"] / med["upload"],
                          "ratio_commit_vs_raw": med["raw"] / med["commit"]}))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)


if __name__ == "__main__":
    main()
