"""Bulk copies between a local directory and storage, with the size and sha256 of every file.

S3 goes through boto3's transfer manager (the package docstring says why, not pyarrow).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from e2e_dist.storage.clients import TRANSFER_THREADS, boto3_client, resolve
from e2e_dist.storage.error_messages import operation_error
from e2e_dist.storage.files import list_files
from e2e_dist.storage.uris import is_s3, join, split_s3

if TYPE_CHECKING:
    from e2e_dist.config import StorageConfig

_HASH_CHUNK = 8 << 20


@dataclass(frozen=True)
class FileEntry:
    """One file of a copied tree: posix path relative to the tree root, size in bytes, sha256 hex."""

    path: str
    size: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, "sha256": self.sha256}


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)  # hashlib releases the GIL on large buffers: hashing threads run in parallel
    return h.hexdigest()


def local_files(local_dir: str | os.PathLike) -> list[str]:
    """Relative posix paths of every file under `local_dir`, sorted."""
    root = Path(local_dir)
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def _transfer_config():
    from boto3.s3.transfer import TransferConfig

    # boto3's defaults (8 MiB chunks, 10 threads): bounded memory (~10 chunks in flight per file).
    return TransferConfig(max_concurrency=TRANSFER_THREADS, use_threads=True)


def upload_dir(local_dir: str | os.PathLike, uri: str, storage_cfg: StorageConfig | None = None, *,
               files: Iterable[str] | None = None) -> list[FileEntry]:
    """Copy every file of `local_dir` (or only `files`, relative paths) to `uri`; return their entries.

    Checksums are computed from the local bytes while the upload runs (separate threads), so the
    manifest describes exactly what was sent.
    """
    root = Path(local_dir)
    rels = sorted(files) if files is not None else local_files(root)
    return _upload([(root / r, r) for r in rels], uri, storage_cfg)


def upload_file(local_path: str | os.PathLike, uri: str, storage_cfg: StorageConfig | None = None) -> FileEntry:
    """Copy one local file to `uri` (an object key or a local file path)."""
    base, _, name = uri.rstrip("/").rpartition("/")
    (entry,) = _upload([(Path(local_path), name)], base, storage_cfg)
    return entry


def download_dir(uri: str, local_dir: str | os.PathLike, storage_cfg: StorageConfig | None = None, *,
                 files: Iterable[str] | None = None) -> list[FileEntry]:
    """Copy every file under `uri` (or only `files`, relative paths) into `local_dir`; return entries
    with the sizes and checksums of the bytes that arrived."""
    root = Path(local_dir)
    rels = sorted(files) if files is not None else sorted(list_files(uri, storage_cfg))
    return _download([(r, root / r) for r in rels], uri, storage_cfg)


def download_file(uri: str, local_path: str | os.PathLike, storage_cfg: StorageConfig | None = None) -> FileEntry:
    """Copy one object (or local file) at `uri` to `local_path`."""
    base, _, name = uri.rstrip("/").rpartition("/")
    (entry,) = _download([(name, Path(local_path))], base, storage_cfg)
    return entry


def _upload(pairs: list[tuple[Path, str]], uri: str, storage_cfg) -> list[FileEntry]:
    """(local file, key relative to `uri`) pairs -> entries of the local bytes sent."""
    try:
        sizes = [src.stat().st_size for src, _ in pairs]
    except OSError as e:
        raise operation_error("uploading", uri, e) from None
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="sha256") as hasher:
        digests = [hasher.submit(sha256_file, src) for src, _ in pairs]
        _copy([(rel, src) for src, rel in pairs], uri, storage_cfg, upload=True)
        return [FileEntry(rel, size, d.result()) for (_, rel), size, d in zip(pairs, sizes, digests)]


def _download(pairs: list[tuple[str, Path]], uri: str, storage_cfg) -> list[FileEntry]:
    """(key relative to `uri`, local file) pairs -> entries of the bytes that arrived."""
    for _, dst in pairs:
        dst.parent.mkdir(parents=True, exist_ok=True)
    _copy(pairs, uri, storage_cfg, upload=False)
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="sha256") as hasher:
        digests = list(hasher.map(lambda p: sha256_file(p[1]), pairs))
    return [FileEntry(rel, dst.stat().st_size, d) for (rel, dst), d in zip(pairs, digests)]


def _copy(pairs: list[tuple[str, Path]], uri: str, storage_cfg, *, upload: bool) -> None:
    """Copy (key relative to `uri`, local file) pairs to storage or from it; a failure is one
    StorageError naming the file it stopped at."""
    current = ""
    try:
        if is_s3(uri):
            from boto3.s3.transfer import create_transfer_manager

            bucket, prefix = split_s3(uri)
            with create_transfer_manager(boto3_client(storage_cfg), _transfer_config()) as tm:
                # All submitted at once: the manager runs them in parallel; then wait in order.
                futures = [(rel, tm.upload(str(local), bucket, _key(prefix, rel)) if upload
                            else tm.download(bucket, _key(prefix, rel), str(local))) for rel, local in pairs]
                for current, fut in futures:
                    fut.result()
        else:
            _, root = resolve(uri, storage_cfg)
            for current, local in pairs:
                stored = os.path.join(root, current)
                if upload:
                    os.makedirs(os.path.dirname(stored), exist_ok=True)
                    shutil.copyfile(local, stored)
                else:
                    shutil.copyfile(stored, local)
    except Exception as e:
        raise operation_error("uploading to" if upload else "downloading", join(uri, current), e, storage_cfg) from None


def _key(prefix: str, rel: str) -> str:
    return f"{prefix}/{rel}" if prefix else rel
