"""What a checkpoint looks like in storage, and how to tell a committed one from debris.

    <run_uri>/step_00000100/
        ds/...                    DeepSpeed's files from every rank (tag "ds")
        latest, zero_to_fp32.py   written by DeepSpeed's rank 0
        _parts/rank_00000.json    one per rank: the files that rank uploaded (path, size, sha256)
        manifest.json             written LAST by rank 0, once every rank's part is there

A directory without a manifest that parses and whose files all exist with the listed sizes is
not a checkpoint: it is what a crash, a dead endpoint or a lost race left behind.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from e2e_dist.errors import CheckpointError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PARTS_DIR = "_parts"
DS_TAG = "ds"
_STEP_DIR = re.compile(r"step_(\d{8,})")
_PART = re.compile(r"rank_(\d{5,})\.json")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def checkpoint_dir_name(step: int) -> str:
    """Directory name of the checkpoint taken after optimizer step `step`: sorts by step."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return f"step_{step:08d}"


def step_of(name: str) -> int | None:
    """Inverse of checkpoint_dir_name (None for anything else in a run directory)."""
    m = _STEP_DIR.fullmatch(name)
    return int(m.group(1)) if m and checkpoint_dir_name(int(m.group(1))) == name else None


def part_name(rank: int) -> str:
    return f"{PARTS_DIR}/rank_{rank:05d}.json"


def rank_of_part(name: str) -> int | None:
    m = _PART.fullmatch(name)
    return int(m.group(1)) if m else None


def now_utc() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class CommittedCheckpoint:
    """A checkpoint whose manifest parsed and whose files exist with the listed sizes."""

    uri: str
    step: int
    manifest: dict[str, Any]
    storage_cfg: Any = field(default=None, repr=False, compare=False)

    @property
    def name(self) -> str:
        return checkpoint_dir_name(self.step)

    @property
    def meta(self) -> dict[str, Any]:
        """What the training loop stored with it (run config, data position, model kind)."""
        return self.manifest.get("meta", {})

    @property
    def files(self) -> list[dict[str, Any]]:
        return self.manifest["files"]


@dataclass(frozen=True)
class CheckpointInfo:
    """One `step_*` directory of a run, committed or not, and why not."""

    step: int
    uri: str
    committed: bool
    reason: str
    """'' when committed; otherwise what is wrong (no manifest, missing file, size mismatch, ...)."""
    manifest: dict[str, Any] | None = field(default=None, repr=False)


def _check_files(files: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(files, list):
        raise CheckpointError(f"{where}: 'files' is not a list")
    out = []
    for f in files:
        ok = (isinstance(f, dict) and isinstance(f.get("path"), str) and f["path"]
              and not f["path"].startswith("/") and ".." not in f["path"].split("/")
              and isinstance(f.get("size"), int) and f["size"] >= 0
              and isinstance(f.get("sha256"), str) and _SHA256.fullmatch(f["sha256"]))
        if not ok:
            raise CheckpointError(f"{where}: bad file entry {str(f)[:120]}")
        out.append({"path": f["path"], "size": f["size"], "sha256": f["sha256"]})
    return out


def _load_json(text: str, where: str) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{where}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{where}: not a JSON object")
    if data.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{where}: unknown format_version {data.get('format_version')!r}")
    return data


def parse_manifest(text: str, *, step: int, where: str = MANIFEST) -> dict[str, Any]:
    """Validate a manifest's structure (not the files it lists); CheckpointError says what is wrong."""
    data = _load_json(text, where)
    if data.get("step") != step:
        raise CheckpointError(f"{where}: step {data.get('step')!r} does not match directory step {step}")
    if not isinstance(data.get("world_size"), int) or data["world_size"] < 1:
        raise CheckpointError(f"{where}: bad world_size {data.get('world_size')!r}")
    data["files"] = _check_files(data.get("files"), where)
    if not isinstance(data.get("meta", {}), dict):
        raise CheckpointError(f"{where}: 'meta' is not an object")
    return data


def parse_part(text: str, *, where: str) -> dict[str, Any]:
    data = _load_json(text, where)
    data["files"] = _check_files(data.get("files"), where)
    return data


def verify_listing(manifest: dict[str, Any], listing: dict[str, int]) -> str:
    """'' if every manifest file is in `listing` ({path: size}) with its size, else the first problem."""
    for f in manifest["files"]:
        size = listing.get(f["path"])
        if size is None:
            return f"file {f['path']} is missing"
        if size != f["size"]:
            return f"file {f['path']} has {size} bytes, manifest says {f['size']}"
    return ""
