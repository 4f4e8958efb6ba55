"""What W&B already holds locally: the last history step in a run's own `.wandb` transaction logs."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path
from typing import Iterator


def last_step_in_files(wdir: Path, run_id: str) -> int | None:
    """The highest history `_step` in this run's local `.wandb` files, or None: the truth offline, as
    a hard-killed process (SIGKILL, OOM, dead Ray worker) loses what wandb-core had not flushed."""
    from wandb.proto import wandb_internal_pb2 as pb

    best: int | None = None
    for f in wdir.glob(f"*run-*-{run_id}*/run-{run_id}.wandb"):
        for payload in _log_payloads(f.read_bytes()):
            rec = pb.Record()
            try:
                rec.ParseFromString(payload)
            except Exception:  # noqa: BLE001 - damaged record: keep what was read before it
                break
            if rec.WhichOneof("record_type") == "history":
                step = next((int(json.loads(i.value_json)) for i in rec.history.item
                             if (list(i.nested_key) or [i.key]) == ["_step"]), rec.history.step.num)
                best = step if best is None else max(best, step)
    return best


def _log_payloads(data: bytes) -> Iterator[bytes]:
    """Whole records of a W&B transaction log: 7-byte file header, 32 KiB blocks of chunks with a
    `<IHB` (crc32 seeded with the type byte, length, FULL/FIRST/MIDDLE/LAST) header."""
    if data[:4] != b":W&B":
        return
    pos, parts = 7, []
    while pos + 7 <= len(data):
        room = 32768 - pos % 32768
        crc, length, ctype = struct.unpack_from("<IHB", data, pos) if room >= 7 else (0, 0, 0)
        if ctype == 0 and length == 0:  # block tail padding
            pos += room
            continue
        payload = data[pos + 7: pos + 7 + length]
        if len(payload) < length or zlib.crc32(payload, zlib.crc32(bytes([ctype]))) != crc:
            return
        pos += 7 + length
        if ctype == 1:
            yield payload
        elif ctype == 2:
            parts = [payload]
        elif ctype in (3, 4) and parts:
            parts.append(payload)
            if ctype == 4:
                yield b"".join(parts)
                parts = []
        else:
            return
