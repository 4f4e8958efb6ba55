"""W&B's own offline files (`run-<id>.wandb`) read back: the one reader of the format.

The package needs it for `last_step_in_files` (what W&B already holds after a hard kill); the tests
read whole runs back with the rest. wandb 0.31 ships no reader (the Python
`wandb.sdk.internal.datastore` is gone; the writer lives in the Go `wandb-core` binary). The format,
checked against files that wandb 0.31 writes here, including records that span blocks:

* a 7-byte file header `<4sHB` = (b":W&B", 0xBEE1, 0);
* then a LevelDB-style log: 32 KiB blocks (the first one counted from file offset 0, so it holds
  the file header too) of chunks, each with a 7-byte header `<IHB` = (checksum, length, type),
  type FULL=1 / FIRST=2 / MIDDLE=3 / LAST=4; a block tail shorter than a chunk header is zero
  padding. The checksum is zlib's CRC-32 of the payload, seeded with the CRC-32 of the type byte
  (unlike LevelDB's masked CRC-32C);
* each reassembled record is a serialized `wandb.proto.wandb_internal_pb2.Record`.

Values in history/config/summary records are JSON strings (`value_json`) under a key path
(`nested_key`); the readers rebuild nested dicts from the paths (a logged image at "plots/curve"
comes back as `row["plots/curve"] == {"_type": "image-file", "path": ..., ...}`).
"""

from __future__ import annotations

import json
import re
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:
    from wandb.proto.wandb_internal_pb2 import Record

FILE_HEADER = struct.Struct("<4sHB")
FILE_MAGIC, FILE_VERSION = b":W&B", 0xBEE1
CHUNK_HEADER = struct.Struct("<IHB")
BLOCK_SIZE = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


class WandbFileError(ValueError):
    """The file is not a readable W&B transaction log (bad header, checksum, framing or record)."""


def last_step_in_files(wdir: Path, run_id: str) -> int | None:
    """The highest history `_step` in this run's local `.wandb` files, or None: the truth offline, as
    a hard-killed process (SIGKILL, OOM, dead Ray worker) loses what wandb-core had not flushed."""
    best: int | None = None
    for f in find_run_files(wdir, run_id):
        # Not strict: a killed session leaves a damaged tail, and the steps before it still count.
        for rec in read_records(f, strict=False):
            if rec.WhichOneof("record_type") == "history":
                step = next((int(json.loads(i.value_json)) for i in rec.history.item
                             if _item_path(i) == ["_step"]), rec.history.step.num)
                best = step if best is None else max(best, step)
    return best


def _chunk_crc(chunk_type: int, payload: bytes) -> int:
    return zlib.crc32(payload, zlib.crc32(bytes([chunk_type]))) & 0xFFFFFFFF


def _payloads(data: bytes, path: str | Path) -> Iterator[bytes]:
    """Whole record payloads in write order; WandbFileError at the first damage. A torn tail (a file
    still being written, or a crash mid-write) just ends the log."""
    if len(data) < FILE_HEADER.size:
        raise WandbFileError(f"{path}: too short for a W&B header")
    magic, version, _ = FILE_HEADER.unpack_from(data, 0)
    if magic != FILE_MAGIC or version != FILE_VERSION:
        raise WandbFileError(f"{path}: bad header {magic!r} {version:#x}")
    pos, pending = FILE_HEADER.size, None  # pending: payload parts of a FIRST..LAST record
    while pos < len(data):
        room = BLOCK_SIZE - pos % BLOCK_SIZE
        if room < CHUNK_HEADER.size:  # zero padding at a block's end
            pos += room
            continue
        if pos + CHUNK_HEADER.size > len(data):
            return  # torn header
        crc, length, ctype = CHUNK_HEADER.unpack_from(data, pos)
        start = pos + CHUNK_HEADER.size
        if length == 0 and ctype == 0:  # zero-filled rest of the block
            pos += room
            continue
        if length > room - CHUNK_HEADER.size:
            raise WandbFileError(f"{path}: chunk at {pos} runs past its block")
        payload = data[start : start + length]
        if len(payload) < length:
            return  # torn payload
        if _chunk_crc(ctype, payload) != crc:
            raise WandbFileError(f"{path}: checksum mismatch at offset {pos}")
        pos = start + length
        if ctype == FULL:
            pending = None
            yield payload
        elif ctype == FIRST:
            pending = [payload]
        elif ctype in (MIDDLE, LAST) and pending is not None:
            pending.append(payload)
            if ctype == LAST:
                yield b"".join(pending)
                pending = None
        elif ctype in (MIDDLE, LAST):
            raise WandbFileError(f"{path}: chunk type {ctype} without a FIRST at {pos}")
        else:
            raise WandbFileError(f"{path}: unknown chunk type {ctype} at {pos}")


