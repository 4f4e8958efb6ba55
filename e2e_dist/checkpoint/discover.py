"""Finding the newest committed checkpoint in storage itself, and bringing it home verified.

Resume never asks Ray which checkpoint it last recorded: with ray 2.60 a worker crash shortly after
`report` can lose that record while the files stay in storage. Storage is the source of truth, and
the manifest is what makes a directory count.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

from e2e_dist import storage
from e2e_dist.checkpoint.layout import (
    MANIFEST, CheckpointInfo, CommittedCheckpoint, checkpoint_dir_name, parse_manifest, step_of, verify_listing,
)
from e2e_dist.errors import CheckpointError


def scan(run_uri: str, storage_cfg: Any = None, *, check_files: bool = True) -> Iterator[CheckpointInfo]:
    """Every `step_*` directory of a run, newest first, with its commit status.

    check_files=False only parses manifests (what pruning needs); True also checks that every listed
    file exists with its size (one listing per checkpoint, no data read).
    """
    steps = sorted((s for s in map(step_of, storage.list_dir(run_uri, storage_cfg)) if s is not None), reverse=True)
    for step in steps:
        uri = storage.join(run_uri, checkpoint_dir_name(step))
        yield inspect(uri, step, storage_cfg, check_files=check_files)


def inspect(uri: str, step: int, storage_cfg: Any = None, *, check_files: bool = True) -> CheckpointInfo:
    """Commit status of one checkpoint directory."""
    listing = storage.list_files(uri, storage_cfg) if check_files else None
    if listing is not None and MANIFEST not in listing:
        return CheckpointInfo(step, uri, False, "no manifest.json (upload never committed)")
    try:
        manifest = parse_manifest(storage.read_text(storage.join(uri, MANIFEST), storage_cfg), step=step)
    except CheckpointError as e:
        return CheckpointInfo(step, uri, False, str(e))
    except storage.StorageError as e:
        if not storage.exists(storage.join(uri, MANIFEST), storage_cfg):
            return CheckpointInfo(step, uri, False, "no manifest.json (upload never committed)")
        raise e
    problem = verify_listing(manifest, listing) if listing is not None else ""
    if problem:
        return CheckpointInfo(step, uri, False, problem, manifest)
    return CheckpointInfo(step, uri, True, "", manifest)


def list_checkpoints(run_uri: str, storage_cfg: Any = None, *, verify_checksums: bool = False,
                     ) -> list[CheckpointInfo]:
    """All checkpoint directories of a run, newest first (for `e2e-dist checkpoints RUN_URI`).

    verify_checksums: also read every committed checkpoint's files and compare sha256 (what resume
    does before trusting one); a corrupt one is listed as not committed, with `corrupt` set."""
    infos = list(scan(run_uri, storage_cfg))
    if not verify_checksums:
        return infos
    checked = []
    for info in infos:
        bad = info.committed and _first_bad_checksum(
            CommittedCheckpoint(info.uri, info.step, info.manifest or {}, storage_cfg), storage_cfg)
        checked.append(CheckpointInfo(info.step, info.uri, False, bad, info.manifest, corrupt=True) if bad else info)
    return checked


def find_latest_committed(run_uri: str, storage_cfg: Any = None, *, verify_checksums: bool = False,
                          ) -> tuple[CommittedCheckpoint | None, list[str]]:
    """The newest checkpoint that verifies, and one message per newer directory it skipped.

    Verification reads no data by default (manifest parses, every file present with its size);
    verify_checksums=True also reads every file and compares sha256 (a full download for S3).
    """
    skipped: list[str] = []
    for info in scan(run_uri, storage_cfg):
        if not info.committed:
            skipped.append(f"skipped {info.uri}: {info.reason}")
            continue
        ckpt = CommittedCheckpoint(info.uri, info.step, info.manifest or {}, storage_cfg)
        if verify_checksums:
            bad = _first_bad_checksum(ckpt, storage_cfg)
            if bad:
                skipped.append(f"skipped {info.uri}: {bad}")
                continue
        return ckpt, skipped
    return None, skipped


def _first_bad_checksum(ckpt: CommittedCheckpoint, storage_cfg: Any) -> str:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="e2e-verify-") as tmp:
        try:
            download_checkpoint(ckpt, Path(tmp), verify=True, storage_cfg=storage_cfg)
        except CheckpointError as e:
            return str(e).removeprefix(f"checkpoint {ckpt.uri}: ")
    return ""


def download_checkpoint(ckpt: CommittedCheckpoint, local_dir: Path, verify: bool = True, *,
                        storage_cfg: Any = None, only: Collection[str] | None = None) -> Path:
    """Copy the manifest's files (or `only` those of them: what one node's ranks load, see needs.py)
    and the manifest into `local_dir`; with verify, every file's size and sha256 must match the
    manifest, or CheckpointError names the first bad file."""
    cfg = storage_cfg if storage_cfg is not None else ckpt.storage_cfg
    local_dir = Path(local_dir)
    local_dir.mkdir(parents=True, exist_ok=True)
    expected = {f["path"]: f for f in ckpt.files}
    if only is not None:
        unknown = sorted(set(only) - set(expected))
        if unknown:
            raise CheckpointError(f"checkpoint {ckpt.uri}: {unknown[0]} is not in its manifest")
    got = storage.download_dir(ckpt.uri, local_dir, cfg, files=sorted(only) if only is not None else list(expected))
    if verify:
        for entry in got:
            want = expected[entry.path]
            if entry.size != want["size"]:
                raise CheckpointError(f"checkpoint {ckpt.uri}: {entry.path} has {entry.size} bytes, manifest says {want['size']}")
            if entry.sha256 != want["sha256"]:
                raise CheckpointError(f"checkpoint {ckpt.uri}: {entry.path} is corrupt "
                                      f"(sha256 {entry.sha256[:12]}... != manifest {want['sha256'][:12]}...)")
    (local_dir / MANIFEST).write_text(json.dumps(ckpt.manifest, indent=1))
    return local_dir


def restore_latest(run_uri: str, storage_cfg: Any, local_dir: Path, *, step: int | None = None,
                   ) -> tuple[CommittedCheckpoint | None, Path | None, list[str]]:
    """Download the newest committed checkpoint that also passes checksums, falling back to older ones.

    Returns (checkpoint, local copy under `local_dir`, messages about every newer directory skipped),
    or (None, None, messages) when nothing usable exists. `step` restricts it to that one step (so
    that every rank restores the checkpoint rank 0 chose). Storage errors (endpoint down) raise:
    falling back to an older checkpoint, or to none, because S3 blinked would silently lose work.
    """
    messages: list[str] = []
    for info in scan(run_uri, storage_cfg):
        if step is not None and info.step != step:
            continue
        if not info.committed:
            messages.append(f"skipped {info.uri}: {info.reason}")
            continue
        ckpt = CommittedCheckpoint(info.uri, info.step, info.manifest or {}, storage_cfg)
        target = Path(local_dir) / ckpt.name
        shutil.rmtree(target, ignore_errors=True)
        try:
            return ckpt, download_checkpoint(ckpt, target, verify=True, storage_cfg=storage_cfg), messages
        except CheckpointError as e:
            messages.append(f"skipped {info.uri}: {str(e).removeprefix(f'checkpoint {info.uri}: ')}")
            shutil.rmtree(target, ignore_errors=True)
    if step is not None and not messages:
        messages.append(f"no checkpoint for step {step} under {run_uri}")
    return None, None, messages
