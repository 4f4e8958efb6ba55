"""The filesystem Ray Train (and Tune) writes through: `ray_storage_kwargs` for `RunConfig`.

For S3 that is pyarrow's S3FileSystem behind `MarkerFreeS3Handler`, because pyarrow (checked
with 26.0) writes zero-byte 'dir/' objects on S3 and no S3FileSystem option turns that off:

- `create_dir` writes one marker per missing level ('a/', 'a/b/', ...);
  `check_directory_existence_before_creation` only skips levels that already have objects;
- `delete_file`, `delete_dir` and `move` write the *parent's* marker afterwards, so that the
  parent "directory" keeps existing;
- `copy_files` calls `create_dir` for every directory of the source tree.

Ray calls all of these on the filesystem it is given (StorageContext: create_dir before its
validation marker and before each checkpoint; delete_dir when it prunes checkpoints; copy_files in
Tune's experiment-state sync). A plain boto3 download of such a bucket then fails: key 'run/' is a
file where 'run/x' needs a directory. S3 has no directories, so the handler simply never makes
any: create_dir is a no-op and deletes are plain S3 DeleteObject(s) calls; reads, listings,
writes and copies go to the wrapped S3FileSystem unchanged (its streams are native, so bytes never
pass through Python).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

import pyarrow.fs as pafs

from e2e_dist.storage.clients import boto3_client, endpoint_url, region, resolve, s3_filesystem
from e2e_dist.storage.files import delete_s3_prefix
from e2e_dist.storage.uris import is_s3

if TYPE_CHECKING:
    from e2e_dist.config import StorageConfig


def ray_storage_kwargs(storage_path: str, storage_cfg: StorageConfig | None = None) -> dict[str, Any]:
    """`storage_path` / `storage_filesystem` for `ray.train.RunConfig`.

    With an explicit filesystem Ray wants the path *without* the scheme (ray 2.60 fails with
    ArrowInvalid on 's3:/bucket' otherwise), so S3 gets ("bucket/prefix", a marker-free S3
    filesystem, see the module docstring).
    """
    _, path = resolve(storage_path, storage_cfg)
    if is_s3(storage_path):
        return {"storage_path": path, "storage_filesystem": marker_free_s3_filesystem(storage_cfg)}
    return {"storage_path": path}


def marker_free_s3_filesystem(storage_cfg: StorageConfig | None = None) -> pafs.PyFileSystem:
    """pyarrow's S3 filesystem with our endpoint/region rules that never writes 'dir/' objects.

    Picklable (Ray ships it to every worker): it carries the endpoint and region, not the config.
    """
    return pafs.PyFileSystem(MarkerFreeS3Handler(_Endpoint(endpoint_url(storage_cfg), region(storage_cfg))))


class _Endpoint(NamedTuple):
    """What `boto3_client` / `s3_filesystem` read from a StorageConfig, without the rest of it."""

    endpoint_url: str | None
    region: str | None


class MarkerFreeS3Handler(pafs.FileSystemHandler):
    """Delegates to an S3FileSystem, except what would write directory markers (module docstring)."""

    def __init__(self, endpoint: _Endpoint):
        self.endpoint = endpoint
        # Synchronous writes: Ray's copy_files only disables its threads for a plain S3FileSystem
        # destination (pyarrow's background S3 writes can deadlock threaded copies,
        # apache/arrow#32372); with foreground writes each copy thread uploads its own file.
        # More patience than our own calls get: Ray Train's controller writes its run snapshot
        # through this filesystem without retrying, and one timed-out connection then fails the
        # whole run (seen once in tests: a 5 s connect timeout on a loaded machine mid-resize).
        self.fs = s3_filesystem(endpoint, background_writes=False, connect_timeout=10.0, max_attempts=6)

    def __reduce__(self):
        return MarkerFreeS3Handler, (self.endpoint,)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, MarkerFreeS3Handler):
            return self.endpoint == other.endpoint and self.fs.equals(other.fs)
        return NotImplemented

    def __ne__(self, other: object) -> bool:
        eq = self.__eq__(other)
        return eq if eq is NotImplemented else not eq

    def get_type_name(self) -> str:
        return "s3-no-dir-markers"

    def normalize_path(self, path: str) -> str:
        return self.fs.normalize_path(path)

    def get_file_info(self, paths: list[str]) -> list[pafs.FileInfo]:
        return self.fs.get_file_info(paths)

    def get_file_info_selector(self, selector: pafs.FileSelector) -> list[pafs.FileInfo]:
        return self.fs.get_file_info(selector)

    def create_dir(self, path: str, recursive: bool) -> None:
        """Nothing to create: an S3 "directory" exists while an object has its prefix."""
        bucket = _split(path)[0]
        if not bucket:
            raise OSError(f"cannot create a directory without a bucket: {path!r}")

    def delete_dir(self, path: str) -> None:
        bucket, key = _split(path)
        delete_s3_prefix(bucket, key, self.endpoint, include_key=False)

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        bucket, key = _split(path)
        if not delete_s3_prefix(bucket, key, self.endpoint, include_key=False) and not missing_dir_ok:
            raise FileNotFoundError(f"directory {path!r} does not exist")

    def delete_root_dir_contents(self) -> None:
        raise PermissionError("refusing to delete every bucket's contents")

    def delete_file(self, path: str) -> None:
        self._require_file(path)
        self._delete_object(path)

    def move(self, src: str, dest: str) -> None:
        """Files only (as pyarrow's S3 move): a server-side copy, then a plain delete."""
        self._require_file(src)
        self.fs.copy_file(src, dest)
        self._delete_object(src)

    def copy_file(self, src: str, dest: str) -> None:
        self.fs.copy_file(src, dest)

    def open_input_stream(self, path: str):
        return self.fs.open_input_stream(path)

    def open_input_file(self, path: str):
        return self.fs.open_input_file(path)

    def open_output_stream(self, path: str, metadata):
        return self.fs.open_output_stream(path, metadata=metadata)

    def open_append_stream(self, path: str, metadata):
        return self.fs.open_append_stream(path, metadata=metadata)  # S3: raises "not implemented"

    def _require_file(self, path: str) -> None:
        kind = self.fs.get_file_info(path).type
        if kind == pafs.FileType.NotFound:
            raise FileNotFoundError(f"path does not exist: {path!r}")
        if kind != pafs.FileType.File:
            raise IsADirectoryError(f"not a file: {path!r}")

    def _delete_object(self, path: str) -> None:
        bucket, key = _split(path)
        boto3_client(self.endpoint).delete_object(Bucket=bucket, Key=key)


def _split(path: str) -> tuple[str, str]:
    """pyarrow's S3 path 'bucket/a/b' -> ("bucket", "a/b")."""
    bucket, _, key = path.strip("/").partition("/")
    return bucket, key
