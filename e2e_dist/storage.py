"""Where runs live: a local directory or `s3://bucket/prefix`, behind one small API.

Two clients, one set of rules (endpoint from `storage.endpoint_url` or AWS_ENDPOINT_URL, region from
`storage.region` or AWS_REGION / AWS_DEFAULT_REGION, credentials only from the standard AWS chain):

- `pyarrow.fs` for metadata and small files, because it is what Ray Train writes with and it treats
  local paths and S3 alike;
- boto3's transfer manager for bulk copies, because it uploads and downloads in parallel multipart
  chunks with *bounded* memory (pyarrow's background writes buffer a whole file in RAM) and was the
  faster of the two against S3 here.

Every failure leaves as a one-line `StorageError` that names the URI and the cause, never a secret.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable
from urllib.parse import urlparse

import pyarrow.fs as pafs

from e2e_dist.config import redact
from e2e_dist.errors import StorageError

if TYPE_CHECKING:
    from e2e_dist.config import StorageConfig

S3 = "s3://"
_HASH_CHUNK = 8 << 20
_TRANSFER_THREADS = 10  # boto3's default concurrency; what the benchmark compares against


# ------------------------------------------------------------------------------- URIs and clients
def is_s3(uri: str) -> bool:
    return uri.startswith(S3)


def join(uri: str, *parts: str) -> str:
    """`join("s3://b/run", "step_1", "x")` -> "s3://b/run/step_1/x" (posix joins for local paths too)."""
    out = uri.rstrip("/")
    for p in parts:
        p = p.strip("/")
        if p:
            out = f"{out}/{p}"
    return out


def split_s3(uri: str) -> tuple[str, str]:
    """"s3://bucket/a/b" -> ("bucket", "a/b")."""
    rest = uri[len(S3):].strip("/")
    bucket, _, key = rest.partition("/")
    if len(bucket) < 3:
        raise StorageError(f"bad S3 URI {uri!r}: bucket name must have at least 3 characters")
    return bucket, key


def endpoint_url(storage_cfg: StorageConfig | None = None) -> str | None:
    return (getattr(storage_cfg, "endpoint_url", None) or os.environ.get("AWS_ENDPOINT_URL") or None)


def region(storage_cfg: StorageConfig | None = None) -> str | None:
    configured = getattr(storage_cfg, "region", None) or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    # S3-compatible stores rarely care, but the SDKs need *some* region to sign requests.
    return configured or ("us-east-1" if endpoint_url(storage_cfg) else None)


def s3_filesystem(storage_cfg: StorageConfig | None = None, *, connect_timeout: float = 5.0,
                  max_attempts: int = 3) -> pafs.S3FileSystem:
    """pyarrow's S3 filesystem with our endpoint/region rules; credentials from the AWS chain."""
    kwargs: dict[str, Any] = {
        "region": region(storage_cfg),
        "connect_timeout": connect_timeout,
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=max_attempts),
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
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


def ray_storage_kwargs(storage_path: str, storage_cfg: StorageConfig | None = None) -> dict[str, Any]:
    """`storage_path` / `storage_filesystem` for `ray.train.RunConfig`.

    With an explicit filesystem Ray wants the path *without* the scheme (ray 2.60 fails with
    ArrowInvalid on 's3:/bucket' otherwise), so S3 gets ("bucket/prefix", our S3FileSystem).
    """
    fs, path = resolve(storage_path, storage_cfg)
    if is_s3(storage_path):
        return {"storage_path": path, "storage_filesystem": fs}
    return {"storage_path": path}


_client_lock = threading.Lock()
_clients: dict[tuple, Any] = {}


def boto3_client(storage_cfg: StorageConfig | None = None, *, connect_timeout: float = 5.0,
                 read_timeout: float = 60.0, max_attempts: int = 3, cached: bool = True):
    """A boto3 S3 client with our endpoint/region rules (cached: clients are thread-safe, slow to build)."""
    import boto3
    from botocore.config import Config

    endpoint, reg = endpoint_url(storage_cfg), region(storage_cfg)
    # Credentials are resolved when a client is built: key the cache on the chain's inputs (hashed,
    # so no secret sits in a dict key) to pick up a changed environment.
    chain = hashlib.sha256("\0".join(os.environ.get(k, "") for k in (
        "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")).encode()).hexdigest()
    key = (endpoint, reg, connect_timeout, read_timeout, max_attempts, chain)
    with _client_lock:
        if cached and key in _clients:
            return _clients[key]
        config = Config(connect_timeout=connect_timeout, read_timeout=read_timeout,
                        retries={"mode": "standard", "total_max_attempts": max_attempts},
                        max_pool_connections=2 * _TRANSFER_THREADS + 4)
        # A private Session: the default one is not thread-safe to build clients from.
        client = boto3.session.Session().client("s3", endpoint_url=endpoint, region_name=reg, config=config)
        if cached:
            _clients[key] = client
        return client


