"""Helpers every data source shares: listing files, deterministic hash splits and subsets, reads.

Determinism rules (so ablations compare like with like):
- An item's fate depends only on its *key* (its path relative to the root it was listed from,
  e.g. `json/decoder.py`) and the seed: never on listing order, machine or absolute path.
- `split_by_hash` puts an item in val when `unit_hash("split", seed, key) < val_fraction`.
- `seeded_order` sorts by `unit_hash("order", seed, key)`; subsets are prefixes of that order, so a
  smaller subset is always contained in a larger one (`take_fraction`).

Paths are local files, directories (walked recursively, hidden entries skipped), globs (`*`, `?`,
`[..]`, `**`), or `s3://bucket/prefix` (a single object, a prefix, or a glob). S3 goes only through
`e2e_dist.storage`: listed with `resolve(uri, storage_cfg) -> (pyarrow filesystem, path)`, read with
`read_range` (re-exported here, where every data source imports it from).
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence, TypeVar

from e2e_dist.config import absolute_path
from e2e_dist.errors import UserError
from e2e_dist.storage import describe_error_at, resolve
from e2e_dist.storage import is_s3 as is_remote  # the name the data sources and predict use
from e2e_dist.storage import read_range  # noqa: F401 - re-exported: the data sources import it from here

log = logging.getLogger("e2e_dist.data")
T = TypeVar("T")
_MAGIC = re.compile(r"[*?[]")


class DataError(UserError):
    """Input data is missing, unreadable or too small; the message names the path."""


@dataclass(frozen=True)
class FileItem:
    uri: str
    """Absolute local path or `s3://bucket/key`: what `read_range` takes."""
    key: str
    """Path relative to the root it was listed from (POSIX): stable across machines, hashed."""
    size: int
    """Bytes, from the listing (no file is opened to learn it)."""
    mtime: float | None = None
    """Modification time from the listing (seconds), where known: part of cache keys, never of splits."""


# ------------------------------------------------------------------------------------ hashing
def unit_hash(*parts: Any) -> float:
    """A stable pseudo-random number in [0, 1) from `parts` (same on every machine and Python run)."""
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def row_seed(seed: int, key: str, copy: int) -> int:
    """The augmentation seed of copy `copy` of item `key` (63 bits, the same on every machine)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}:{copy}".encode()).digest()[:8], "little") >> 1


def seeded_order(items: Iterable[T], *, seed: int, key: Callable[[T], str] = lambda it: it.key) -> list[T]:
    """Items in a seeded pseudo-random order that depends only on each item's key."""
    return sorted(items, key=lambda it: (unit_hash("order", seed, key(it)), key(it), getattr(it, "uri", "")))


def split_by_hash(
    items: Sequence[T], *, val_fraction: float, seed: int, key: Callable[[T], str] = lambda it: it.key,
    min_val: int = 1,
) -> tuple[list[T], list[T]]:
    """(train, val), each in `seeded_order`: val = items whose split hash is below `val_fraction`.

    If that leaves fewer than `min_val` val items, the items with the next-smallest split hashes
    move to val (so val is never empty), as long as at least one train item remains.
    """
    ranked = sorted(items, key=lambda it: (unit_hash("split", seed, key(it)), key(it), getattr(it, "uri", "")))
    n_val = sum(unit_hash("split", seed, key(it)) < val_fraction for it in ranked)
    n_val = min(max(n_val, min_val), max(len(ranked) - 1, 0))
    return seeded_order(ranked[n_val:], seed=seed, key=key), seeded_order(ranked[:n_val], seed=seed, key=key)


def split_inside(units: str, count: int, share: float, val_fraction: float, measure: str) -> bool:
    """After a split of `count` whole units (files, row groups) that held out `share` of the data:
    whether to split inside each unit instead. Only when the share misses val_fraction by more than
    2x and there are too few units (under 2 / val_fraction) to come closer whole; with many, one
    warning naming both shares (of the `measure`: bytes, rows)."""
    if val_fraction / 2 <= share <= 2 * val_fraction:
        return False
    if count >= 2 / val_fraction:
        log.warning("data: the validation %s hold %.1f%% of the %s (data.val_fraction %.1f%%)", units, 100 * share,
                    measure, 100 * val_fraction)
        return False
    return True


def tail_sizes(sizes: Sequence[int], val_fraction: float) -> list[int]:
    """How much of each unit's end to hold out when splitting inside units: cumulative rounding, so
    the tails add up to val_fraction of the whole."""
    out, seen = [], 0
    for n in sizes:
        out.append(int((seen + n) * val_fraction) - int(seen * val_fraction))
        seen += n
    return out


