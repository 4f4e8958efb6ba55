"""Storage exceptions (boto3, pyarrow or OS) -> one short line that names the cause, never a secret."""

from __future__ import annotations

from typing import TYPE_CHECKING

from e2e_dist.config import redact
from e2e_dist.errors import StorageError
from e2e_dist.storage.clients import endpoint_url

if TYPE_CHECKING:
    from e2e_dist.config import StorageConfig

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


def describe_error_at(uri: str, exc: BaseException, storage_cfg: StorageConfig | None = None) -> str:
    """describe_error, with the real cause where the request could not carry one: S3 answers a HEAD
    (pyarrow's first look at a path) with a bare 403, which reads "access denied" whether the key is
    unknown, the secret wrong or the permission missing. Then one listing request asks again, and
    its error body names the cause, as `check_access` and `checkpoints` already do."""
    cause = describe_error(exc, storage_cfg)
    if not (cause.startswith("access denied") and str(uri).startswith("s3://")):
        return cause
    from e2e_dist.storage.clients import boto3_client
    from e2e_dist.storage.uris import split_s3

    bucket, prefix = split_s3(uri)
    try:
        boto3_client(storage_cfg, connect_timeout=3.0, read_timeout=15.0, max_attempts=1, cached=False
                     ).list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1)
    except Exception as again:  # the listing's error body says which
        return describe_error(again, storage_cfg)
    return cause


def operation_error(op: str, uri: str, exc: BaseException, storage_cfg=None) -> StorageError:
    """`StorageError("<op> <uri>: <cause>")`, e.g. "reading s3://b/run/x: not found (404)"."""
    return StorageError(f"{op} {redact(uri)}: {describe_error_at(uri, exc, storage_cfg)}")