# ------------------------------------------------------------------------------------- errors
_CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidClientTokenId", "ExpiredToken",
                     "InvalidToken", "AuthFailure", "UnrecognizedClientException", "INVALID_ACCESS_KEY_ID",
                     "SIGNATURE_DOES_NOT_MATCH"}
_REGION_CODES = {"PermanentRedirect", "AuthorizationHeaderMalformed", "IllegalLocationConstraintException"}
# Names pyarrow puts in its OSError text ("AWS Error ACCESS_DENIED during ..."), most specific first.
_PYARROW_CODES = ("INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT_MATCH", "NO_SUCH_BUCKET", "NETWORK_CONNECTION",
                  "ACCESS_DENIED", "RESOURCE_NOT_FOUND")


def describe_error(exc: BaseException, storage_cfg: StorageConfig | None = None) -> str:
    """A short, secret-free cause for a storage exception (boto3, pyarrow or OS)."""
    import botocore.exceptions as bex

    unreachable = f"S3 endpoint {redact(endpoint_url(storage_cfg) or 'AWS S3')} unreachable"
    if isinstance(exc, bex.NoCredentialsError):
        return "no AWS credentials found (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or an instance role)"
    if isinstance(exc, (bex.EndpointConnectionError, bex.ConnectTimeoutError, bex.ReadTimeoutError,
                        bex.ConnectionClosedError)):
        return f"{unreachable} ({type(exc).__name__})"
    if isinstance(exc, bex.ClientError):
        err = exc.response.get("Error", {})
        code, message = str(err.get("Code", "")), str(err.get("Message") or type(exc).__name__).splitlines()[0]
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    else:  # pyarrow raises OSError whose text carries the AWS error name
        text = (str(exc).strip() or type(exc).__name__).splitlines()[0]
        code, message, status = next((c for c in _PYARROW_CODES if c in text), ""), text, None
        if code == "NETWORK_CONNECTION":
            return f"{unreachable} ({code})"
        if not code and isinstance(exc, FileNotFoundError):
            return "not found"
        if not code and isinstance(exc, PermissionError):
            return f"permission denied ({exc.filename or text})"
    if code in _CREDENTIAL_CODES:
        return (f"credentials rejected ({code}); check the AWS credential chain "
                "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE)")
    if code in ("NoSuchBucket", "NO_SUCH_BUCKET"):
        return "bucket does not exist"
    if code in ("NoSuchKey", "404", "RESOURCE_NOT_FOUND") or status == 404:
        return "not found (404)"
    if code in _REGION_CODES:
        return f"bucket is in another region ({code}); set storage.region"
    if code in ("AccessDenied", "403", "AllAccessDisabled", "ACCESS_DENIED"):
        return "access denied (the credentials lack permission for this bucket/prefix)"
    return redact(f"{code + ': ' if code else ''}{message}"[:300])


def _fail(op: str, uri: str, exc: BaseException, storage_cfg=None) -> StorageError:
    return StorageError(f"{op} {redact(uri)}: {describe_error(exc, storage_cfg)}")


# ----------------------------------------------------------------------------- access check
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


# ------------------------------------------------------------------------------ small helpers
def exists(uri: str, storage_cfg: StorageConfig | None = None) -> bool:
    fs, path = resolve(uri, storage_cfg)
    try:
        return fs.get_file_info(path).type != pafs.FileType.NotFound
    except OSError as e:
        raise _fail("checking", uri, e, storage_cfg) from None


def read_bytes(uri: str, storage_cfg: StorageConfig | None = None) -> bytes:
    fs, path = resolve(uri, storage_cfg)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except OSError as e:
        raise _fail("reading", uri, e, storage_cfg) from None


def read_text(uri: str, storage_cfg: StorageConfig | None = None) -> str:
    return read_bytes(uri, storage_cfg).decode("utf-8")


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
        raise _fail("writing", uri, e, storage_cfg) from None