def share_note(what: str, share: float, val_fraction: float, instead: str) -> None:
    """One line saying a split was made inside files/groups, because whole ones missed val_fraction by > 2x."""
    log.info("data: splitting %s whole would hold out %.1f%% for validation (data.val_fraction %.1f%%): held out %s "
             "instead", what, 100 * share, 100 * val_fraction, instead)


def take_fraction(ordered: Sequence[T], fraction: float) -> list[T]:
    """The first round(fraction * n) items (at least one) of an already seeded order: nested in fraction."""
    if not ordered:
        return []
    return list(ordered[: max(1, min(len(ordered), int(fraction * len(ordered) + 0.5)))])


# ------------------------------------------------------------------------------------ listing
def list_files(
    paths: Sequence[str], storage_cfg: Any = None, *, suffixes: Sequence[str] | None = None,
    strict: bool = False, field: str = "data.paths",
) -> list[FileItem]:
    """Every non-empty file under `paths`, sorted by uri and de-duplicated.

    Raises DataError (one line naming the path) when a path matches nothing; an unreadable local
    file is skipped with a warning, or raises when `strict`.
    """
    found: dict[str, FileItem] = {}
    for raw in paths:
        items = _list_remote(raw, storage_cfg, field) if is_remote(raw) else _list_local(raw, field, strict)
        if suffixes:
            items = [it for it in items if it.uri.lower().endswith(tuple(s.lower() for s in suffixes))]
        if not items:
            wanted = f" ending in {', '.join(suffixes)}" if suffixes else ""
            raise DataError(f"{field}: no files{wanted} matched {raw!r}")
        for it in items:
            found.setdefault(it.uri, it)
    return sorted(found.values(), key=lambda it: it.uri)


def _list_local(raw: str, field: str, strict: bool) -> list[FileItem]:
    path = absolute_path(raw)
    if _MAGIC.search(path):
        root = _glob_root(path)
        files = [p for p in glob.glob(path, recursive=True) if os.path.isfile(p)]
    elif os.path.isdir(path):
        root, files = path, walk_files(path)
    elif os.path.isfile(path):
        root, files = os.path.dirname(path), [path]
    else:
        raise DataError(f"{field}: no such file or directory: {raw}")
    out = []
    for p in files:
        try:
            st = os.stat(p)
            size, mtime = st.st_size, st.st_mtime
            readable = os.access(p, os.R_OK)
        except OSError:
            size, mtime, readable = 0, None, False
        if not readable:
            if strict:
                raise DataError(f"{field}: cannot read {p} (permission denied or vanished)")
            log.warning("skipping unreadable file %s", p)
            continue
        if size:
            out.append(FileItem(uri=p, key=os.path.relpath(p, root).replace(os.sep, "/"), size=size, mtime=mtime))
    return out


def walk_files(root: str, skip_dirs: Iterable[str] = ()) -> list[str]:
    """Files under `root`, recursively, skipping hidden entries and directories named in skip_dirs."""
    skip = set(skip_dirs)
    out = []
    def warn(e: OSError) -> None:
        log.warning("cannot list %s: %s", e.filename, e.strerror)

    for dirpath, dirnames, filenames in os.walk(root, onerror=warn):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in skip)
        out.extend(os.path.join(dirpath, f) for f in sorted(filenames) if not f.startswith("."))
    return out


def _glob_root(pattern: str) -> str:
    """The directory part of a glob before its first wildcard (keys are relative to it)."""
    parts = pattern.split("/")
    i = next(i for i, part in enumerate(parts) if _MAGIC.search(part))
    return "/".join(parts[:i]) or "/"


def glob_regex(pattern: str) -> re.Pattern:
    """Shell-glob -> regex on '/'-separated relative paths: `*`, `?`, `[..]` stay inside one path
    component, `**` spans directories; like glob, wildcards never match a leading '.'."""
    out, i, n = [], 0, len(pattern)
    while i < n:
        c = pattern[i]
        at_start = i == 0 or pattern[i - 1] == "/"
        if pattern.startswith("**/", i) and at_start:
            out.append(r"(?:[^/.][^/]*/)*")
            i += 3
        elif pattern.startswith("**", i) and at_start and i + 2 == n:
            out.append(r"(?:[^/.][^/]*/)*[^/.][^/]*")
            i += 2
        elif c == "*":
            out.append(r"(?!\.)[^/]*" if at_start else r"[^/]*")
            i += 1
        elif c == "?":
            out.append(r"[^/.]" if at_start else r"[^/]")
            i += 1
        elif c == "[" and "]" in pattern[i + 2:]:
            j = pattern.index("]", i + 2)
            body = pattern[i + 1: j]
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body.replace("\\", "\\\\")) + "]")
            i = j + 1
        else:
            out.append(re.escape(c))
            i += 1
    return re.compile("".join(out) + r"\Z")


