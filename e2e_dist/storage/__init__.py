"""Where runs live: a local directory or `s3://bucket/prefix`, behind one small API.

Two clients, one set of rules (endpoint from `storage.endpoint_url` or AWS_ENDPOINT_URL, region from
`storage.region` or AWS_REGION / AWS_DEFAULT_REGION, credentials only from the standard AWS chain):

- `pyarrow.fs` for metadata and small files, because it is what Ray Train writes with and it treats
  local paths and S3 alike;
- boto3's transfer manager for bulk copies, because it uploads and downloads in parallel multipart
  chunks with *bounded* memory (pyarrow's background writes buffer a whole file in RAM) and was the
  faster of the two against S3 here.

Every failure leaves as a one-line `StorageError` that names the URI and the cause, never a secret.

- `uris`:           is_s3 / join / split_s3, string work only.
- `clients`:        endpoint and region rules, the pyarrow filesystem, `resolve`, the boto3 client.
- `error_messages`: describe_error, the secret-free one-line cause of any storage exception
  (describe_error_at: the same for a path, asking S3 again where a bare 403 hid the cause).
- `access`:         check_access, the fail-fast probe run before a run starts.
- `files`:          exists / read / write / list / delete of single objects and trees, read_range.
- `transfer`:       upload_dir / download_dir (and single files), with sha256 of every file.
- `ray_fs`:         ray_storage_kwargs, the filesystem Ray Train gets: for S3 one that never writes
                    zero-byte 'dir/' marker objects (pyarrow's S3FileSystem does on every
                    create_dir / delete / move).
"""

from e2e_dist.errors import StorageError
from e2e_dist.storage.access import check_access
from e2e_dist.storage.clients import boto3_client, endpoint_url, region, resolve, s3_filesystem
from e2e_dist.storage.error_messages import describe_error, describe_error_at
from e2e_dist.storage.files import (
    delete_file, delete_tree, exists, list_dir, list_files, open_input_file, read_bytes, read_range, read_text, write_bytes,
    write_text,
)
from e2e_dist.storage.ray_fs import marker_free_s3_filesystem, ray_storage_kwargs
from e2e_dist.storage.transfer import (
    FileEntry, download_dir, download_file, local_files, sha256_file, upload_dir, upload_file,
)
from e2e_dist.storage.uris import S3, is_s3, join, split_s3

__all__ = [
    "S3", "FileEntry", "StorageError", "boto3_client", "check_access", "delete_file", "delete_tree", "open_input_file",
    "describe_error", "describe_error_at", "download_dir", "download_file", "endpoint_url", "exists", "is_s3", "join", "list_dir",
    "list_files", "local_files", "marker_free_s3_filesystem", "ray_storage_kwargs", "read_bytes", "read_range",
    "read_text", "region", "resolve", "s3_filesystem", "sha256_file", "split_s3", "upload_dir", "upload_file", "write_bytes", "write_text",
]
