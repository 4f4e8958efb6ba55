"""Shard indexes built once per dataset and kept with the runs, for every later run, trial and node.

An index pass (text from record shards: stream lengths and checkpoints; image-parquet: row groups
and labels) reads every shard once. Its result is stored as one Parquet file per dataset under
`data.index_cache` (default `<storage.path>/.e2e-index/`: the same place, local or s3://, every
node of a cluster and every sweep trial already reaches), one row per shard keyed by the shard's
identity (uri, size, modification time). A later run loads the file (one read, O(shards) memory)
and indexes only shards that are new or changed since; a shard gone from the listing drops out.
Without a modification time (some listings have none) a shard is indexed every time.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any, Callable, Sequence

from e2e_dist.console import FILE_ONLY
from e2e_dist.data.common import FileItem, per_shard_in_tasks

log = logging.getLogger("e2e_dist.data")
VERSION = 2
"""Bumped when an index entry's meaning changes: older files are then ignored."""


def index_location(data_cfg: Any, storage_cfg: Any) -> str:
    """Where this config's indexes live: data.index_cache, else next to the runs, else the local cache."""
    from e2e_dist import storage

    if getattr(data_cfg, "index_cache", None):
        return data_cfg.index_cache
    if storage_cfg is not None and getattr(storage_cfg, "path", None):
        return storage.join(storage_cfg.path, ".e2e-index")
    from e2e_dist.data.images import cache_root

    return str(cache_root() / "index")


def index_uri(location: str, kind: str, paths: Sequence[str], params: dict) -> str:
    from e2e_dist import storage

    key = hashlib.blake2b(json.dumps([VERSION, kind, sorted(paths), params], sort_keys=True).encode(),
                          digest_size=10).hexdigest()
    return storage.join(location, f"{kind}-{key}.parquet")


def _load(uri: str, storage_cfg: Any) -> dict[str, tuple[int, float | None, str]]:
    """{shard uri: (size, mtime, entry JSON)} of a stored index; {} when there is none (or it is unreadable)."""
    import io

    import pyarrow.parquet as pq

    from e2e_dist import storage

    try:
        if not storage.exists(uri, storage_cfg):
            return {}
        table = pq.read_table(io.BytesIO(storage.read_bytes(uri, storage_cfg)))
    except Exception as e:  # a damaged or foreign file costs a re-index, never the run
        log.warning("shard index %s unreadable (%s): indexing again", uri, (str(e).splitlines() or [""])[0])
        return {}
    cols = table.to_pydict()
    return {u: (s, m, e) for u, s, m, e in zip(cols["uri"], cols["size"], cols["mtime"], cols["entry"])}


def _save(uri: str, files: Sequence[FileItem], entries: Sequence[str], storage_cfg: Any) -> None:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    from e2e_dist import storage

    table = pa.table({"uri": [f.uri for f in files], "size": [f.size for f in files],
                      "mtime": pa.array([f.mtime for f in files], pa.float64()), "entry": list(entries)})
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    try:
        storage.write_bytes(uri, buf.getvalue(), storage_cfg)
    except Exception as e:  # a read-only store: the run goes on, the next one indexes again
        log.warning("cannot keep the shard index at %s (%s)", uri, (str(e).splitlines() or [""])[0])


def cached_index(kind: str, files: Sequence[FileItem], fn: Callable[..., dict], *, location: str, paths: Sequence[str],
                 params: dict, storage_cfg: Any, stats: dict | None = None, **kwargs: Any) -> list[dict]:
    """fn(uri, **kwargs) for every shard, in `files` order: from the stored index where the shard is
    unchanged, the rest in Ray Data tasks across the cluster (common.per_shard_in_tasks), then stored.
    stats: gets index_shards and index_built_now (what the run's summary reports)."""
    uri = index_uri(location, kind, paths, params)
    stored = _load(uri, storage_cfg)
    raw: list[str | None] = []
    todo: list[int] = []
    for i, f in enumerate(files):
        hit = stored.get(f.uri)
        if hit is not None and f.mtime is not None and hit[0] == f.size and hit[1] == f.mtime:
            raw.append(hit[2])
        else:
            raw.append(None)
            todo.append(i)
    fresh = per_shard_in_tasks([files[i] for i in todo], fn, storage_cfg=storage_cfg, **kwargs)
    for i, entry in zip(todo, fresh):
        raw[i] = json.dumps(entry)
    log.info("shard index %s: %d shard(s), %d indexed now, %d from the stored index", uri, len(files), len(todo),
             len(files) - len(todo), extra=FILE_ONLY)
    if stats is not None:
        stats.update(index_shards=len(files), index_built_now=len(todo))
    if todo or len(stored) != len(files):
        _save(uri, files, raw, storage_cfg)  # type: ignore[arg-type]
    return [json.loads(r) for r in raw]  # type: ignore[arg-type]
