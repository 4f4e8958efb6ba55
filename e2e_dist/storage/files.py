"""Single objects and whole trees through `pyarrow.fs`: exists, read, write, list, delete, and the
byte ranges the data sources read."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow.fs as pafs

from e2e_dist.storage.clients import boto3_client, cached_s3_filesystem, resolve
from e2e_dist.storage.error_messages import operation_error
from e2e_dist.storage.uris import S3, is_s3, split_s3

if TYPE_CHECKING:
    from e2e_dist.config import StorageConfig


def exists(uri: str, storage_cfg: StorageConfig | None = None) -> bool:
    fs, path = resolve(uri, storage_cfg)
    try:
        return fs.get_file_info(path).type != pafs.FileType.NotFound
    except OSError as e:
        raise operation_error("checking", uri, e, storage_cfg) from None


def read_bytes(uri: str, storage_cfg: StorageConfig | None = None) -> bytes:
    fs, path = resolve(uri, storage_cfg)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except OSError as e:
        raise operation_error("reading", uri, e, storage_cfg) from None


def read_text(uri: str, storage_cfg: StorageConfig | None = None) -> str:
    return read_bytes(uri, storage_cfg).decode("utf-8")


def open_input_file(uri: str, storage_cfg: StorageConfig | None = None):
    """A seekable pyarrow file for `uri` (local or s3://; ranged GETs on S3). Raises OSError itself,
    like read_range."""
    if not is_s3(uri):
        import pyarrow as pa

        return pa.OSFile(uri, "rb")
    return cached_s3_filesystem(storage_cfg).open_input_file(uri[len(S3):])


def read_range(uri: str, offset: int, length: int, storage_cfg: StorageConfig | None = None) -> bytes:
    """Up to `length` bytes of `uri` (a local path or s3://) from `offset`, fewer if the file is shorter.

    Raises the OSError itself, not a StorageError: the data sources decide per item whether an
    unreadable file is skipped or stops the run.
    """
    if not is_s3(uri):
        with open(uri, "rb") as f:
            f.seek(offset)
            return f.read(length)
    with open_input_file(uri, storage_cfg) as f:
        return f.read_at(length, offset)


def write_bytes(uri: str, data: bytes, storage_cfg: StorageConfig | None = None) -> None:
    """Write a whole object. Local files are written to a temp file and renamed (atomic); an S3 PUT
    is atomic by itself (readers see the old object or the new one, never half)."""
    fs, path = resolve(uri, storage_cfg)
    try:
        if isinstance(fs, pafs.LocalFileSystem):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        else:
            # One PUT (pyarrow's output stream would take three requests: a multipart upload).
            bucket, key = split_s3(uri)
            boto3_client(storage_cfg).put_object(Bucket=bucket, Key=key, Body=data)
    except Exception as e:
        raise operation_error("writing", uri, e, storage_cfg) from None


def write_text(uri: str, text: str, storage_cfg: StorageConfig | None = None) -> None:
    write_bytes(uri, text.encode("utf-8"), storage_cfg)


def list_dir(uri: str, storage_cfg: StorageConfig | None = None) -> list[str]:
    """Names of the immediate children (files and directories), sorted; [] if `uri` does not exist."""
    fs, path = resolve(uri, storage_cfg)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=False))
    except OSError as e:
        raise operation_error("listing", uri, e, storage_cfg) from None
    return sorted({i.base_name for i in infos})


def list_files(uri: str, storage_cfg: StorageConfig | None = None) -> dict[str, int]:
    """Every file under `uri` (recursively) as {relative posix path: size}; {} if missing."""
    fs, path = resolve(uri, storage_cfg)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=True))
    except OSError as e:
        raise operation_error("listing", uri, e, storage_cfg) from None
    root = path.rstrip("/") + "/"
    return {i.path[len(root):]: i.size for i in infos if i.type == pafs.FileType.File and i.path.startswith(root)}


def delete_file(uri: str, storage_cfg: StorageConfig | None = None) -> None:
    """Delete one file; a missing one is fine."""
    if is_s3(uri):
        # Not pyarrow's delete_file: it writes a zero-byte 'parent/' marker object afterwards.
        bucket, key = split_s3(uri)
        try:
            if key:
                boto3_client(storage_cfg).delete_object(Bucket=bucket, Key=key)
        except Exception as e:
            raise operation_error("deleting", uri, e, storage_cfg) from None
        return
    fs, path = resolve(uri, storage_cfg)
    try:
        if fs.get_file_info(path).type == pafs.FileType.File:
            fs.delete_file(path)
    except OSError as e:
        raise operation_error("deleting", uri, e, storage_cfg) from None


def delete_tree(uri: str, storage_cfg: StorageConfig | None = None) -> None:
    """Delete a directory (or prefix) and everything under it; a missing one is fine."""
    if is_s3(uri):
        # Not pyarrow's delete_dir: it writes a zero-byte 'parent/' marker object afterwards.
        bucket, key = split_s3(uri)
        try:
            delete_s3_prefix(bucket, key, storage_cfg, include_key=True)
        except Exception as e:
            raise operation_error("deleting", uri, e, storage_cfg) from None
        return
    fs, path = resolve(uri, storage_cfg)
    try:
        kind = fs.get_file_info(path).type
        if kind == pafs.FileType.Directory:
            fs.delete_dir(path)
        elif kind == pafs.FileType.File:
            fs.delete_file(path)
    except OSError as e:
        raise operation_error("deleting", uri, e, storage_cfg) from None


def delete_s3_prefix(bucket: str, key: str, storage_cfg: StorageConfig | None = None, *,
                     include_key: bool) -> int:
    """Delete every object under `key/` (and the object `key` itself if `include_key`) with plain
    S3 calls, which never leave a 'directory' marker behind; returns how many keys were listed.

    Raises (the caller words it): a bucket-wide delete (empty `key`) is refused, and any key S3
    would not delete is an error.
    """
    key = key.strip("/")
    if not key:
        raise PermissionError(f"refusing to delete everything in bucket {bucket!r}")
    client = boto3_client(storage_cfg)
    batch: list[str] = [key] if include_key else []  # deleting a missing key is a no-op on S3
    listed = 0

    def flush() -> None:
        if not batch:
            return
        out = client.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True})
        if out.get("Errors"):
            err = out["Errors"][0]
            raise OSError(f"{err.get('Code', 'DeleteFailed')}: could not delete {err.get('Key')} "
                          f"({len(out['Errors'])} keys failed)")
        batch.clear()

    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key + "/"):
        for obj in page.get("Contents", []):
            listed += 1
            batch.append(obj["Key"])
            if len(batch) == 1000:  # the most one DeleteObjects takes
                flush()
    flush()
    return listed
