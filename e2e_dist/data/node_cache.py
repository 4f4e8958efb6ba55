"""Decoded Parquet row groups kept on a node's local disk, for every read task of every rank there.

A text window that crosses a row-group boundary needs a little of the next row group, and Parquet
decodes a row group whole; ranks whose blocks neighbour each other need each other's edge row
groups too. Without a cache each such read decodes (and on S3 downloads) a whole row group
again. With it, the first task on a node to decode a row group writes its documents here, and
every later task on that node (any rank, any epoch) reads them back instead: a row group is
fetched and decoded about once per node.

Keyed by the shard's identity (uri, size, modification time from the listing), the column and
the row group, so a changed shard is never served stale. Written atomically (temporary file,
rename); bounded by `data.node_cache_mb`, oldest entries evicted first. The folder is
$E2E_DIST_NODE_CACHE, else `<cache root>/node-cache` (HOME's cache: per machine).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

_EVICT_EVERY = 32
"""Writes between checks of the folder's size (a listing of the folder each)."""
_writes = [0]


def folder() -> Path:
    if os.environ.get("E2E_DIST_NODE_CACHE"):
        return Path(os.environ["E2E_DIST_NODE_CACHE"])
    from e2e_dist.data.images import cache_root

    return cache_root() / "node-cache"


def _path(identity: str, column: str, rg: int) -> Path:
    key = hashlib.blake2b(f"{identity}\x1f{column}\x1f{rg}".encode(), digest_size=16).hexdigest()
    return folder() / key[:2] / f"{key}.rg"


def get(identity: str, column: str, rg: int) -> list[bytes] | None:
    """The row group's documents, or None when this node has not decoded it (or it was evicted)."""
    try:
        raw = _path(identity, column, rg).read_bytes()
    except OSError:
        return None
    n = int.from_bytes(raw[:8], "little")
    ends = np.frombuffer(raw, dtype=np.uint64, count=n, offset=8).astype(np.int64)
    body = memoryview(raw)[8 + 8 * n:]
    starts = np.concatenate([[0], ends[:-1]])
    return [bytes(body[a:b]) for a, b in zip(starts.tolist(), ends.tolist())]


def put(identity: str, column: str, rg: int, docs: list[bytes], limit_mb: int) -> None:
    """Keep a decoded row group (best effort: a full or read-only disk only costs a decode later)."""
    if limit_mb <= 0:
        return
    path = _path(identity, column, rg)
    ends = np.cumsum([len(d) for d in docs], dtype=np.uint64) if docs else np.zeros(0, np.uint64)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            f.write(len(docs).to_bytes(8, "little"))
            f.write(ends.tobytes())
            for d in docs:
                f.write(d)
        os.replace(tmp, path)
    except OSError:
        return
    _writes[0] += 1
    if _writes[0] % _EVICT_EVERY == 0:
        evict(limit_mb)


def evict(limit_mb: int) -> None:
    """Delete the least recently written entries until the folder is under 80% of limit_mb."""
    entries = []
    for p in folder().glob("*/*.rg"):
        try:
            st = p.stat()
        except OSError:
            continue
        entries.append((st.st_mtime, st.st_size, p))
    total, cap = sum(e[1] for e in entries), limit_mb * 2**20
    if total <= cap:
        return
    for _, size, p in sorted(entries):
        if total <= 0.8 * cap:
            break
        try:
            p.unlink()
            total -= size
        except OSError:
            pass
