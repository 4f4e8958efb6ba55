"""The fail-fast access probe run before a run starts."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from e2e_dist.config import redact
from e2e_dist.errors import StorageError
from e2e_dist.storage.clients import boto3_client, resolve
from e2e_dist.storage.error_messages import describe_error
from e2e_dist.storage.uris import is_s3, split_s3

if TYPE_CHECKING:
    from e2e_dist.config import StorageConfig


def check_access(uri: str, storage_cfg: StorageConfig | None = None) -> None:
    """Fail fast (seconds) with one line if `uri` cannot be listed and written.

    Called before a run starts, so that bad credentials, a missing bucket or an unreachable
    endpoint are one clear line instead of a retry storm and a traceback deep inside Ray.
    """
    if not is_s3(uri):
        fs, path = resolve(uri, storage_cfg)
        probe = os.path.join(path, f".e2e-dist-access-{uuid.uuid4().hex}")
        try:
            os.makedirs(path, exist_ok=True)
            Path(probe).write_bytes(b"ok")
            os.remove(probe)
        except OSError as e:
            raise StorageError(f"storage path {uri}: not writable ({e.strerror or e})") from None
        return
    bucket, prefix = split_s3(uri)
    # Short connect timeout and two attempts: a dead endpoint costs seconds, not minutes.
    client = boto3_client(storage_cfg, connect_timeout=3.0, read_timeout=15.0, max_attempts=2, cached=False)
    probe = "/".join(p for p in (prefix, f".e2e-dist-access-{uuid.uuid4().hex}") if p)
    try:
        client.list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1)
        client.put_object(Bucket=bucket, Key=probe, Body=b"ok")
        client.delete_object(Bucket=bucket, Key=probe)
    except Exception as e:  # every cause becomes one line; the type decides the wording
        raise StorageError(f"storage path {redact(uri)}: {describe_error(e, storage_cfg)}") from None
