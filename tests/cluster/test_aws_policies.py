"""The least-privilege IAM policies shipped in cluster/aws/, enforced by a real IAM/S3 endpoint.

moto's server evaluates IAM policies once auth is on: a user holding exactly the worker policy
(placeholders filled in) does everything a run does to its storage through our storage layer
(check, config, checkpoint upload with multipart, listing, download, keep-N delete) under the run
prefix, and is refused anywhere else. The head policy may hand out the worker role and nothing else.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest
import yaml

from e2e_dist import storage
from e2e_dist.errors import StorageError
from tests.fixtures.s3 import empty_and_delete_bucket, make_bucket

ROOT = Path(__file__).resolve().parents[2]
AWS = ROOT / "cluster" / "aws"


def policy(name: str, bucket: str, prefix: str, account: str = "123456789012") -> dict:
    text = (AWS / name).read_text()
    return json.loads(text.replace("RUN_BUCKET", bucket).replace("RUN_PREFIX", prefix).replace("ACCOUNT_ID", account))


def test_shipped_files_use_the_policies_and_profiles_they_document() -> None:
    cfg = yaml.safe_load((ROOT / "ray-cluster.yaml").read_text())
    for name, spec in cfg["available_node_types"].items():
        want = "e2e-dist-head" if name == cfg["head_node_type"] else "e2e-dist-worker"
        assert spec["node_config"]["IamInstanceProfile"] == {"Name": want}, name
    head = policy("head-policy.json", "b", "p")
    passrole = [s for s in head["Statement"] if s["Action"] == "iam:PassRole"]
    assert [s["Resource"] for s in passrole] == ["arn:aws:iam::123456789012:role/e2e-dist-worker"]
    for doc in (head, policy("worker-policy.json", "b", "p")):
        s3 = [s for s in doc["Statement"] if any(a.startswith("s3:") for a in _actions(s))]
        # S3 only on the run bucket and, for objects, only under the run prefix
        assert {r for s in s3 for r in _list(s["Resource"])} == {"arn:aws:s3:::b", "arn:aws:s3:::b/p/*"}
        assert not any(a in ("s3:*", "*") for s in doc["Statement"] for a in _actions(s))
    worker = policy("worker-policy.json", "b", "p")
    assert not any(a.startswith(("ec2:", "iam:")) for s in worker["Statement"] for a in _actions(s))


def _list(x) -> list:
    return x if isinstance(x, list) else [x]


def _actions(statement: dict) -> list[str]:
    return _list(statement["Action"])


@pytest.fixture
def worker_user(s3_server, monkeypatch):
    """A bucket, and AWS keys of an IAM user that holds exactly the worker policy for `runs`."""
    import boto3

    bucket = make_bucket(s3_server.url, prefix="iam").removeprefix("s3://")
    other = make_bucket(s3_server.url, prefix="iam-other").removeprefix("s3://")
    iam = boto3.client("iam", endpoint_url=s3_server.url, region_name="us-east-1")
    user = f"e2e-worker-{uuid.uuid4().hex[:8]}"
    iam.create_user(UserName=user)
    iam.put_user_policy(UserName=user, PolicyName="run-bucket",
                        PolicyDocument=json.dumps(policy("worker-policy.json", bucket, "runs")))
    key = iam.create_access_key(UserName=user)["AccessKey"]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
    s3_server.set_auth(True)
    try:
        yield bucket, other
    finally:
        s3_server.set_auth(False)
        monkeypatch.undo()  # back to the session's keys before cleaning up
        for b in (bucket, other):
            empty_and_delete_bucket(s3_server.url, f"s3://{b}")


def test_worker_policy_allows_a_runs_storage_work_under_its_prefix_only(worker_user, tmp_path) -> None:
    bucket, other = worker_user
    run = f"s3://{bucket}/runs/exp1"
    storage.check_access(f"s3://{bucket}/runs")
    storage.write_text(f"{run}/config.yaml", "name: exp1\n")
    assert storage.read_text(f"{run}/config.yaml") == "name: exp1\n"
    local = tmp_path / "step_00000004"
    (local / "ds").mkdir(parents=True)
    (local / "ds" / "shard.pt").write_bytes(os.urandom(20 * 2**20))  # > 8 MiB: a multipart upload
    (local / "manifest.json").write_text("{}")
    storage.upload_dir(local, f"{run}/step_00000004")
    assert storage.list_files(run) == {"config.yaml": 11, "step_00000004/ds/shard.pt": 20 * 2**20,
                                       "step_00000004/manifest.json": 2}
    back = storage.download_dir(f"{run}/step_00000004", tmp_path / "back")
    assert {e.path for e in back} == {"ds/shard.pt", "manifest.json"}
    # keep-N pruning deletes objects. AWS authorizes a multi-object delete (what pyarrow's
    # delete_dir sends) per object with s3:DeleteObject; moto checks the whole request against the
    # bucket's ARN instead and refuses it (moto/s3/responses.py, _bucket_response_delete_keys), so
    # the permission is checked here object by object, as AWS would.
    client = storage.boto3_client(cached=False)
    for key in ("runs/exp1/step_00000004/ds/shard.pt", "runs/exp1/step_00000004/manifest.json"):
        client.delete_object(Bucket=bucket, Key=key)
    assert storage.list_files(run) == {"config.yaml": 11}

    for outside in (f"s3://{bucket}/elsewhere/x.txt", f"s3://{other}/runs/x.txt"):
        with pytest.raises(StorageError) as e:
            storage.write_text(outside, "no")
        assert "\n" not in str(e.value) and outside.split("/x.txt")[0] in str(e.value)
    with pytest.raises(client.exceptions.ClientError, match="AccessDenied"):
        client.delete_object(Bucket=bucket, Key="elsewhere/kept.txt")
