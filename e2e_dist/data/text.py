"""Text sources: byte files -> packed windows of `seq_len + 1` byte ids, streamed by Ray Data.

Sources: `text` (data.paths: files, directories, globs, `s3://` prefixes) and `stdlib-text`
(this Python's standard library `*.py` files: real text on every machine, never downloaded).

How a config becomes bytes, all decided on the driver from the listing alone (no file is read
there beyond the first 4 KiB of a few sampled files, `warn_if_binary`, so building the datasets
takes well under a second for thousands of files):
1. `max_files`: the first max_files files in the seeded order (`common.seeded_order`).
2. Split by each file's key hash (`common.split_by_hash`); val never ends up empty: it takes
   the files with the next-smallest hashes until it holds a window. A lone file is split by
   bytes instead (val = its tail).
3. Training subset = a byte budget `min(fraction * train_bytes, max_bytes)` taken as a prefix of
   the seeded train file order, cutting the last file. Smaller budgets are exact prefixes of
   larger ones, so their windows are the first windows of the larger subset (nested ablations).
4. Each split is one byte stream: file bytes, then EOS after every file read to its end. Window
   k is `stream[k*seq_len : k*seq_len + seq_len + 1]` (inputs [:-1], targets [1:]), so every
   stream byte after the first is a target exactly once; train_tokens = windows * seq_len.

Ordering guarantee: a dataset's row order is a pure function of the files' bytes and the data
config. Rows are produced in chunks of consecutive windows (~256 KiB of stream), chunks in stream
order; inside a train chunk the windows are permuted by a RNG seeded with (seed, chunk), so a
batch mixes a few files instead of one file's consecutive windows. Rows carry their window
number in `index` for checks. Both datasets have preserve_order set; pass
`common.ingest_data_config()` as the TorchTrainer's `dataset_config` so Ray Train keeps it: then
every rank reads the same row sequence, the same on every run (train/batches.py's BatchStream
gives rank r of W every W-th micro-batch of it, and a seeded local shuffle per epoch on top,
`data.shuffle_buffer_batches`, deterministic in the same way), so a resume at any world size
continues exactly where the run stopped.
"""

from __future__ import annotations

import bisect
import json
import logging
import math
import sysconfig
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from e2e_dist.data.common import (
    DataError, FileItem, deterministic, list_files, read_range, seeded_order, split_by_hash, walk_files,
)
from e2e_dist.console import FILE_ONLY
from e2e_dist.data.records import as_stream_items, index_shards, read_stream, record_kind
from e2e_dist.data.registry import DataBundle, register_source
from e2e_dist.errors import ConfigError

log = logging.getLogger("e2e_dist.data")
CHUNK_STREAM_BYTES = 1 << 18
"""Target stream bytes per Ray block: big enough to amortize a task, small enough to stream."""
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

    def chunks(self) -> list[dict]:
        """Per Ray block: its first window, window count, and the reads that cover it."""
        per = max(1, CHUNK_STREAM_BYTES // self.seq_len)
        offs, pos = [], 0
        for s in self.segments:
            offs.append(pos)
            pos += s.length + s.eos
        return [
            {"w0": w0, "n": min(per, self.windows - w0),
             "runs": self._runs(offs, w0 * self.seq_len, (w0 + min(per, self.windows - w0)) * self.seq_len + 1)}
            for w0 in range(0, self.windows, per)
        ]

    def _runs(self, offs: list[int], lo: int, hi: int) -> list[list]:
        """Stream range [lo, hi) as [uri, file offset, n bytes] reads; [None, 0, 1] is one EOS."""
        runs: list[list] = []
        i, pos = bisect.bisect_right(offs, lo) - 1, lo
        while pos < hi:
            seg, s0 = self.segments[i], offs[i]
            if pos < s0 + seg.length:
                take = min(hi, s0 + seg.length) - pos
                runs.append([seg.uri, seg.start + pos - s0, take])
                pos += take
            if pos < hi and seg.eos and pos == s0 + seg.length:
                runs.append([None, 0, 1])
                pos += 1
            i += 1
        return runs


def plan_splits(files: Sequence[FileItem], data_cfg: Any, paths_label: str) -> tuple[StreamPlan, StreamPlan]:
    """(train, val) stream plans for `files` under data_cfg; DataError when there is too little data."""
    S, seed = data_cfg.seq_len, data_cfg.seed
    files = seeded_order(files, seed=seed)[: data_cfg.max_files or None]
    need = S + 1
    if len(files) == 1:
        # One file (a classic "input.txt"): hold out its tail rather than the whole file.
        f = files[0]
        n_val = max(math.ceil(f.size * data_cfg.val_fraction), S)
        train = [Segment(f.uri, 0, f.size - n_val, False)] if f.size > n_val else []
        val = [Segment(f.uri, f.size - n_val, n_val, True)]
    else:
        for min_val in range(1, len(files)):
            train_f, val_f = split_by_hash(files, val_fraction=data_cfg.val_fraction, seed=seed, min_val=min_val)
            if sum(f.size + 1 for f in val_f) >= need:
                break
        train = [Segment(f.uri, 0, f.size, True) for f in train_f]
        val = [Segment(f.uri, 0, f.size, True) for f in val_f]
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


# ------------------------------------------------------------------------------ worker side
def _read_tokens(uri: str, offset: int, n: int, storage_cfg: Any, strict: bool, pad: int) -> np.ndarray:
    """n byte ids of uri from offset; an unreadable or shrunk file reads as PAD (ignored by the
    loss) with a warning, so windows keep their place, or raises DataError when strict."""
    try:
        data = read_range(uri, offset, n, storage_cfg)
    except OSError as e:
        if strict:
            raise DataError(f"data.paths: cannot read {uri}: {str(e).splitlines()[0] if str(e) else e!r}") from None
        log.warning("unreadable %s (%s): its bytes become PAD", uri, e)
        data = b""
    out = np.full(n, pad, dtype=np.uint16)
    out[: len(data)] = np.frombuffer(data, dtype=np.uint8)
    if len(data) < n:
        if strict:
            raise DataError(f"data.paths: {uri} is shorter than listed (changed while training?)")
        if data:
            log.warning("%s shrank since it was listed: %d missing bytes become PAD", uri, n - len(data))
    return out


def read_windows(batch: dict, *, seq_len: int, shuffle_seed: int | None, storage: Any, strict: bool,
                 eos: int, pad: int, column: str = "text") -> dict:
    """Ray Data map_batches fn: chunk plans (JSON) -> their windows {"tokens", "index"}.

    A plan's `records` holds the checkpoints of the record shards it reads (data/records.py); their
    stream ranges are read from those, every other uri as raw bytes. The special ids come in as
    arguments: importing the model module here would load torch into every Ray Data worker process
    just for two integers."""
    tokens, index = [], []
    for raw in batch["plan"]:
        plan = json.loads(raw)
        records = plan.get("records", {})

        def read(uri: str, off: int, n: int) -> np.ndarray:
            if uri in records:
                return read_stream(uri, off, n, column=column, checkpoints=records[uri], storage_cfg=storage, eos=eos)
            return _read_tokens(uri, off, n, storage, strict, pad)

        parts = [np.array([eos], np.uint16) if uri is None else read(uri, off, n) for uri, off, n in plan["runs"]]
        stream = np.concatenate(parts)
        n, w0 = plan["n"], plan["w0"]
        win = stream[np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)]
        idx = np.arange(w0, w0 + n, dtype=np.int64)
        if shuffle_seed is not None:
            perm = np.random.default_rng([shuffle_seed % 2**32, w0]).permutation(n)
            win, idx = win[perm], idx[perm]
        tokens.append(win)
        index.append(idx)
    return {"tokens": np.concatenate(tokens), "index": np.concatenate(index)}


