"""The two storage clients and the rules they share: endpoint and region from the config or the AWS
environment, credentials only from the standard AWS chain.

`pyarrow.fs` (via `resolve`) serves metadata and small files; the boto3 client serves single PUTs,
deletes, the access probe and the transfer manager's bulk copies. What Ray Train gets is in `ray_fs`.
"""

from __future__ import annotations

import hashlib
import os
import threading
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import pyarrow.fs as pafs

from e2e_dist.config import absolute_path, redact
from e2e_dist.errors import StorageError
from e2e_dist.storage.uris import is_s3, split_s3

if TYPE_CHECKING:
    from e2e_dist.config import StorageConfig

TRANSFER_THREADS = 10  # boto3's default concurrency; what the benchmark compares against


def endpoint_url(storage_cfg: StorageConfig | None = None) -> str | None:
    return (getattr(storage_cfg, "endpoint_url", None) or os.environ.get("AWS_ENDPOINT_URL") or None)


def region(storage_cfg: StorageConfig | None = None) -> str | None:
    configured = getattr(storage_cfg, "region", None) or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    # S3-compatible stores rarely care, but the SDKs need *some* region to sign requests.
    return configured or ("us-east-1" if endpoint_url(storage_cfg) else None)


def s3_filesystem(storage_cfg: StorageConfig | None = None, *, connect_timeout: float = 5.0,
                  max_attempts: int = 3, background_writes: bool = True) -> pafs.S3FileSystem:
    """pyarrow's S3 filesystem with our endpoint/region rules; credentials from the AWS chain.

    Never call its create_dir / delete_file / delete_dir / move on S3: each writes zero-byte
    'dir/' marker objects (see `ray_fs`); the `files` helpers delete with plain S3 calls.
    """
    kwargs: dict[str, Any] = {
        "region": region(storage_cfg),
        "connect_timeout": connect_timeout,
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=max_attempts),
        "background_writes": background_writes,
    }
    endpoint = endpoint_url(storage_cfg)
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        kwargs["endpoint_override"] = parsed.netloc.rpartition("@")[2] + parsed.path.rstrip("/")
        kwargs["scheme"] = parsed.scheme or "https"
    return pafs.S3FileSystem(**kwargs)


def resolve(uri: str, storage_cfg: StorageConfig | None = None) -> tuple[pafs.FileSystem, str]:
    """URI -> (filesystem, path on it). Local paths become absolute; s3 paths lose the scheme."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        return s3_filesystem(storage_cfg), f"{bucket}/{key}".rstrip("/")
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    elif "://" in uri:
        raise StorageError(f"unsupported storage URI {redact(uri)!r} (use a local path or s3://bucket/prefix)")
    return pafs.LocalFileSystem(), absolute_path(uri)


_client_lock = threading.Lock()
_clients: dict[tuple, Any] = {}
_filesystems: dict[tuple, pafs.S3FileSystem] = {}


def _client_key(storage_cfg: StorageConfig | None) -> tuple[str | None, str | None, str]:
    """What a cached client depends on: endpoint, region and the credential chain's inputs.

    Credentials are resolved when a client is built: keying on the chain's inputs (hashed, so no
    secret sits in a dict key) picks up a changed environment.
    """
    chain = hashlib.sha256("\0".join(os.environ.get(k, "") for k in (
        "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")).encode()).hexdigest()
    return endpoint_url(storage_cfg), region(storage_cfg), chain


def cached_s3_filesystem(storage_cfg: StorageConfig | None = None) -> pafs.S3FileSystem:
    """`s3_filesystem` built once per endpoint, region and credentials in this process: data workers
    read many small ranges, and each new filesystem looks the credentials up again."""
    key = _client_key(storage_cfg)
    with _client_lock:
        if key not in _filesystems:
            _filesystems[key] = s3_filesystem(storage_cfg)
        return _filesystems[key]


def boto3_client(storage_cfg: StorageConfig | None = None, *, connect_timeout: float = 5.0,
                 read_timeout: float = 60.0, max_attempts: int = 3, cached: bool = True):
    """A boto3 S3 client with our endpoint/region rules (cached: clients are thread-safe, slow to build)."""
    import boto3
    from botocore.config import Config

    endpoint, reg = endpoint_url(storage_cfg), region(storage_cfg)
    key = (*_client_key(storage_cfg), connect_timeout, read_timeout, max_attempts)
    with _client_lock:
        if cached and key in _clients:
            return _clients[key]
        config = Config(connect_timeout=connect_timeout, read_timeout=read_timeout,
                        retries={"mode": "standard", "total_max_attempts": max_attempts},
                        max_pool_connections=2 * TRANSFER_THREADS + 4)
        # A private Session: the default one is not thread-safe to build clients from.
        client = boto3.session.Session().client("s3", endpoint_url=endpoint, region_name=reg, config=config)
        if cached:
            _clients[key] = client
        return client
