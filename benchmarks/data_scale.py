"""The data path at scale, measured where this machine allows (BENCHMARKS.md section 13).

    python benchmarks/data_scale.py reads     # samples and bytes each rank reads per epoch, 1/2/4 workers
    python benchmarks/data_scale.py resume    # time to the first batch, resumed at 10% vs 90% of an epoch
    python benchmarks/data_scale.py shuffle   # distinct shards per global batch of 64, 64-shard corpus
    python benchmarks/data_scale.py plan      # planning a synthetic listing of 100,000 Parquet shards
    python benchmarks/data_scale.py images    # image-parquet on moto: what a rank's pipeline delivers vs a step

Ranks are simulated in this process (a BatchStream per rank, each with its own Ray Data read
tasks, as in a Train worker): what they read is what a W-worker run's ranks read.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def start_ray():
    from e2e_dist.train.ray_env import LocalRayOptions, init_ray

    init_ray(None, LocalRayOptions(num_cpus=2, temp_dir=tempfile.mkdtemp(prefix="e2eb-", dir="/tmp")))


def stdlib_docs(mb: float) -> list[str]:
    """This Python's standard-library sources as documents, `mb` MiB of them (numbered copies of the
    library when it holds less)."""
    from e2e_dist.data.common import seeded_order
    from e2e_dist.data.text import stdlib_files

    sources = [open(f.uri, encoding="utf-8", errors="replace").read() for f in seeded_order(stdlib_files(), seed=0)]
    docs, total, copy = [], 0, 0
    while True:
        for src in sources:
            docs.append(f"# copy {copy}\n{src}" if copy else src)
            total += len(docs[-1].encode())
            if total >= mb * 2**20:
                return docs
        copy += 1


def write_shards(root: str, docs: list[str], shards: int, form: str, row_group: int = 64) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(root, exist_ok=True)
    for s in range(shards):
        part = docs[s::shards]
        if form == "parquet":
            pq.write_table(pa.table({"text": part}), f"{root}/part-{s:03d}.parquet", row_group_size=row_group)
        else:
            with open(f"{root}/part-{s:03d}.txt", "w") as f:
                f.write("\n".join(part))
    return root


def streams(split, world: int, batch: int, blocks: int = 64, **kw):
    import torch

    from e2e_dist.data.text import collate
    from e2e_dist.train.batches import BatchStream

    return [BatchStream(split, micro_batch=batch // world, grad_accum=1, collate=collate, device=torch.device("cpu"),
                        shuffle_blocks=blocks, rank=r, world=world, seed=0, prefetch=2, decode_tasks=2, **kw)
            for r in range(world)]


# ------------------------------------------------------------------------------------ reads
def cmd_reads(args) -> None:
    import shutil

    from e2e_dist.config import DataConfig
    from e2e_dist.data.registry import build_data

    node_cache = tempfile.mkdtemp(prefix="e2e-node-cache-")
    os.environ["E2E_DIST_NODE_CACHE"] = node_cache  # before Ray starts: its workers inherit it
    start_ray()
    docs = stdlib_docs(args.mb)
    tmp = tempfile.mkdtemp(prefix="e2e-reads-")
    print(f"corpus: {args.mb} MiB of stdlib sources in 32 shards (Parquet: row groups of {args.row_group} documents); seq_len 512, "
          f"global batch {args.batch}, 64 blocks per window; one epoch per world size, every rank on this one node "
          f"(data.node_cache_mb {args.node_cache_mb}: Parquet row groups a node decoded are shared by its ranks)")
    print(f"{'form':8} {'blocks':>6} {'W':>2} {'samples/rank':>13} {'of D/W':>7} {'MiB read/rank (max)':>20} {'of D/W':>7} "
          f"{'all ranks / D':>13}")
    for form in ("plain", "parquet"):
        path = write_shards(f"{tmp}/{form}", docs, 32, form, args.row_group)
        bundle = build_data(DataConfig(source="text", paths=[path], seq_len=512, val_fraction=0.02,
                                       index_cache=f"{tmp}/index", node_cache_mb=args.node_cache_mb))
        train, data_bytes = bundle.train, bundle.stats["train_bytes"]
        for world in (1, 2, 4):
            shutil.rmtree(node_cache, ignore_errors=True)  # every world size starts with a cold node
            ranks = streams(train, world, args.batch)
            for _ in range(train.n // args.batch):
                for s in ranks:
                    s.next()
            for s in ranks:
                s.close()
            samples = max(s.epoch_counters[0]["samples"] for s in ranks)
            nbytes = max(s.epoch_counters[0]["bytes"] for s in ranks)
            total = sum(s.epoch_counters[0]["bytes"] for s in ranks)
            print(f"{form:8} {train.blocks:>6} {world:>2} {samples:>13,} {samples / (train.n / world):>7.3f} "
                  f"{nbytes / 2**20:>20.2f} {nbytes / (data_bytes / world):>7.3f} {total / data_bytes:>13.3f}")


# ------------------------------------------------------------------------------------ resume
def cmd_resume(args) -> None:
    from e2e_dist.config import DataConfig
    from e2e_dist.data.registry import build_data

    start_ray()
    tmp = tempfile.mkdtemp(prefix="e2e-resume-")
    path = write_shards(f"{tmp}/parquet", stdlib_docs(args.mb), 32, "parquet")
    train = build_data(DataConfig(source="text", paths=[path], seq_len=512, index_cache=f"{tmp}/index")).train
    batches = train.n // args.batch
    times: dict[int, list[float]] = {10: [], 90: []}
    for _ in range(args.rounds):
        for pct in (10, 90):
            position = batches * pct // 100 * args.batch
            t0 = time.perf_counter()
            ranks = streams(train, 2, args.batch, args.blocks, samples=position)
            for s in ranks:
                s.next()
            times[pct].append(time.perf_counter() - t0)
            for s in ranks:
                s.close()
    t10, t90 = statistics.median(times[10]), statistics.median(times[90])
    print(f"{args.mb} MiB of Parquet text (train: {train.n:,} windows of 512 in {train.blocks} row groups, "
          f"{args.blocks} per window of the order), 2 ranks: first micro-batch after a resume at "
          f"10% {t10:.3f} s, at 90% {t90:.3f} s (medians of {args.rounds}); 90%/10% = {t90 / t10:.2f}")


# ------------------------------------------------------------------------------------ shuffle
def cmd_shuffle(args) -> None:
    import numpy as np

    from e2e_dist.config import DataConfig
    from e2e_dist.data import text
    from e2e_dist.data.common import FileItem
    from e2e_dist.data.order import EpochOrder, rank_share
    from e2e_dist.data.text_reader import BLOCK_STREAM_BYTES, block_starts

    rng = np.random.default_rng(0)
    files = [FileItem(uri=f"/c/shard-{i:02d}", key=f"shard-{i:02d}", size=int(rng.integers(1, 4)) << 20)
             for i in range(64)]
    cfg = DataConfig(source="text", paths=["/c"], seq_len=512)
    train, _ = text.plan_splits(files, cfg, "c")
    lengths = np.array([s.length for s in train.segments])
    eos = np.array([s.eos for s in train.segments])
    arrays = {"uri": np.arange(len(lengths)), "start": np.zeros(len(lengths), np.int64), "length": lengths, "eos": eos,
              "offset": np.concatenate([[0], np.cumsum(lengths + eos)[:-1]])}
    shard_of = np.searchsorted(arrays["offset"], np.arange(train.windows) * 512, side="right") - 1
    starts = block_starts(arrays, [s.uri for s in train.segments], {}, 512, train.windows)
    order = EpochOrder(starts, seed=0, epoch=0, window_blocks=64)
    new = [len(np.unique(shard_of[rank_share(order, start=0, batch=64, first=b, count=1, rank=0, world=1)]))
           for b in range(train.windows // 64)]
    # The stream before this change, simulated: 256 KiB chunks in stream order, windows permuted
    # inside each chunk, then a local shuffle buffer of 8 micro-batches of 8.
    per = BLOCK_STREAM_BYTES // 512
    seq = np.concatenate([c + rng.permutation(min(per, train.windows - c)) for c in range(0, train.windows, per)])
    buf, old_order = list(seq[:64]), []
    for w in seq[64:]:
        old_order.append(buf.pop(int(rng.integers(len(buf)))))
        buf.append(w)
    old = [len(np.unique(shard_of[old_order[i:i + 64]])) for i in range(0, len(old_order) - 63, 64)]
    print(f"64 shards of 1-3 MiB, {train.windows:,} windows of 512: distinct shards per global batch of 64 - "
          f"now min {min(new)} / median {statistics.median(new):.0f} / mean {np.mean(new):.1f}; "
          f"the old stream (simulated) min {min(old)} / median {statistics.median(old):.0f} / mean {np.mean(old):.1f}")


# ------------------------------------------------------------------------------------ plan
def cmd_plan(args) -> None:
    """A listing of N Parquet shards on s3:// (never contacted: the listing is given, the index is
    stored), planned exactly as `train` plans: index load, splits, blocks, the SampleSets."""
    import io
    import json
    import resource

    import pyarrow as pa
    import pyarrow.parquet as pq

    import ray.cloudpickle

    from e2e_dist.config import RunConfig
    from e2e_dist.data import index_store, text
    from e2e_dist.data.common import FileItem
    from e2e_dist.data.data_plan import describe
    from e2e_dist.data.order import EpochOrder, rank_share
    from e2e_dist.data.records import CHECKPOINT_EVERY, index_shards
    from e2e_dist.data.registry import DataBundle

    start_ray()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    n, mb = args.shards, args.shard_mb
    tmp = tempfile.mkdtemp(prefix="e2e-plan-")
    files = [FileItem(uri=f"s3://corpus/part-{i:06d}.parquet", key=f"part-{i:06d}.parquet", size=mb << 20,
                      mtime=1.7e9) for i in range(n)]
    length = int(mb * 0.9 * 2**20)  # stream bytes per shard; a checkpoint (row group) every ~1 MiB
    ck = [[k * CHECKPOINT_EVERY, k] for k in range(length // CHECKPOINT_EVERY)]
    cfg = RunConfig.model_validate({"model": {"kind": "gpt", "max_seq_len": 2048},
                                    "data": {"source": "text", "paths": ["s3://corpus/"], "seq_len": 2048,
                                             "index_cache": tmp},
                                    "trainer": {"num_workers": 64, "global_batch_size": 512, "micro_batch_size": 8}})
    uri = index_store.index_uri(tmp, "text", cfg.data.paths, {"column": "text", "every": CHECKPOINT_EVERY})
    entries = [json.dumps({"uri": f.uri, "length": length, "docs": 1000, "checkpoints": ck}) for f in files]
    buf = io.BytesIO()
    pq.write_table(pa.table({"uri": [f.uri for f in files], "size": [f.size for f in files],
                             "mtime": [f.mtime for f in files], "entry": entries}), buf, compression="zstd")
    with open(uri, "wb") as f:
        f.write(buf.getvalue())
    del entries, buf
    print(f"synthetic listing: {n:,} Parquet shards of {mb} MiB ({n * mb / 2**20:.2f} TiB), stored index "
          f"{os.path.getsize(uri) / 2**20:.1f} MiB")
    t0 = time.perf_counter()
    stats: dict = {}
    index = index_shards(files, cfg.data, None, stats=stats)
    t1 = time.perf_counter()
    items = text.as_stream_items(files, index)
    bundle: DataBundle = text.build_text_bundle(items, cfg.data, None, "s3://corpus/",
                                                records={u: e["checkpoints"] for u, e in index.items()},
                                                extra_stats=stats)
    t2 = time.perf_counter()
    for line in describe(bundle, cfg, seconds=t2 - t0):
        print("  " + line)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"driver: index load {t1 - t0:.1f} s, splits + blocks + sample sets {t2 - t1:.1f} s; peak RSS {rss:,.0f} MiB "
          f"(before planning {rss0:,.0f} MiB)")
    train = bundle.train
    t3 = time.perf_counter()
    order = EpochOrder(train.starts, seed=0, epoch=0, window_blocks=512)
    t4 = time.perf_counter()
    ids = rank_share(order, start=0, batch=512, first=0, count=64, rank=5, world=64)
    t5 = time.perf_counter()
    print(f"a rank: {train.blocks:,} blocks; the epoch's block order in {t4 - t3:.2f} s "
          f"({order.perm.nbytes / 2**20:.0f} MiB), its share of 64 global batches of 512 in {t5 - t4:.2f} s "
          f"({len(ids)} samples); the plan a rank gets pickles to {len(ray.cloudpickle.dumps(train.shared())) / 1024:.1f} KiB")


# ------------------------------------------------------------------------------------ images
def cmd_images(args) -> None:
    import boto3
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image
    from sklearn.datasets import load_digits

    from tests.fixtures.s3 import MotoEndpoint

    server = MotoEndpoint().start()
    os.environ["AWS_ENDPOINT_URL"] = server.url
    client = boto3.client("s3", endpoint_url=server.url, region_name="us-east-1")
    client.create_bucket(Bucket="imgs")
    digits = load_digits()
    rng = np.random.default_rng(0)
    for s in range(args.shards):
        rows = []
        for i in rng.integers(0, len(digits.images), args.per_shard):
            buf = io_png(Image.fromarray(np.uint8(digits.images[i] * 15)).resize((64, 64)))
            rows.append((buf, int(digits.target[i])))
        table = pa.table({"image": [r[0] for r in rows], "label": [r[1] for r in rows]})
        out = pa.BufferOutputStream()
        pq.write_table(table, out, row_group_size=100)
        client.put_object(Bucket="imgs", Key=f"pq/part-{s:03d}.parquet", Body=out.getvalue().to_pybytes())
    print(f"moto: {args.shards} shards x {args.per_shard} 64x64 PNG digits, row groups of 100")
    start_ray()
    import threading

    from e2e_dist.config import DataConfig, ResNetConfig, StorageConfig, load_run_config
    from e2e_dist.data.registry import build_data
    from e2e_dist.train.launcher import run_training

    storage = StorageConfig(endpoint_url=server.url)
    data = DataConfig(source="image-parquet", paths=["s3://imgs/pq/"], image_size=32, cache_mb=0)
    bundle = build_data(data, model_cfg=ResNetConfig(in_channels=1, num_classes=10), storage_cfg=storage)
    mb, n_batches = 32, args.batches
    import torch

    from e2e_dist.train.batches import BatchStream

    ranks = [BatchStream(bundle.train, micro_batch=mb, grad_accum=1, collate=bundle.collate, device=torch.device("cpu"),
                         shuffle_blocks=64, rank=r, world=2, seed=0, prefetch=2, decode_tasks=1) for r in range(2)]
    rates = [0.0, 0.0]

    def drain(r: int) -> None:
        ranks[r].next()  # the pipeline's start is not its rate
        t0 = time.perf_counter()
        for _ in range(n_batches):
            ranks[r].next()
        rates[r] = n_batches * mb / (time.perf_counter() - t0)

    threads = [threading.Thread(target=drain, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(f"pipeline alone, 2 ranks at once, 1 decode task each: {rates[0]:.0f} and {rates[1]:.0f} samples/s per rank")
    tmp = tempfile.mkdtemp(prefix="e2e-img-")
    cfg = load_run_config("tiny-vision", [
        "name=img-bench", f"storage.path={tmp}/runs", "data.source=image-parquet", "data.paths=[s3://imgs/pq/]",
        f"storage.endpoint_url={server.url}", "data.image_size=32", "data.cache_mb=0", "model.input_norm=none",
        f"trainer.max_steps={args.steps}", f"trainer.log_every={args.steps // 2}", f"trainer.eval_every={args.steps}",
        f"trainer.ckpt_every={args.steps}", "trainer.eval_samples=64", "tracking.wandb=false"])
    m = run_training(cfg, quiet=True).metrics
    print(f"training, 2 workers, micro-batch 32: step consumes {m['samples_per_s'] / 2:.0f} samples/s per rank "
          f"(step {m['step_time_s']:.3f} s); ranks read {m['data/samples_read_max_rank']:.0f} samples max, "
          f"{m['data/samples_read']:.0f} together, {m['data/bytes_read'] / 2**20:.1f} MiB")
    server.stop()


def io_png(im) -> bytes:
    import io

    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    p = sub.add_parser("reads")
    p.add_argument("--mb", type=float, default=24)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--row-group", type=int, default=64, help="documents per Parquet row group")
    p.add_argument("--node-cache-mb", type=int, default=2048, help="data.node_cache_mb (0: every rank on its own node)")
    p.set_defaults(func=cmd_reads)
    p = sub.add_parser("resume")
    p.add_argument("--mb", type=float, default=48)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--blocks", type=int, default=8, help="data.shuffle_blocks: many windows in the epoch")
    p.set_defaults(func=cmd_resume)
    sub.add_parser("shuffle").set_defaults(func=cmd_shuffle)
    p = sub.add_parser("plan")
    p.add_argument("--shards", type=int, default=100_000)
    p.add_argument("--shard-mb", type=int, default=10)
    p.set_defaults(func=cmd_plan)
    p = sub.add_parser("images")
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--per-shard", type=int, default=400)
    p.add_argument("--batches", type=int, default=40)
    p.add_argument("--steps", type=int, default=60)
    p.set_defaults(func=cmd_images)
    args = ap.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
