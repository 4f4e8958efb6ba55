"""Storage URIs as strings: a local path or `s3://bucket/prefix`. No I/O, no clients."""

from __future__ import annotations

from e2e_dist.errors import StorageError

S3 = "s3://"


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
