"""Reading text from Parquet / JSONL shards vs plain files, side by side (BENCHMARKS.md section 10).

The same documents (this Python's standard-library sources) are written as plain files, as Parquet
shards and as JSONL shards; for each form the `text` source is built (for shards: the index pass,
uncached) and every train window is read once through Ray Data, as a training rank reads them.
Prints seconds and MB/s per form and the ratios to plain files. Usage:

    python benchmarks/text_records.py [--mb 40] [--shards 8] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time


def write_corpus(root: str, mb: float, shards: int) -> dict[str, str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from e2e_dist.data.common import seeded_order
    from e2e_dist.data.text import stdlib_files

    docs, total = [], 0
    for f in seeded_order(stdlib_files(), seed=0):
        text = open(f.uri, encoding="utf-8", errors="replace").read()
        docs.append(text)
        total += len(text.encode())
        if total >= mb * 2**20:
            break
    forms = {k: os.path.join(root, k) for k in ("plain", "parquet", "jsonl")}
    for d in forms.values():
        os.makedirs(d)
    for i, doc in enumerate(docs):
        with open(os.path.join(forms["plain"], f"doc{i:05d}.txt"), "w") as f:
            f.write(doc)
    for s in range(shards):
        part = docs[s::shards]
        pq.write_table(pa.table({"text": part}), os.path.join(forms["parquet"], f"part-{s:03d}.parquet"),
                       row_group_size=256)
        with open(os.path.join(forms["jsonl"], f"part-{s:03d}.jsonl"), "w") as f:
            f.writelines(json.dumps({"text": d}) + "\n" for d in part)
    print(f"corpus: {len(docs)} documents, {total / 2**20:.1f} MiB; {shards} shards per record form")
    return forms


def measure(path: str, cache: str) -> tuple[float, float, int]:
    from e2e_dist.config import DataConfig
    from e2e_dist.data.registry import build_data

    shutil.rmtree(cache, ignore_errors=True)  # the shards' index is rebuilt every round
    t0 = time.perf_counter()
    bundle = build_data(DataConfig(source="text", paths=[path], seq_len=512, cache_mb=0))
    t1 = time.perf_counter()
    n = sum(len(b["tokens"]) for b in bundle.train.dataset().iter_batches(batch_size=256, batch_format="numpy"))
    return t1 - t0, time.perf_counter() - t1, n * 512


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=40)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args(argv)
    from e2e_dist.train.ray_env import LocalRayOptions, init_ray

    root = tempfile.mkdtemp(prefix="e2e-bench-records-")
    os.environ["E2E_DIST_CACHE"] = os.path.join(root, "cache")
    try:
        forms = write_corpus(root, args.mb, args.shards)
        init_ray(None, LocalRayOptions(num_cpus=2, temp_dir=tempfile.mkdtemp(prefix="e2erb-", dir="/tmp")))
        results = {k: [] for k in forms}
        for r in range(args.rounds):  # interleaved, so drift on a shared machine hits every form alike
            for form, path in forms.items():
                results[form].append(measure(path, os.environ["E2E_DIST_CACHE"]))
        best = {k: min(v, key=lambda x: x[0] + x[1]) for k, v in results.items()}
        base = best["plain"][1]
        print("| form | build (index) s | read all train windows s | MB/s | read time vs plain |")
        print("|---|---|---|---|---|")
        for form, (build, read, tokens) in best.items():
            print(f"| {form} | {build:.2f} | {read:.2f} | {tokens / read / 1e6:.1f} | {read / base:.2f}x |")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
