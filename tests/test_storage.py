"""Storage: URI resolution, small-file helpers and bulk copies against a real S3 endpoint (moto over
HTTP), and the pre-flight access check's one-line errors."""

from __future__ import annotations

import hashlib
import os

import pyarrow.fs as pafs
import pytest

from e2e_dist import storage
from e2e_dist.config import StorageConfig
from e2e_dist.errors import StorageError
from tests.fixtures.s3 import _free_port, bucket_keys, directory_markers


def _s3_options(fs: pafs.S3FileSystem) -> dict:
    # The options pyarrow would ship to a Ray worker (no credentials among them).
    return fs.__reduce__()[1][0]


def _one_line(err: BaseException) -> str:
    text = str(err)
    assert text and "\n" not in text, f"not one line: {text!r}"
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in text and os.environ["AWS_ACCESS_KEY_ID"] not in text
    return text


# ----------------------------------------------------------------------------------- resolve
def test_resolve_local_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fs, path = storage.resolve("runs/r1")
    assert isinstance(fs, pafs.LocalFileSystem) and path == str(tmp_path / "runs" / "r1")
    assert storage.resolve(f"file://{tmp_path}/x")[1] == str(tmp_path / "x")
    with pytest.raises(StorageError, match="unsupported storage URI"):
        storage.resolve("gs://bucket/x")