def collate(batch: dict) -> dict:
    """numpy batch from iter_batches -> {"tokens": LongTensor (B, seq_len + 1)}."""
    import torch

    return {"tokens": torch.from_numpy(np.ascontiguousarray(batch["tokens"], dtype=np.int64))}


# ------------------------------------------------------------------------------ driver side
def _dataset(plan: StreamPlan, *, shuffle_seed: int | None, storage_cfg: Any, strict: bool, name: str,
             records: dict[str, list], column: str):
    import ray
    import ray.data

    from e2e_dist.models.gpt import EOS, PAD

    if not ray.is_initialized():
        # Ray Data would otherwise start a default instance (public address, ~/.ray token auth).
        raise RuntimeError("initialize Ray before building datasets (e2e_dist.train.ray_env.init_ray)")
    chunks = plan.chunks()
    for c in chunks:  # each read task carries the checkpoints of its own shards only
        mine = {uri: records[uri] for uri, _, _ in c["runs"] if uri in records}
        if mine:
            c["records"] = mine
    items = [{"plan": json.dumps(c)} for c in chunks]
    ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        read_windows,
        batch_size=1,
        batch_format="numpy",
        fn_kwargs={"seq_len": plan.seq_len, "shuffle_seed": shuffle_seed, "storage": storage_cfg, "strict": strict,
                   "eos": EOS, "pad": PAD, "column": column},
        # Reading a few hundred KiB per task is I/O, not compute; on a small machine the training
        # workers hold every CPU, and a 1-CPU read task would then never be scheduled.
        num_cpus=0,
        compute=ray.data.TaskPoolStrategy(size=min(2, len(items))),
    )
    ds.set_name(name)
    return deterministic(ds)


def build_text_bundle(files: Sequence[FileItem], data_cfg: Any, storage_cfg: Any, paths_label: str,
                      records: dict[str, list] | None = None) -> DataBundle:
    """Plan on the driver, then lazily-read Ray Datasets of windows + exact stats.
    records: checkpoints of the record shards among `files` (their size is their stream's length)."""
    records = records or {}
    train, val = plan_splits(files, data_cfg, paths_label)
    stats = {
        "train_bytes": train.bytes, "train_windows": train.windows,
        "train_tokens": train.windows * train.seq_len,
        "train_files": train.files, "train_rows": train.windows,
        "val_bytes": val.bytes, "val_windows": val.windows, "val_tokens": val.windows * val.seq_len,
        "val_files": val.files, "val_rows": val.windows,
    }
    log.info("text data %s: %s", paths_label, stats, extra=FILE_ONLY)
    return DataBundle(
        train=_dataset(train, shuffle_seed=data_cfg.seed, storage_cfg=storage_cfg, strict=data_cfg.strict, name="train",
                       records=records, column=data_cfg.text_column),
        val=_dataset(val, shuffle_seed=None, storage_cfg=storage_cfg, strict=data_cfg.strict, name="val",
                     records=records, column=data_cfg.text_column),
        collate=collate,
        stats=stats,
        train_decoded_bytes=train.windows * ((train.seq_len + 1) * 2 + 8),  # uint16 tokens + int64 index
    )


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
    index = index_shards(shards, data_cfg.text_column, storage_cfg)
    items = plain + as_stream_items(shards, index)
    log.info("text data: %d plain file(s), %d record shard(s) (%d documents)", len(plain), len(shards),
             sum(e["docs"] for e in index.values()), extra=FILE_ONLY)
    return build_text_bundle(items, data_cfg, storage_cfg, ", ".join(data_cfg.paths),
                             records={u: e["checkpoints"] for u, e in index.items()})


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
