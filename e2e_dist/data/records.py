"""Text from record shards (Parquet, JSONL): one column of documents, read as one byte stream per shard.

A shard's stream is its documents' UTF-8 bytes with EOS between them (the text source adds the
last EOS, as after every plain file), so to the planner (`text.plan_splits`) a shard is a file whose
size is its stream's length: splits, nested size subsets, window numbering and resumable positions
are the plain-text rules unchanged.

To know those lengths without holding the corpus anywhere, an index pass reads every shard once in
Ray Data tasks (in driver threads for a few MiB; projection: the text column only) and returns, per shard, the stream length and
checkpoints every ~1 MiB of stream (Parquet: row-group starts; JSONL: line starts as file offsets),
so a window's bytes are later read from the nearest checkpoint, not from the shard's start. The
index is kept with the runs (data/index_store.py), keyed by (uri, size, mtime) per shard and by
the column: built once per dataset, read back by later runs, sweep trials and other nodes. The index pass also checks
every record: a missing column, a non-string value or an unreadable shard stops the run before
training with one line naming the shard (and line), whatever data.strict says.

Why tasks over pyarrow instead of `ray.data.read_parquet` / `read_json` for the windows: packing
documents into windows needs each shard's documents in order with their stream offsets, and
Ray Data's readers choose their own block boundaries (and may merge small files into one read
task), so a window's bytes could not be found without reading every block before it.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Iterator, Sequence

import numpy as np

from e2e_dist.data.common import DataError, FileItem
from e2e_dist.storage import open_input_file

log = logging.getLogger("e2e_dist.data")
RECORD_SUFFIXES = {".parquet": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl"}
CHECKPOINT_EVERY = 1 << 20
"""Stream bytes between JSONL checkpoints (Parquet checkpoints are its row groups)."""


def record_kind(uri: str) -> str | None:
    low = uri.lower()
    return next((kind for suffix, kind in RECORD_SUFFIXES.items() if low.endswith(suffix)), None)


# ------------------------------------------------------------------------------ reading documents
def _parquet_file(f, uri: str, column: str):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(f)
    names = pf.schema_arrow.names
    if column not in names:
        raise DataError(f"data.text_column: no column {column!r} in {uri} (columns: {', '.join(names)})")
    kind = pf.schema_arrow.field(column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise DataError(f"data.text_column: column {column!r} of {uri} is {kind}, not a string")
    return pf


def _row_group_docs(pf, rg: int, column: str) -> list[bytes]:
    return [v.encode("utf-8") for v in pf.read_row_group(rg, columns=[column]).column(0).to_pylist() if v]


def _docs_parquet(uri: str, column: str, storage_cfg: Any, row_group: int = 0) -> Iterator[tuple[Any, bytes]]:
    """(row group, document bytes) from row group `row_group` on, the text column only."""
    with open_input_file(uri, storage_cfg) as f:
        pf = _parquet_file(f, uri, column)
        for rg in range(row_group, pf.num_row_groups):
            for doc in _cached_row_group(uri, column, rg, lambda: _row_group_docs(pf, rg, column)):
                yield rg, doc


DECODED = [0]
"""Bytes of documents this process has decoded from record shards (Parquet row groups as a whole,
JSONL lines as read): what `read_stream` reports as read."""
_last_row_group: dict = {}
"""This process's most recently decoded row group: consecutive chunks of a shard land in the same
Ray worker process, and would otherwise decode the same row group again for every chunk."""


def _cached_row_group(uri: str, column: str, rg: int, decode) -> list[bytes]:
    key = (uri, column, rg)
    if key not in _last_row_group:
        docs = decode()
        DECODED[0] += sum(len(d) for d in docs)
        _last_row_group.clear()
        _last_row_group[key] = docs
    return _last_row_group[key]


def _docs_jsonl(uri: str, column: str, storage_cfg: Any, offset: int = 0) -> Iterator[tuple[Any, bytes]]:
    """(file offset of the line, document bytes) from file offset `offset` on."""
    import io

    with open_input_file(uri, storage_cfg) as raw:
        raw.seek(offset)
        pos = offset
        for lineno, line in enumerate(io.BufferedReader(raw, buffer_size=1 << 20), start=1):
            start, pos = pos, pos + len(line)
            DECODED[0] += len(line)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                raise DataError(f"data.paths: {uri} at byte {start}: not a JSON line ({e})") from None
            if not isinstance(record, dict) or column not in record:
                raise DataError(f"data.text_column: no field {column!r} in {uri} at byte {start}"
                                + ("" if offset else f" (line {lineno})"))  # numbered from the file's start
            value = record[column]
            if value is not None and not isinstance(value, str):
                raise DataError(f"data.text_column: field {column!r} in {uri} at byte {start} is "
                                f"{type(value).__name__}, not a string")
            if value:
                yield start, value.encode("utf-8")


def documents(uri: str, column: str, storage_cfg: Any, locator: Any = 0) -> Iterator[tuple[Any, bytes]]:
    reader = _docs_parquet if record_kind(uri) == "parquet" else _docs_jsonl
    return reader(uri, column, storage_cfg, locator)


# ------------------------------------------------------------------------------ the index
def index_shard(uri: str, column: str, storage_cfg: Any, checkpoint_every: int = CHECKPOINT_EVERY) -> dict:
    """{uri, length, docs, checkpoints: [[stream offset, locator], ...]} of one shard."""
    length, docs, checkpoints, last_loc, next_mark = 0, 0, [], None, 0
    parquet = record_kind(uri) == "parquet"
    for loc, doc in documents(uri, column, storage_cfg):
        start = length + (1 if docs else 0)  # the EOS between documents comes first
        if parquet and loc != last_loc or not parquet and start >= next_mark:
            checkpoints.append([start, loc])
            next_mark = start + checkpoint_every
        last_loc = loc
        length, docs = start + len(doc), docs + 1
    return {"uri": uri, "length": length, "docs": docs, "checkpoints": checkpoints}


def index_shards(files: Sequence[FileItem], data_cfg: Any, storage_cfg: Any, stats: dict | None = None) -> dict[str, dict]:
    """The index of every record shard in `files` (data/index_store.py: stored once per dataset, the
    rest in Ray Data tasks); DataError naming the first bad shard (by uri). Each entry's checkpoints
    come as two int64 arrays (stream offsets, locators), not as per-checkpoint Python objects."""
    from e2e_dist.data.index_store import cached_index, index_location

    column = data_cfg.text_column
    entries = cached_index("text", files, index_shard, location=index_location(data_cfg, storage_cfg),
                           paths=data_cfg.paths, params={"column": column, "every": CHECKPOINT_EVERY},
                           storage_cfg=storage_cfg, stats=stats, column=column, checkpoint_every=CHECKPOINT_EVERY)
    out = {}
    for f, e in zip(files, entries):
        ck = np.asarray(e["checkpoints"], dtype=np.int64).reshape(-1, 2)
        out[f.uri] = {"length": e["length"], "docs": e["docs"], "checkpoints": (ck[:, 0].copy(), ck[:, 1].copy())}
    empty = [u for u, e in out.items() if not e["length"]]
    if empty:
        log.warning("data.text_column %r: %d shard(s) hold no text (e.g. %s)", column, len(empty), empty[0])
    return out


def as_stream_items(files: Sequence[FileItem], index: dict[str, dict]) -> list[FileItem]:
    """Record shards as the planner's files: size = stream length (shards without text left out)."""
    return [FileItem(uri=f.uri, key=f.key, size=index[f.uri]["length"], mtime=f.mtime)
            for f in files if index[f.uri]["length"]]


