"""`e2e-dist data plan`: what a run's data costs, before anything trains.

Builds the run's data exactly as `train` does (listing, the stored shard index or an index pass,
splits, blocks) and reports what grows with the corpus and the cluster: samples and blocks per
split, what each rank reads per epoch at the run's world size, how much of the index was built
now, the driver's time and memory, and what each rank is handed (its plan, and the shared index
it fetches once per node).
"""

from __future__ import annotations

import pickle
import resource
import time
from typing import Any

import numpy as np

from e2e_dist.train.batches import default_window_blocks


def shared_bytes(split: Any) -> int:
    """Bytes of the objects a split's reader keeps in the object store (fetched once per node)."""
    import ray

    from e2e_dist.data.samples import Shared

    total = 0
    for value in vars(split.reader).values():
        for s in value if isinstance(value, list) else [value]:
            if isinstance(s, Shared):
                total += len(pickle.dumps(ray.get(s.ref), protocol=5))
    return total


def _size(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB" if n >= 2**20 else f"{n / 1024:,.1f} KiB"


def describe(bundle: Any, cfg: Any, *, seconds: float) -> list[str]:
    """The plan of a built DataBundle under run config cfg, as lines for people."""
    import ray.cloudpickle

    from e2e_dist.plan.report import global_batch_of

    train, val, st = bundle.train, bundle.val, bundle.stats
    world = cfg.trainer.worker_range[1]
    batch = global_batch_of(cfg, world)
    m = default_window_blocks(cfg)
    in_memory = train.keep_in_memory(cfg.data.cache_mb)
    per_rank_bytes = st.get("train_bytes", 0) / world
    lines = [
        f"train          {train.n:,} samples in {train.blocks:,} blocks ({train.n / max(train.blocks, 1):.1f} per block)",
        f"val            {val.n:,} samples; each evaluation scores {min(val.n, cfg.trainer.eval_samples):,} of them",
        f"order          windows of {m} blocks, global batch {batch} at {world} worker(s)"
        + ("" if batch >= m or in_memory else f" (below {m}: each rank reads from more blocks than its share)"),
        f"per rank       {train.n // world:,} samples per epoch"
        + (f", ~{per_rank_bytes / 2**20:,.1f} MiB of {st['train_bytes'] / 2**20:,.1f} MiB" if st.get("train_bytes") else "")
        + (" (decoded once into memory: under data.cache_mb)" if in_memory else " (read by each rank, its own samples)"),
    ]
    if "index_shards" in st:
        lines.append(f"shard index    {st['index_shards']:,} shards: {st['index_shards'] - st['index_built_now']:,} "
                     f"from the stored index, {st['index_built_now']:,} indexed now")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    train, val = train.shared(), val.shared()  # as the launcher hands them to the workers
    plan = len(ray.cloudpickle.dumps(train)) + len(ray.cloudpickle.dumps(val))
    shared = shared_bytes(train) + shared_bytes(val) + sum(
        s.starts.value().nbytes for s in (train, val) if not isinstance(s.starts, np.ndarray))
    lines += [f"driver         planned in {seconds:.1f} s, peak memory {rss:,.0f} MiB",
              f"each rank      gets a {plan / 1024:,.1f} KiB plan; its node fetches {_size(shared)} of shared "
              "index and row tables once"]
    return lines


def plan_data(cfg: Any, *, address: str | None = None) -> list[str]:
    """Build cfg's data on the driver (Ray started or joined as `train` does) and describe it."""
    from e2e_dist.data.registry import build_data, check_data
    from e2e_dist.train.ray_env import init_ray

    check_data(cfg.data, cfg.storage)
    init_ray(address)
    t0 = time.perf_counter()
    bundle = build_data(cfg.data, cfg.model, cfg.storage)
    return describe(bundle, cfg, seconds=time.perf_counter() - t0)
