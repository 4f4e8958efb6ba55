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

Training reads (`read_stream`) decode Parquet a few rows at a time from the checkpoint and stop
when they have their bytes (`_RowGroupCursor`); a row group read to its end is kept on the node
for every rank there (data/node_cache.py).

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
PARQUET_READ_ROWS = 8
"""Rows decoded at a time when training reads a row group (a read that stops early stops there)."""


def record_kind(uri: str) -> str | None:
    low = uri.lower()
    return next((kind for suffix, kind in RECORD_SUFFIXES.items() if low.endswith(suffix)), None)


# ------------------------------------------------------------------------------ reading documents
def _parquet_file(f, uri: str, column: str, **options):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(f, **options)
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
    """(row group, document bytes) from row group `row_group` on, the text column only (the index
    pass; training reads go through `_RowGroupCursor`)."""
    with open_input_file(uri, storage_cfg) as f:
        pf = _parquet_file(f, uri, column)
        for rg in range(row_group, pf.num_row_groups):
            for doc in _row_group_docs(pf, rg, column):
                yield rg, doc


DECODED = [0]
"""Bytes of documents this process has decoded from record shards for training (Parquet rows as
decoded, JSONL lines as read): what `read_stream` reports as read."""


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
            where = f"at byte {start}" + ("" if offset else f" (line {lineno})")  # lines counted from the file's start
            try:
                record = json.loads(line.rstrip(b"\r\n"))
            except json.JSONDecodeError as e:  # its own "line 1 column 34" is of this line alone: say the column
                raise DataError(f"data.paths: {uri} {where}: not a JSON line ({e.msg} at column {e.colno})") from None
            except ValueError as e:
                raise DataError(f"data.paths: {uri} {where}: not a JSON line ({e})") from None
            if not isinstance(record, dict) or column not in record:
                raise DataError(f"data.text_column: no field {column!r} in {uri} {where}")
            value = record[column]
            if value is not None and not isinstance(value, str):
                raise DataError(f"data.text_column: field {column!r} in {uri} at byte {start} is "
                                f"{type(value).__name__}, not a string")
            if value:
                yield start, value.encode("utf-8")


def documents(uri: str, column: str, storage_cfg: Any, locator: Any = 0) -> Iterator[tuple[Any, bytes]]:
    reader = _docs_parquet if record_kind(uri) == "parquet" else _docs_jsonl
    return reader(uri, column, storage_cfg, locator)


class _RowGroupCursor:
    """The row group this process is reading for training: the documents decoded so far and where
    decoding goes on. Reads decode a few hundred rows at a time and stop when they have their bytes,
    so a window crossing into a row group decodes its first pages only; the next read of the same
    row group continues from there instead of starting over. Read to its end, the row group goes
    to the node's cache (data/node_cache.py), where any task of any rank on the node finds it."""

    def __init__(self, uri: str, column: str, rg: int, identity: str, cache_mb: int):
        self.key, self.identity, self.cache_mb = (uri, column, rg), identity, cache_mb
        self.docs: list[bytes] = []
        self.batches: Iterator | None = None
        self.file: Any = None
        self.rows_left = 0
        self.done = False

    def start(self, storage_cfg: Any) -> bool:
        """Find the row group in the node's cache or open it for decoding; False past the last one."""
        from e2e_dist.data import node_cache

        uri, column, rg = self.key
        cached = node_cache.get(self.identity, column, rg) if self.identity else None
        if cached is not None:
            self.docs, self.done = cached, True
            return True
        self.file = open_input_file(uri, storage_cfg)
        # Buffered column reads: pages are fetched as they are decoded, not a whole column chunk first.
        pf = _parquet_file(self.file, uri, column, buffer_size=1 << 20)
        if rg >= pf.num_row_groups:
            self.close()
            return False
        self.batches = pf.iter_batches(batch_size=PARQUET_READ_ROWS, row_groups=[rg], columns=[column],
                                       use_threads=False)
        self.rows_left = pf.metadata.row_group(rg).num_rows
        return True

    def documents(self) -> Iterator[bytes]:
        from e2e_dist.data import node_cache

        i = 0
        while True:
            while i < len(self.docs):
                yield self.docs[i]
                i += 1
            if self.done:
                return
            batch = next(self.batches)  # type: ignore[call-overload]
            values = batch.column(0).to_pylist()
            new = [v.encode("utf-8") for v in values if v]
            DECODED[0] += sum(len(d) for d in new)
            self.docs.extend(new)
            self.rows_left -= len(values)
            if self.rows_left <= 0:  # complete: kept for the node before anyone stops reading
                self.done = True
                self.close()
                if self.identity:
                    node_cache.put(self.identity, self.key[1], self.key[2], self.docs, self.cache_mb)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


_cursor: list[_RowGroupCursor] = []
"""This process's open row group (one: a task reads its runs in stream order)."""


def _docs_parquet_shared(uri: str, column: str, storage_cfg: Any, row_group: int, identity: str,
                         cache_mb: int) -> Iterator[tuple[Any, bytes]]:
    """_docs_parquet for training reads, through this process's `_RowGroupCursor` and the node's cache."""
    rg = row_group
    while True:
        key = (uri, column, rg)
        if not _cursor or _cursor[0].key != key:
            if _cursor:
                _cursor.pop().close()
            cursor = _RowGroupCursor(uri, column, rg, identity, cache_mb)
            if not cursor.start(storage_cfg):
                return
            _cursor.append(cursor)
        for doc in _cursor[0].documents():
            yield rg, doc
        rg += 1


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
    come as two int64 arrays (stream offsets, locators), not as per-checkpoint Python objects, and
    the shard's identity (what the node cache keys its row groups by)."""
    from e2e_dist.data.index_store import cached_index, index_location

    column = data_cfg.text_column
    entries = cached_index("text", files, index_shard, location=index_location(data_cfg, storage_cfg),
                           paths=data_cfg.paths, params={"column": column, "every": CHECKPOINT_EVERY},
                           storage_cfg=storage_cfg, stats=stats, column=column, checkpoint_every=CHECKPOINT_EVERY)
    out = {}
    for f, e in zip(files, entries):
        ck = np.asarray(e["checkpoints"], dtype=np.int64).reshape(-1, 2)
        identity = f"{f.uri}\x1f{f.size}\x1f{f.mtime}" if f.mtime is not None else ""  # no mtime: never cached
        out[f.uri] = {"length": e["length"], "docs": e["docs"], "checkpoints": (ck[:, 0].copy(), ck[:, 1].copy(), identity)}
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
                storage_cfg: Any, eos: int, identity: str = "", cache_mb: int = 0) -> tuple[np.ndarray, int]:
    """Stream bytes [offset, offset + n) of a shard as token ids (EOS between documents), read from
    the last checkpoint at or before `offset`; and the document bytes decoded from storage for them
    (Parquet row groups this node had decoded already, under `identity`, cost none)."""
    i = max(0, int(np.searchsorted(offsets, offset, side="right")) - 1)
    start, locator = (int(offsets[i]), int(locators[i])) if len(offsets) else (0, 0)
    out = np.empty(n, dtype=np.uint16)
    filled, pos, before = 0, start, DECODED[0]
    docs = (_docs_parquet_shared(uri, column, storage_cfg, locator, identity, cache_mb) if record_kind(uri) == "parquet"
            else _docs_jsonl(uri, column, storage_cfg, locator))
    for _, doc in docs:
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
