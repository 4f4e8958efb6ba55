"""Text sources: byte files -> packed windows of `seq_len + 1` byte ids, read by number.

Sources: `text` (data.paths: files, directories, globs, `s3://` prefixes) and `stdlib-text`
(this Python's standard library `*.py` files: real text on every machine, never downloaded).

How a config becomes bytes, all decided on the driver from the listing alone (no file is read
there beyond the first 4 KiB of a few sampled files, `warn_if_binary`, and the record shards'
stored index, data/records.py):
1. `max_files`: the first max_files files in the seeded order (`common.seeded_order`).
2. Split by each file's key hash (`common.split_by_hash`); val never ends up empty: it takes
   the files with the next-smallest hashes until it holds a window. A lone file is split by
   bytes instead (val = its tail); so are a few files whose whole-file split misses
   val_fraction by more than 2x (val = the tail of each), said in one line.
3. Training subset = a byte budget `min(fraction * train_bytes, max_bytes)` taken as a prefix of
   the seeded train file order, cutting the last file. Smaller budgets are exact prefixes of
   larger ones, so their windows are the first windows of the larger subset (nested ablations).
4. Each split is one byte stream: file bytes, then EOS after every file read to its end. Window
   k is `stream[k*seq_len : k*seq_len + seq_len + 1]` (inputs [:-1], targets [1:]), so every
   stream byte after the first is a target exactly once; train_tokens = windows * seq_len.

A split is then a SampleSet of windows (data/samples.py) in blocks of ~256 KiB of stream (record
shards: between their checkpoints), read by `text_reader.TextReader`; the order they are trained
in, and which rank reads which, is data/order.py's. Rows carry their window number in `index`.
"""

from __future__ import annotations

import logging
import math
import sysconfig
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from e2e_dist.data.common import (
    DataError, FileItem, list_files, read_range, seeded_order, share_note, split_by_hash, split_inside, tail_sizes,
    walk_files,
)
from e2e_dist.console import FILE_ONLY
from e2e_dist.data.records import as_stream_items, index_shards, record_kind
from e2e_dist.data.registry import DataBundle, register_source
from e2e_dist.data.samples import SampleSet
from e2e_dist.data.text_reader import BLOCK_STREAM_BYTES, TextReader, block_starts
from e2e_dist.errors import ConfigError

log = logging.getLogger("e2e_dist.data")
STDLIB_SKIP_DIRS = ("site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__")


@dataclass(frozen=True)
class Segment:
    """A byte range of one file in a split's stream."""

    uri: str
    start: int
    length: int
    eos: bool
    """An EOS follows: the range reaches the file's end (a file cut by the byte budget has none)."""