# ------------------------------------------------------------------------------ worker side
def read_stream(uri: str, offset: int, n: int, *, column: str, offsets: np.ndarray, locators: np.ndarray,
                storage_cfg: Any, eos: int) -> tuple[np.ndarray, int]:
    """Stream bytes [offset, offset + n) of a shard as token ids (EOS between documents), read from
    the last checkpoint at or before `offset`; and the document bytes decoded for them."""
    i = max(0, int(np.searchsorted(offsets, offset, side="right")) - 1)
    start, locator = (int(offsets[i]), int(locators[i])) if len(offsets) else (0, 0)
    out = np.empty(n, dtype=np.uint16)
    filled, pos, before = 0, start, DECODED[0]
    for _, doc in documents(uri, column, storage_cfg, locator):
        if pos != start:  # EOS between documents
            if offset <= pos < offset + n:
                out[pos - offset] = eos
                filled += 1
            pos += 1
        end = pos + len(doc)
        lo, hi = max(pos, offset), min(end, offset + n)
        if lo < hi:
            out[lo - offset: hi - offset] = np.frombuffer(doc, dtype=np.uint8)[lo - pos: hi - pos]
            filled += hi - lo
        pos = end
        if pos >= offset + n:
            break
    if filled < n:
        raise DataError(f"data.paths: {uri} holds less text than when it was indexed (changed while training?)")
    return out, DECODED[0] - before