def test_resolve_s3_endpoint_region_from_env_then_config(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:5999")
    monkeypatch.setenv("AWS_REGION", "eu-west-3")
    fs, path = storage.resolve("s3://my-bucket/some/prefix/")
    opts = _s3_options(fs)
    assert path == "my-bucket/some/prefix"
    assert (opts["endpoint_override"], opts["scheme"], opts["region"]) == ("127.0.0.1:5999", "http", "eu-west-3")
    assert opts["access_key"] is None  # credentials come from the AWS chain, never from us

    cfg = StorageConfig(path="s3://my-bucket", endpoint_url="https://minio.example:9000", region="ap-south-1")
    opts = _s3_options(storage.resolve("s3://my-bucket", cfg)[0])
    assert (opts["endpoint_override"], opts["scheme"], opts["region"]) == ("minio.example:9000", "https", "ap-south-1")
    with pytest.raises(StorageError, match="at least 3"):
        storage.resolve("s3://ab/x")


def test_ray_storage_kwargs_work_with_ray_storage_context(s3_bucket, tmp_path):
    """The ray 2.60 pitfall: an explicit filesystem needs 'bucket/prefix'. Ray's own StorageContext
    must accept what we give it and write its marker through it to the S3 endpoint."""
    from ray.train.v2._internal.execution.storage import StorageContext

    kwargs = storage.ray_storage_kwargs(f"{s3_bucket}/runs")
    assert kwargs["storage_path"] == s3_bucket.removeprefix("s3://") + "/runs"
    ctx = StorageContext(experiment_dir_name="exp", **kwargs)
    assert ctx.experiment_fs_path == kwargs["storage_path"] + "/exp"
    assert storage.list_dir(f"{s3_bucket}/runs/exp")  # Ray's validation marker landed in the bucket

    local = storage.ray_storage_kwargs(str(tmp_path / "runs"))
    assert local == {"storage_path": str(tmp_path / "runs")}


def test_s3_never_gets_directory_markers(s3_server, s3_bucket, tmp_path):
    """No zero-byte 'dir/' objects, whatever a run does to S3: pyarrow's S3FileSystem writes one for
    every create_dir level and re-creates the parent's after delete_file / delete_dir / move, and
    Ray Train calls all of these on the filesystem we hand it. A plain boto3 download of the bucket
    then fails (key 'run/' is a file where 'run/x' needs a directory)."""
    import pickle

    from ray.train.v2._internal.execution.storage import StorageContext, delete_fs_path

    base = f"{s3_bucket}/runs/r1"
    # Our storage API, as a run and its checkpoints use it.
    storage.write_text(f"{base}/config/run.json", "{}")
    storage.write_text(f"{base}/a/b/c/deep.txt", "deep")
    src = tmp_path / "ck"
    (src / "ds" / "global_step2").mkdir(parents=True)
    (src / "ds" / "global_step2" / "states.pt").write_bytes(b"s" * 10)
    (src / "latest").write_text("global_step2")
    storage.upload_dir(src, f"{base}/ck_2")
    storage.upload_dir(src, f"{base}/ck_4")
    storage.delete_tree(f"{base}/ck_2")  # pruning: the parent keeps other children
    storage.delete_tree(f"{base}/a/b/c")  # the parent's last child
    storage.delete_file(f"{base}/config/run.json")
    storage.delete_tree(f"{base}/missing")
    assert directory_markers(s3_server.url, s3_bucket) == []

    # The filesystem Ray Train writes through, as Ray uses it (workers get it pickled).
    kwargs = storage.ray_storage_kwargs(f"{s3_bucket}/runs")
    fs = pickle.loads(pickle.dumps(kwargs["storage_filesystem"]))
    assert fs.equals(kwargs["storage_filesystem"])
    root = kwargs["storage_path"]
    fs.create_dir(f"{root}/x/y/z")
    fs.create_dir(f"{root}/x", recursive=False)
    with fs.open_output_stream(f"{root}/x/y/z/f.bin") as f:
        f.write(b"data")
    pafs.copy_files(str(src), f"{root}/copied", destination_filesystem=fs)
    fs.move(f"{root}/x/y/z/f.bin", f"{root}/moved/f.bin")
    with fs.open_output_stream(f"{root}/tmp/one") as f:
        f.write(b"1")
    fs.delete_file(f"{root}/tmp/one")
    fs.delete_dir(f"{root}/copied/ds")
    fs.delete_dir_contents(f"{root}/moved")
    ctx = StorageContext(experiment_dir_name="exp", **kwargs)  # create_dir + its validation marker file
    with fs.open_output_stream(f"{ctx.experiment_fs_path}/checkpoint_1/x") as f:
        f.write(b"x")
    delete_fs_path(fs, f"{ctx.experiment_fs_path}/checkpoint_1")  # Ray's checkpoint pruning
    assert directory_markers(s3_server.url, s3_bucket) == []

    # Everything a run wrote and did not delete is still there, byte for byte.
    assert sorted(bucket_keys(s3_server.url, s3_bucket)) == [
        "runs/copied/latest", "runs/exp/.validate_storage_marker",
        "runs/r1/ck_4/ds/global_step2/states.pt", "runs/r1/ck_4/latest",
    ]
    assert storage.read_text(f"{s3_bucket}/runs/copied/latest") == "global_step2"
    info = fs.get_file_info([f"{root}/copied", f"{root}/x", f"{root}/copied/latest"])
    assert [i.type for i in info] == [pafs.FileType.Directory, pafs.FileType.NotFound, pafs.FileType.File]


# ------------------------------------------------------------------------------ small helpers
@pytest.fixture(params=["local", "s3"])
def base_uri(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3_bucket") + "/store"


def test_write_read_list_delete(base_uri):
    a, b = storage.join(base_uri, "d", "a.txt"), storage.join(base_uri, "d", "sub", "b.txt")
    storage.write_text(a, "alpha")
    storage.write_text(b, "beta ü")
    assert storage.read_text(a) == "alpha" and storage.read_text(b) == "beta ü"
    assert storage.exists(a) and not storage.exists(storage.join(base_uri, "d", "nope"))
    assert storage.list_dir(storage.join(base_uri, "d")) == ["a.txt", "sub"]
    assert storage.list_files(storage.join(base_uri, "d")) == {"a.txt": 5, "sub/b.txt": len("beta ü".encode())}
    assert storage.list_dir(storage.join(base_uri, "missing")) == []
    storage.write_text(a, "overwritten")
    assert storage.read_text(a) == "overwritten"
    storage.delete_tree(storage.join(base_uri, "d", "sub"))
    assert storage.list_files(storage.join(base_uri, "d")) == {"a.txt": 11}
    storage.delete_tree(storage.join(base_uri, "d", "sub"))  # deleting what is gone is fine
    with pytest.raises(StorageError) as e:
        storage.read_text(storage.join(base_uri, "d", "nope"))
    assert "not found" in _one_line(e.value)


def test_write_text_local_is_atomic(tmp_path):
    target = tmp_path / "x" / "manifest.json"
    storage.write_text(str(target), "{}")
    assert target.read_text() == "{}" and [p.name for p in target.parent.iterdir()] == ["manifest.json"]


def test_upload_download_dir_roundtrip(base_uri, tmp_path):
    src = tmp_path / "src"
    (src / "ds").mkdir(parents=True)
    big = os.urandom(9 << 20)  # > 8 MiB: goes up as a multipart upload on S3
    (src / "ds" / "big.pt").write_bytes(big)
    (src / "latest").write_text("ds")
    (src / "empty").write_bytes(b"")
    entries = storage.upload_dir(src, storage.join(base_uri, "ck"))
    assert [e.path for e in entries] == ["ds/big.pt", "empty", "latest"]
    assert entries[0].sha256 == hashlib.sha256(big).hexdigest() and entries[0].size == len(big)
    assert storage.list_files(storage.join(base_uri, "ck")) == {"ds/big.pt": len(big), "empty": 0, "latest": 2}

    back = storage.download_dir(storage.join(base_uri, "ck"), tmp_path / "back")
    assert back == entries
    assert (tmp_path / "back" / "ds" / "big.pt").read_bytes() == big
    only = storage.download_dir(storage.join(base_uri, "ck"), tmp_path / "only", files=["latest"])
    assert [e.path for e in only] == ["latest"] and not (tmp_path / "only" / "ds").exists()


def test_upload_to_missing_bucket_is_one_line(s3_server, tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(StorageError) as e:
        storage.upload_dir(tmp_path, "s3://no-such-bucket-e2e/x")
    assert "bucket does not exist" in _one_line(e.value)


# ------------------------------------------------------------------------------- check_access
def test_check_access_ok_local_and_s3(s3_bucket, tmp_path):
    storage.check_access(f"{s3_bucket}/runs")
    storage.check_access(str(tmp_path / "new" / "runs"))
    assert (tmp_path / "new" / "runs").is_dir() and not list((tmp_path / "new" / "runs").iterdir())
    assert storage.list_files(s3_bucket) == {}  # the probe object was removed


def test_check_access_local_not_writable(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(StorageError) as e:
        storage.check_access(str(tmp_path / "file" / "runs"))
    assert "not writable" in _one_line(e.value)


def test_check_access_missing_bucket(s3_server):
    with pytest.raises(StorageError) as e:
        storage.check_access("s3://missing-bucket-e2e/runs")
    msg = _one_line(e.value)
    assert "missing-bucket-e2e" in msg and "bucket does not exist" in msg


def test_check_access_bad_credentials(s3_server, s3_bucket):
    s3_server.set_auth(True)  # moto now checks keys: ours are unknown to it
    try:
        with pytest.raises(StorageError) as e:
            storage.check_access(f"{s3_bucket}/runs")
    finally:
        s3_server.set_auth(False)
    msg = _one_line(e.value)
    assert "credentials rejected" in msg and s3_bucket in msg


def test_check_access_unreachable_endpoint():
    port = _free_port()  # nothing listens there
    cfg = StorageConfig(path="s3://some-bucket", endpoint_url=f"http://127.0.0.1:{port}")
    with pytest.raises(StorageError) as e:
        storage.check_access("s3://some-bucket/runs", cfg)
    msg = _one_line(e.value)
    assert "unreachable" in msg and f"127.0.0.1:{port}" in msg


def test_a_wrong_secret_reads_the_same_for_data_paths_and_storage(s3_server, s3_bucket, monkeypatch):
    """A known key with a wrong secret: S3 answers pyarrow's first look (a HEAD) with a bare 403,
    which alone reads "access denied"; every verb names the real cause, as check_access does."""
    import boto3

    from e2e_dist.data.common import DataError, list_files

    iam = boto3.client("iam", endpoint_url=s3_server.url, region_name="us-east-1")
    iam.create_user(UserName="wrong-secret")
    key = iam.create_access_key(UserName="wrong-secret")["AccessKey"]["AccessKeyId"]
    storage.write_bytes(f"{s3_bucket}/data/a.txt", b"text", StorageConfig(endpoint_url=s3_server.url))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    cfg = StorageConfig(path=s3_bucket, endpoint_url=s3_server.url)
    s3_server.set_auth(True)
    try:
        with pytest.raises(DataError) as data_err:
            list_files([f"{s3_bucket}/data/"], cfg)
        with pytest.raises(StorageError) as storage_err:
            storage.check_access(f"{s3_bucket}/runs", cfg)
    finally:
        s3_server.set_auth(False)
    for e in (data_err.value, storage_err.value):
        assert "credentials rejected (SignatureDoesNotMatch)" in _one_line(e), e


def test_a_bucket_typo_in_data_paths_says_the_bucket_does_not_exist(s3_server):
    from e2e_dist.data.common import DataError, list_files

    with pytest.raises(DataError) as e:
        list_files(["s3://no-such-bucket-e2e/corpus/"], StorageConfig(endpoint_url=s3_server.url))
    assert _one_line(e.value) == "data.paths: bucket no-such-bucket-e2e does not exist (s3://no-such-bucket-e2e/corpus/)"