def read_records(path: str | Path, *, strict: bool = True) -> list[Record]:
    """Every record of a `.wandb` file, in write order. A torn tail is dropped; other damage raises
    WandbFileError, or with strict=False ends the list (what came before it is kept)."""
    from wandb.proto import wandb_internal_pb2 as pb  # here: importing wandb costs a second

    records: list[Record] = []
    try:
        for payload in _payloads(Path(path).read_bytes(), path):
            rec = pb.Record()
            try:
                rec.ParseFromString(payload)
            except Exception as e:  # noqa: BLE001 - protobuf's DecodeError, or worse on garbage
                raise WandbFileError(f"{path}: record {len(records)} does not parse ({type(e).__name__})") from None
            records.append(rec)
    except WandbFileError:
        if strict:
            raise
    return records


def _item_path(item: Any) -> list[str]:
    # `nested_key` is a path: ["plots/curve", "_type"] is the "_type" field of the value at "plots/curve"
    # (a logged image, a nested dict). A "/" inside one part is part of the key, not a separator.
    return list(item.nested_key) if item.nested_key else [item.key]


def _item_value(item: Any) -> Any:
    return json.loads(item.value_json) if item.value_json else None


def _put(target: dict[str, Any], item: Any) -> None:
    *parents, leaf = _item_path(item)
    for part in parents:
        target = target.setdefault(part, {})
    target[leaf] = _item_value(item)


def _drop(target: dict[str, Any], item: Any) -> None:
    *parents, leaf = _item_path(item)
    for part in parents:
        target = target.get(part, {})
    target.pop(leaf, None)


def read_history(path: str | Path) -> list[dict[str, Any]]:
    """History rows in write order, each `{key: value, ..., "_step": int}`."""
    rows = []
    for rec in read_records(path):
        if rec.WhichOneof("record_type") != "history":
            continue
        row: dict[str, Any] = {}
        for it in rec.history.item:
            _put(row, it)
        if "_step" not in row and rec.history.HasField("step"):
            row["_step"] = rec.history.step.num
        rows.append(row)
    return rows


def read_config(path: str | Path) -> dict[str, Any]:
    """The run config as the file holds it: the run record's config, then later config updates."""
    cfg: dict[str, Any] = {}
    for rec in read_records(path):
        kind = rec.WhichOneof("record_type")
        updates = rec.run.config.update if kind == "run" else rec.config.update if kind == "config" else []
        removes = rec.config.remove if kind == "config" else []
        for it in updates:
            _put(cfg, it)
        for it in removes:
            _drop(cfg, it)
    return cfg


def read_summary(path: str | Path) -> dict[str, Any]:
    """The run summary: explicit summary updates in write order (last one wins per key)."""
    out: dict[str, Any] = {}
    for rec in read_records(path):
        if rec.WhichOneof("record_type") == "summary":
            for it in rec.summary.update:
                _put(out, it)
            for it in rec.summary.remove:
                _drop(out, it)
    return out


@dataclass
class RunInfo:
    """What the run record says about the run."""

    run_id: str
    project: str
    entity: str
    group: str
    name: str
    tags: list[str] = field(default_factory=list)
    resume: bool = False
    """The session asked to continue an existing run (`resume=...`): `wandb sync` then appends to it."""


def read_run(path: str | Path) -> RunInfo:
    """The first run record of the file (offline files hold exactly one)."""
    for rec in read_records(path):
        if rec.WhichOneof("record_type") == "run":
            r = rec.run
            return RunInfo(r.run_id, r.project, r.entity, r.run_group, r.display_name, list(r.tags), r.resume)
    raise WandbFileError(f"{path}: no run record")


def find_run_files(wandb_dir: str | Path, run_id: str | None = None) -> list[Path]:
    """`.wandb` files under a W&B directory (the `wandb/` folder or its parent), oldest first.

    A resumed offline run writes a new `offline-run-<time>-<id>[-suffix]/` folder each session,
    so one run id may have several files; the order is by folder time stamp (then name), which is
    the session order.
    """
    root = Path(wandb_dir)
    if (root / "wandb").is_dir() and not any(root.glob("*run-*/run-*.wandb")):
        root = root / "wandb"
    files = [p for p in root.glob("*run-*/run-*.wandb") if run_id is None or p.name == f"run-{run_id}.wandb"]

    def order(p: Path) -> tuple[str, float, str]:
        # folder: "<offline-run|run>-YYYYmmdd_HHMMSS-<id>[-suffix]"; the time stamp has 1 s resolution,
        # so ties (two sessions in one second) fall back to the file's mtime.
        m = re.search(r"-(\d{8}_\d{6})-", p.parent.name)
        return (m.group(1) if m else "", p.stat().st_mtime, p.parent.name)

    return sorted(files, key=order)


def read_table(run_file: str | Path, ref: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows of a `wandb.Table` that a summary/history value `ref` (`{"_type": "table-file", "path": ...}`)
    points to; the table JSON lives in the run folder's `files/`."""
    if not isinstance(ref, dict) or ref.get("_type") != "table-file":
        raise WandbFileError(f"not a table reference: {ref!r}")
    table = json.loads((Path(run_file).parent / "files" / ref["path"]).read_text())
    return [dict(zip(table["columns"], row)) for row in table["data"]]