def _list_remote(raw: str, storage_cfg: Any, field: str) -> list[FileItem]:
    import pyarrow.fs as pafs

    scheme_len = len("s3://")
    root = _glob_root(raw) if _MAGIC.search(raw[scheme_len:]) else None
    fs, base = resolve(root if root else raw, storage_cfg)
    base = base.rstrip("/")
    try:
        if root is None:
            info = fs.get_file_info(base)
            if info.type == pafs.FileType.File:
                return [FileItem(uri=raw, key=base.rsplit("/", 1)[-1], size=info.size, mtime=_seconds(info.mtime))
                        ] if info.size else []
            if info.type == pafs.FileType.NotFound:
                bucket = base.split("/", 1)[0]
                if base != bucket and fs.get_file_info(bucket).type == pafs.FileType.NotFound:
                    raise DataError(f"{field}: bucket {bucket} does not exist ({raw})")
                raise DataError(f"{field}: no such object or prefix: {raw}")
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    except DataError:
        raise
    except OSError as e:
        raise DataError(f"{field}: cannot list {raw}: {describe_error_at(raw, e, storage_cfg)}") from None
    rx = glob_regex(raw[len(root) + 1:]) if root else None
    out = []
    for info in infos:
        if info.type != pafs.FileType.File or not info.size:
            continue
        rel = info.path[len(base) + 1:]
        if rx is not None and not rx.match(rel):
            continue
        if rx is None and any(part.startswith(".") for part in rel.split("/")):
            continue  # like the local directory walk: hidden entries are not data
        out.append(FileItem(uri="s3://" + info.path, key=rel, size=info.size, mtime=_seconds(info.mtime)))
    return out


def _seconds(mtime) -> float | None:
    """pyarrow's FileInfo.mtime (a datetime, or None) as epoch seconds."""
    return mtime.timestamp() if mtime is not None else None


def read_many(uris: Sequence[Any], sizes: Sequence[Any], storage_cfg: Any) -> list[bytes | Exception]:
    """Whole files (each `sizes[i]` bytes), in order; a failed read is its exception. S3 objects are
    fetched 16 at a time (one GET each: in series, a task would wait a round trip per image)."""
    from concurrent.futures import ThreadPoolExecutor

    def one(i: int) -> bytes | Exception:
        try:
            return read_range(str(uris[i]), 0, int(sizes[i]), storage_cfg)
        except Exception as e:  # the caller decides: skip with a warning, or stop when strict
            return e

    if len(uris) > 1 and any(is_remote(str(u)) for u in uris):
        with ThreadPoolExecutor(max_workers=min(16, len(uris))) as pool:
            return list(pool.map(one, range(len(uris))))
    return [one(i) for i in range(len(uris))]


# ------------------------------------------------------------------------------------ bad items
# One policy for files a decoder cannot read (images, audio): a strict run stops on the first with
# one line naming it; otherwise the file is skipped with a warning, so one bad file costs one item.
# The strict pre-check ("scan") decodes everything once and collects every bad file instead.
def note_bad_item(bad: list[tuple[str, str]], what: str, uri: Any, error: Exception, *,
                  strict: bool, scan: bool) -> None:
    """Record `uri` (a `what`: "image", "audio") that failed with `error`, or raise when strict."""
    reason = (str(error).splitlines() or [type(error).__name__])[0]
    if strict and not scan:
        raise DataError(f"data: cannot decode {what} {uri}: {reason}") from None
    bad.append((str(uri), reason))
    if not scan:
        log.warning("skipping unreadable %s %s: %s", what, uri, reason)


def scan_batch(bad: list[tuple[str, str]]) -> dict:
    """A decoder's output in scan mode: only the bad files, as {uri, reason} columns."""
    import numpy as np

    return {"uri": np.array([u for u, _ in bad], dtype=object), "reason": np.array([r for _, r in bad], dtype=object)}