def write_text(uri: str, text: str, storage_cfg: StorageConfig | None = None) -> None:
    write_bytes(uri, text.encode("utf-8"), storage_cfg)


def list_dir(uri: str, storage_cfg: StorageConfig | None = None) -> list[str]:
    """Names of the immediate children (files and directories), sorted; [] if `uri` does not exist."""
    fs, path = resolve(uri, storage_cfg)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=False))
    except OSError as e:
        raise _fail("listing", uri, e, storage_cfg) from None
    return sorted({i.base_name for i in infos})


def list_files(uri: str, storage_cfg: StorageConfig | None = None) -> dict[str, int]:
    """Every file under `uri` (recursively) as {relative posix path: size}; {} if missing."""
    fs, path = resolve(uri, storage_cfg)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=True))
    except OSError as e:
        raise _fail("listing", uri, e, storage_cfg) from None
    root = path.rstrip("/") + "/"
    return {i.path[len(root):]: i.size for i in infos if i.type == pafs.FileType.File and i.path.startswith(root)}


def delete_file(uri: str, storage_cfg: StorageConfig | None = None) -> None:
    """Delete one file; a missing one is fine."""
    fs, path = resolve(uri, storage_cfg)
    try:
        if fs.get_file_info(path).type == pafs.FileType.File:
            fs.delete_file(path)
    except OSError as e:
        raise _fail("deleting", uri, e, storage_cfg) from None


def delete_tree(uri: str, storage_cfg: StorageConfig | None = None) -> None:
    """Delete a directory (or prefix) and everything under it; a missing one is fine."""
    fs, path = resolve(uri, storage_cfg)
    try:
        kind = fs.get_file_info(path).type
        if kind == pafs.FileType.Directory:
            fs.delete_dir(path)
        elif kind == pafs.FileType.File:
            fs.delete_file(path)
    except OSError as e:
        raise _fail("deleting", uri, e, storage_cfg) from None


# ------------------------------------------------------------------------------- bulk copies
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
    return TransferConfig(max_concurrency=_TRANSFER_THREADS, use_threads=True)


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
        raise _fail("uploading", uri, e) from None
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="sha256") as hasher:
        digests = [hasher.submit(sha256_file, src) for src, _ in pairs]
        current = uri
        try:
            if is_s3(uri):
                from boto3.s3.transfer import create_transfer_manager

                bucket, prefix = split_s3(uri)
                with create_transfer_manager(boto3_client(storage_cfg), _transfer_config()) as tm:
                    futures = [(rel, tm.upload(str(src), bucket, _key(prefix, rel))) for src, rel in pairs]
                    for current, fut in futures:
                        fut.result()
            else:
                _, dest = resolve(uri, storage_cfg)
                for src, rel in pairs:
                    current = rel
                    target = os.path.join(dest, rel)
                    os.makedirs(os.path.dirname(target), exist_ok=True)
                    shutil.copyfile(src, target)
        except Exception as e:
            raise _fail("uploading to", join(uri, current), e, storage_cfg) from None
        return [FileEntry(rel, size, d.result()) for (_, rel), size, d in zip(pairs, sizes, digests)]


def _download(pairs: list[tuple[str, Path]], uri: str, storage_cfg) -> list[FileEntry]:
    """(key relative to `uri`, local file) pairs -> entries of the bytes that arrived."""
    for _, dst in pairs:
        dst.parent.mkdir(parents=True, exist_ok=True)
    current = uri
    try:
        if is_s3(uri):
            from boto3.s3.transfer import create_transfer_manager

            bucket, prefix = split_s3(uri)
            with create_transfer_manager(boto3_client(storage_cfg), _transfer_config()) as tm:
                futures = [(rel, tm.download(bucket, _key(prefix, rel), str(dst))) for rel, dst in pairs]
                for current, fut in futures:
                    fut.result()
        else:
            _, src = resolve(uri, storage_cfg)
            for rel, dst in pairs:
                current = rel
                shutil.copyfile(os.path.join(src, rel), dst)
    except Exception as e:
        raise _fail("downloading", join(uri, current), e, storage_cfg) from None
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="sha256") as hasher:
        digests = list(hasher.map(lambda p: sha256_file(p[1]), pairs))
    return [FileEntry(rel, dst.stat().st_size, d) for (rel, dst), d in zip(pairs, digests)]


def _key(prefix: str, rel: str) -> str:
    return f"{prefix}/{rel}" if prefix else rel