@dataclass(frozen=True)
class StreamPlan:
    """One split's stream: segments laid end to end, cut into windows of seq_len + 1."""

    segments: tuple[Segment, ...]
    seq_len: int

    @property
    def length(self) -> int:
        return sum(s.length + s.eos for s in self.segments)

    @property
    def windows(self) -> int:
        return max(0, (self.length - 1) // self.seq_len)

    @property
    def bytes(self) -> int:
        return sum(s.length for s in self.segments)

    @property
    def files(self) -> int:
        return len({s.uri for s in self.segments})


def plan_splits(files: Sequence[FileItem], data_cfg: Any, paths_label: str) -> tuple[StreamPlan, StreamPlan]:
    """(train, val) stream plans for `files` under data_cfg; DataError when there is too little data."""
    S, seed, vf = data_cfg.seq_len, data_cfg.seed, data_cfg.val_fraction
    files = seeded_order(files, seed=seed)[: data_cfg.max_files or None]
    need = S + 1
    if len(files) == 1:
        # One file (a classic "input.txt"): hold out its tail rather than the whole file.
        f = files[0]
        n_val = max(math.ceil(f.size * vf), S)
        train = [Segment(f.uri, 0, f.size - n_val, False)] if f.size > n_val else []
        val = [Segment(f.uri, f.size - n_val, n_val, True)]
    else:
        for min_val in range(1, len(files)):
            train_f, val_f = split_by_hash(files, val_fraction=vf, seed=seed, min_val=min_val)
            if sum(f.size + 1 for f in val_f) >= need:
                break
        train = [Segment(f.uri, 0, f.size, True) for f in train_f]
        val = [Segment(f.uri, 0, f.size, True) for f in val_f]
        total = sum(f.size for f in files)
        share = sum(f.size for f in val_f) / max(total, 1)
        if split_inside("files", len(files), share, vf, "bytes"):  # too few files: the tail of each
            tails = _tail_split(files, vf, need)
            if tails is not None:
                train, val = tails
                share_note(f"{len(files)} files", share, vf, "the tail of each file")
    val_plan = StreamPlan(tuple(val), S)
    full = StreamPlan(tuple(train), S)
    if not val_plan.windows or not full.windows:
        total = sum(f.size for f in files)
        raise DataError(
            f"data too small: {len(files)} file(s), {total} bytes in {paths_label}; need one train and one "
            f"val window of seq_len+1={need} bytes each (lower data.seq_len or add data)"
        )
    budget = min(int(full.bytes * data_cfg.fraction), data_cfg.max_bytes or full.bytes)
    cut: list[Segment] = []
    for seg in train:
        if budget <= 0:
            break
        take = min(seg.length, budget)
        cut.append(Segment(seg.uri, seg.start, take, seg.eos and take == seg.length))
        budget -= take
    train_plan = StreamPlan(tuple(cut), S)
    if not train_plan.windows:
        raise DataError(
            f"data.fraction={data_cfg.fraction} / data.max_bytes={data_cfg.max_bytes} leave {train_plan.bytes} "
            f"training bytes of {paths_label}: fewer than one window of {need}"
        )
    return train_plan, val_plan


def _tail_split(files: Sequence[FileItem], vf: float, need: int) -> tuple[list[Segment], list[Segment]] | None:
    """Train = each file's head, val = its tail, the tails adding up to vf of all bytes (cumulative
    rounding); None when that leaves no val window. A head ends with EOS like a whole file: the
    next file's text is another document."""
    train, val = [], []
    for f, n_val in zip(files, tail_sizes([f.size for f in files], vf)):
        if f.size > n_val:
            train.append(Segment(f.uri, 0, f.size - n_val, True))
        if n_val:
            val.append(Segment(f.uri, f.size - n_val, n_val, True))
    return (train, val) if sum(s.length + 1 for s in val) >= need else None


# ------------------------------------------------------------------------------ worker side
def collate(batch: dict) -> dict:
    """numpy batch of rows -> {"tokens": LongTensor (B, seq_len + 1)}."""
    import torch

    return {"tokens": torch.from_numpy(np.ascontiguousarray(batch["tokens"], dtype=np.int64))}


# ------------------------------------------------------------------------------ driver side
def text_samples(plan: StreamPlan, *, name: str, storage_cfg: Any, strict: bool, records: dict[str, tuple],
                 column: str, node_cache_mb: int = 0) -> SampleSet:
    """The windows of one split's stream as a SampleSet (O(files) arrays, shared through the object store)."""
    import ray

    from e2e_dist.models.gpt import EOS, PAD

    if not ray.is_initialized():
        # Ray would otherwise start a default instance (public address, ~/.ray token auth).
        raise RuntimeError("initialize Ray before building datasets (e2e_dist.train.ray_env.init_ray)")
    segs = plan.segments
    uris = sorted({s.uri for s in segs})
    where = {u: i for i, u in enumerate(uris)}
    lengths = np.array([s.length for s in segs], dtype=np.int64)
    eos = np.array([s.eos for s in segs], dtype=bool)
    arrays = {"uri": np.array([where[s.uri] for s in segs], dtype=np.int64),
              "start": np.array([s.start for s in segs], dtype=np.int64), "length": lengths, "eos": eos,
              "offset": np.concatenate([[0], np.cumsum(lengths + eos)[:-1]]).astype(np.int64)}
    checkpoints = {u: records[u] for u in uris if u in records}  # only this split's shards
    reader = TextReader(arrays, uris, checkpoints, seq_len=plan.seq_len, storage=storage_cfg, strict=strict,
                        eos=EOS, pad=PAD, column=column, node_cache_mb=node_cache_mb)
    starts = block_starts(arrays, uris, checkpoints, plan.seq_len, plan.windows)
    return SampleSet(name=name, starts=starts, reader=reader, sample_bytes=(plan.seq_len + 1) * 2 + 9,
                     rows_per_task=max(64, BLOCK_STREAM_BYTES // plan.seq_len), worth_caching=False)


def build_text_bundle(files: Sequence[FileItem], data_cfg: Any, storage_cfg: Any, paths_label: str,
                      records: dict[str, tuple] | None = None, extra_stats: dict | None = None) -> DataBundle:
    """Plan on the driver, then the splits as SampleSets + exact stats.
    records: {uri: (checkpoint offsets, locators, identity)} of the record shards among `files` (their size is
    their stream's length). extra_stats: added to the stats (the shard index's counts)."""
    records = records or {}
    train, val = plan_splits(files, data_cfg, paths_label)
    stats = {
        "train_bytes": train.bytes, "train_windows": train.windows,
        "train_tokens": train.windows * train.seq_len,
        "train_files": train.files, "train_rows": train.windows,
        "val_bytes": val.bytes, "val_windows": val.windows, "val_tokens": val.windows * val.seq_len,
        "val_files": val.files, "val_rows": val.windows, **(extra_stats or {}),
    }
    log.info("text data %s: %s", paths_label, stats, extra=FILE_ONLY)
    kw = {"storage_cfg": storage_cfg, "strict": data_cfg.strict, "records": records, "column": data_cfg.text_column,
          "node_cache_mb": data_cfg.node_cache_mb}
    return DataBundle(train=text_samples(train, name="train", **kw), val=text_samples(val, name="val", **kw),
                      collate=collate, stats=stats)


SNIFF_FILES = 16
"""Files sampled by `warn_if_binary`: spread over the listing, read in parallel (S3 GETs)."""
SNIFF_BYTES = 4096
BINARY_SHARE = 0.3
"""Share of invalid-UTF-8 or control characters above which a sample looks binary: text in a
legacy encoding (Latin-1 accents) stays well below it, compiled or compressed data well above."""


def looks_binary(sample: bytes) -> bool:
    """NUL bytes, or a high share of bytes that are neither valid UTF-8 nor printable."""
    if b"\0" in sample:
        return True
    chars = sample.decode("utf-8", errors="replace")
    odd = sum(c == "\ufffd" or not (c.isprintable() or c in "\t\n\r\f\v\b\x1b") for c in chars)
    return bool(chars) and odd > BINARY_SHARE * len(chars)


def warn_if_binary(files: Sequence[FileItem], storage_cfg: Any, field: str = "data.paths") -> None:
    """One warning line when sampled files look binary: a byte-level model trains on any bytes, so a
    stray checkpoint or archive under data.paths is not an error, just rarely what was meant."""
    from concurrent.futures import ThreadPoolExecutor

    step = max(1, len(files) / SNIFF_FILES)
    sample = [files[int(i * step)] for i in range(min(len(files), SNIFF_FILES))]  # step >= 1: distinct

    def head(f: FileItem) -> bytes:
        try:
            return read_range(f.uri, 0, SNIFF_BYTES, storage_cfg)
        except OSError:  # the training read reports unreadable files (or fails when strict)
            return b""

    with ThreadPoolExecutor(max_workers=min(8, len(sample) or 1)) as pool:
        binary = [f.uri for f, data in zip(sample, pool.map(head, sample)) if looks_binary(data)]
    if binary:
        log.warning("%s: %d of %d sampled files look binary (e.g. %s): a byte-level text model will "
                    "train on their bytes", field, len(binary), len(sample), binary[0])


@register_source("text")
def build_text(data_cfg, *, model_cfg=None, storage_cfg=None) -> DataBundle:
    """User text: data.paths (files, directories, globs, s3:// prefixes); Parquet / JSONL shards give
    their data.text_column's documents (data/records.py), every other file is read as bytes."""
    files = _text_files(data_cfg, storage_cfg)
    shards = [f for f in files if record_kind(f.uri)]
    plain = [f for f in files if not record_kind(f.uri)]
    warn_if_binary(plain, storage_cfg)
    index_stats: dict = {}
    index = index_shards(shards, data_cfg, storage_cfg, stats=index_stats) if shards else {}
    items = plain + as_stream_items(shards, index)
    log.info("text data: %d plain file(s), %d record shard(s) (%d documents)", len(plain), len(shards),
             sum(e["docs"] for e in index.values()), extra=FILE_ONLY)
    return build_text_bundle(items, data_cfg, storage_cfg, ", ".join(data_cfg.paths),
                             records={u: e["checkpoints"] for u, e in index.items()}, extra_stats=index_stats)


def _text_files(data_cfg, storage_cfg) -> list[FileItem]:
    if not data_cfg.paths:
        raise ConfigError("data.paths: source 'text' needs at least one file, directory, glob or s3:// prefix")
    return list_files(data_cfg.paths, storage_cfg, strict=data_cfg.strict)


build_text.check_paths = _text_files  # see registry.check_data


def stdlib_files(root: str | None = None) -> list[FileItem]:
    """This Python's standard library *.py sources (no tests, no site-packages), keyed by relative path."""
    import os

    root = root or sysconfig.get_paths()["stdlib"]
    out = []
    for p in walk_files(root, skip_dirs=STDLIB_SKIP_DIRS):
        if p.endswith(".py") and os.access(p, os.R_OK):
            size = os.path.getsize(p)
            if size:
                out.append(FileItem(uri=p, key=os.path.relpath(p, root).replace(os.sep, "/"), size=size))
    if not out:
        raise DataError(f"data.source=stdlib-text: no *.py files under {root}")
    return out


@register_source("stdlib-text")
def build_stdlib_text(data_cfg, *, model_cfg=None, storage_cfg=None) -> DataBundle:
    """The built-in corpus: real text already on every machine."""
    if data_cfg.paths:
        raise ConfigError(
            "data.paths: source 'stdlib-text' reads the built-in corpus; use source 'text' for your files"
        )
    root = sysconfig.get_paths()["stdlib"]
    return build_text_bundle(stdlib_files(root), data_cfg, None, f"the standard library at {root}")
