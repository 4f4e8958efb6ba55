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

import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from e2e_dist.errors import CheckpointError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PARTS_DIR = "_parts"
DS_TAG = "ds"
_STEP_DIR = re.compile(r"step_(\d{8,})")
_PART = re.compile(r"rank_(\d{5,})\.json")


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
    corrupt: bool = False
    """Committed, but a file's bytes no longer match the manifest's sha256 (checked on request)."""


class ListedFile(BaseModel):
    """One file of a checkpoint, as a part file or the manifest lists it."""

    # strict: a size of "12" or 12.0 means the writer is broken, not that it wants converting;
    # extra keys are dropped so that every entry reads back as exactly these three.
    model_config = ConfigDict(strict=True, extra="ignore")

    path: str
    """POSIX path relative to the checkpoint directory: downloads join it under a local root."""
    size: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")

    @field_validator("path")
    @classmethod
    def _stays_inside(cls, path: str) -> str:
        # An absolute or `..` path would make a restore write outside its target directory.
        if not path or path.startswith("/") or ".." in path.split("/"):
            raise ValueError("not a relative path inside the checkpoint")
        return path

    @model_validator(mode="wrap")
    @classmethod
    def _whole_entry(cls, data: Any, handler: Any) -> ListedFile:
        # Name the whole entry in the error: its path says which file, the rest what is wrong with it.
        try:
            return handler(data)
        except ValidationError:
            raise ValueError(f"bad file entry {str(data)[:120]}") from None


class PartFile(BaseModel):
    """`_parts/rank_NNNNN.json`: the files one rank uploaded. Other keys (step, save_id, world_size,
    rank) are kept for the committer, which checks them against the save it is committing."""

    model_config = ConfigDict(strict=True, extra="allow")

    format_version: Literal[1]  # = FORMAT_VERSION: a newer writer's layout is refused, not misread
    files: list[ListedFile]


class Manifest(BaseModel):
    """`manifest.json`. Fields are declared in the order they are checked (pydantic reports errors in
    that order, and the message names the first); other keys (zero_stage, save_id, created_at) are kept."""

    model_config = ConfigDict(strict=True, extra="allow")

    format_version: Literal[1]  # = FORMAT_VERSION
    step: int
    world_size: int = Field(ge=1)
    files: list[ListedFile]
    meta: dict[str, Any] = {}
    """What the training loop stored with it (run config, data position, model kind)."""

    @field_validator("step")
    @classmethod
    def _matches_directory(cls, step: int, info: ValidationInfo) -> int:
        # A manifest copied into the wrong step directory would restore the wrong state.
        if info.context and step != info.context["step"]:
            raise ValueError("does not match the directory")
        return step


# The one-line phrase for a problem with each top-level field; `value` is what the file holds there.
_PROBLEMS = {
    "format_version": "unknown format_version {value!r}",
    "step": "step {value!r} does not match directory step {step}",
    "world_size": "bad world_size {value!r}",
    "files": "'files' is not a list",
    "meta": "'meta' is not an object",
}


def _problem(err: ValidationError, step: int | None) -> str:
    """The first problem pydantic found, worded as one line (most files have a single one)."""
    first = err.errors(include_url=False)[0]
    loc, kind = first["loc"], first["type"]
    if kind == "json_invalid":
        return f"not valid JSON ({first['ctx']['error']})"
    if not loc:
        return "not a JSON object"
    if loc[0] == "files" and len(loc) > 1:
        return str(first["ctx"]["error"])  # ListedFile's own message (see _whole_entry)
    value = None if kind == "missing" else first["input"]
    phrase = _PROBLEMS.get(str(loc[0]), f"bad {loc[0]} {{value!r}}")
    return phrase.format(value=value, step=step)


def validate_json(model: type[BaseModel], text: str, where: str, step: int | None = None) -> dict[str, Any]:
    try:
        doc = model.model_validate_json(text, context={"step": step} if step is not None else None)
    except ValidationError as e:
        raise CheckpointError(f"{where}: {_problem(e, step)}") from None
    # exclude_unset: a manifest without `meta` reads back without it, as it was written.
    return doc.model_dump(exclude_unset=True)


def parse_manifest(text: str, *, step: int, where: str = MANIFEST) -> dict[str, Any]:
    """Validate a manifest's structure (not the files it lists); CheckpointError says what is wrong."""
    return validate_json(Manifest, text, where, step)


def parse_part(text: str, *, where: str) -> dict[str, Any]:
    return validate_json(PartFile, text, where)


def verify_listing(manifest: dict[str, Any], listing: dict[str, int]) -> str:
    """'' if every manifest file is in `listing` ({path: size}) with its size, else the first problem."""
    for f in manifest["files"]:
        size = listing.get(f["path"])
        if size is None:
            return f"file {f['path']} is missing"
        if size != f["size"]:
            return f"file {f['path']} has {size} bytes, manifest says {f['size']}"
    return ""