def raise_first_bad(scanned: list[dict], what: str) -> None:
    """DataError naming the first bad file (by uri) of a finished scan, and how many more; none: return."""
    if scanned:
        first = min(scanned, key=lambda r: r["uri"])
        more = f" (and {len(scanned) - 1} more bad files)" if len(scanned) > 1 else ""
        raise DataError(f"data: cannot decode {what} {first['uri']}: {first['reason']}{more}")


# ------------------------------------------------------------------------------------ Ray glue
def deterministic(ds):
    """Mark a Ray Dataset to keep block order (its own DataContext copy), and return it."""
    ds.context.execution_options.preserve_order = True
    return ds


def decoded_dataset(rows: list[dict], decode: Callable, *, name: str, rows_per_block: int, fn_kwargs: dict):
    """A Ray Dataset of file `rows` decoded in the pipeline by `decode` (a map_batches function).

    Decode tasks ask for 0 CPUs: the training workers may hold every CPU of a small machine, and a
    1-CPU task would then never be scheduled (the same choice as the text source's reads).
    """
    import math

    import ray.data

    blocks = max(1, math.ceil(len(rows) / rows_per_block))
    ds = ray.data.from_items(rows, override_num_blocks=blocks).map_batches(
        decode, batch_size=rows_per_block, batch_format="numpy", fn_kwargs=fn_kwargs,
        num_cpus=0, compute=ray.data.TaskPoolStrategy(size=min(2, blocks)),
    )
    ds.set_name(name)
    return deterministic(ds)


SMALL_INDEX_BYTES = 64 << 20
"""Shards holding less than this in all are indexed in threads on the driver: starting Ray Data's
task processes (each importing pyarrow and this package) costs seconds, reading a few MiB does not."""


def _per_shard(uri: str, fn: Callable[..., dict], kwargs: dict) -> tuple[dict | None, str]:
    """fn(uri, **kwargs), or the one-line error naming the shard."""
    try:
        return fn(uri, **kwargs), ""
    except DataError as e:
        return None, str(e)
    except Exception as e:  # a corrupt or unreadable shard: named, and the run stops
        return None, f"data.paths: cannot read shard {uri}: {(str(e).splitlines() or [type(e).__name__])[0]}"


def _per_shard_batch(batch: dict, *, fn: Callable[..., dict], kwargs: dict) -> dict:
    """Ray Data map_batches fn of `per_shard_in_tasks`: uris -> fn's result as JSON, or the one-line error."""
    import json

    import numpy as np

    done = [_per_shard(str(uri), fn, kwargs) for uri in batch["uri"]]
    return {"result": np.array([json.dumps(r) if r is not None else "" for r, _ in done], dtype=object),
            "error": np.array([e for _, e in done], dtype=object)}


def per_shard_in_tasks(files: Sequence[FileItem], fn: Callable[..., dict], **kwargs: Any) -> list[dict]:
    """`fn(uri, **kwargs)` (a JSON-able dict) for every shard, in `files` order: in Ray Data tasks (0
    CPUs, two per cluster CPU at once: reads, not compute), or in threads here when the shards are small (under
    SMALL_INDEX_BYTES in all). DataError naming the first bad shard (by uri) and how many more: fn's
    DataError as it is, any other exception as "cannot read shard"."""
    import json
    from concurrent.futures import ThreadPoolExecutor

    if not files:
        return []
    if sum(f.size for f in files) < SMALL_INDEX_BYTES:
        with ThreadPoolExecutor(max_workers=min(4, len(files))) as pool:
            done = list(pool.map(lambda f: _per_shard(f.uri, fn, kwargs), files))
    else:
        import ray
        import ray.data

        # Reads, not compute: two at a time per CPU of the cluster, on whichever nodes have room.
        width = min(len(files), max(4, 2 * int(ray.cluster_resources().get("CPU", 1))))
        ds = ray.data.from_items([{"uri": f.uri} for f in files], override_num_blocks=len(files)).map_batches(
            _per_shard_batch, batch_size=1, batch_format="numpy", fn_kwargs={"fn": fn, "kwargs": kwargs},
            num_cpus=0, compute=ray.data.TaskPoolStrategy(size=width))
        done = [(json.loads(r["result"]) if r["result"] else None, r["error"]) for r in deterministic(ds).take_all()]
    bad = sorted(e for _, e in done if e)
    if bad:
        raise DataError(bad[0] + (f" (and {len(bad) - 1} more bad shards)" if len(bad) > 1 else ""))
    return [r for r, _ in done]
