"""`e2e-dist cluster validate`: the shipped yamls pass; each broken variant fails with its one line."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from e2e_dist.cluster.validate import (
    ClusterConfigError,
    check_cluster_file,
    gpu_count_of,
    lint_cluster_config,
    validate_cluster_config,
    validate_cluster_file,
)

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ["ray-cluster.yaml", "cluster/local-autoscale.yaml", "cluster/onprem.yaml", "cluster/kuberay/raycluster.yaml",
           "cluster/kuberay/rayjob-sweep.yaml"]


def _load(rel: str) -> dict[str, Any]:
    return yaml.safe_load((ROOT / rel).read_text())


@pytest.mark.parametrize("rel", SHIPPED)
def test_shipped_yamls_are_valid(rel: str) -> None:
    assert validate_cluster_file(ROOT / rel) == []


def test_onprem_config_stops_only_its_own_ray() -> None:
    """Every `ray start` of cluster/onprem.yaml is tagged, every stop is the tagged one, and the login
    shell's `ray stop` (what `ray down` runs) is redirected to it: no machine-wide `ray stop` left."""
    cfg = _load("cluster/onprem.yaml")
    tag = "E2E_DIST_RAY_CLUSTER=e2e-dist-onprem ray start"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        stop, start = cfg[key]
        assert stop == "e2e-dist cluster stop-ray --tag e2e-dist-onprem" and tag in start, key
    env_step = next(c for c in cfg["setup_commands"] if "e2e-dist onprem env" in c)
    assert ('then e2e-dist cluster stop-ray --tag e2e-dist-onprem --workers-of ~/ray_bootstrap_config.yaml; '
            'else command ray "$@"') in env_step
    assert "--dashboard-host=127.0.0.1" in cfg["head_start_ray_commands"][1]


def test_shipped_aws_config_keeps_its_security_properties() -> None:
    """What the launcher file promises: only SSH from outside, token auth, scale from zero."""
    cfg = _load("ray-cluster.yaml")
    assert cfg["provider"]["security_group"]["IpPermissions"] == []  # Ray adds only SSH + intra-cluster
    head_cmds = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_cmds and "RAY_AUTH_MODE=token" in head_cmds
    assert "RAY_AUTH_MODE=token" in " ".join(cfg["worker_start_ray_commands"])
    assert cfg["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    workers = {k: v for k, v in cfg["available_node_types"].items() if k != cfg["head_node_type"]}
    assert all(v["min_workers"] == 0 for v in workers.values())
    assert {"gpu_1x", "gpu_8x"} <= set(workers)
    spot = [k for k, v in workers.items() if v["node_config"].get("InstanceMarketOptions")]
    assert spot and all(workers[k]["max_workers"] == 0 for k in spot)  # spot is opt-in
    # nodes boot ready: the image has everything (tests/cluster/test_node_image.py), setup installs nothing
    setup = " ".join(cfg["setup_commands"])
    assert cfg["docker"]["image"] and "pip install" not in setup and "apt-get" not in setup


def test_local_autoscale_has_the_same_node_types() -> None:
    aws, local = _load("ray-cluster.yaml"), _load("cluster/local-autoscale.yaml")
    assert set(aws["available_node_types"]) == set(local["available_node_types"])
    assert local["provider"] == {"type": "external", "module": "e2e_dist.cluster.local_provider.LocalNodeProvider",
                                 "disable_node_updaters": True, "disable_launch_config_check": True}


Mutation = Callable[[dict[str, Any]], None]


def _ni(cfg: dict[str, Any], node_type: str) -> list[dict[str, Any]]:
    return cfg["available_node_types"][node_type]["node_config"]["NetworkInterfaces"]


def _set(path: str, value: Any) -> Mutation:
    def mutate(cfg: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = cfg
        for p in parents:
            node = node[p]
        node[last] = value
    return mutate


def _pop(key: str) -> Mutation:
    return lambda cfg: cfg.pop(key)


def _append(path: str, value: Any) -> Mutation:
    def mutate(cfg: dict[str, Any]) -> None:
        node = cfg
        for p in path.split("."):
            node = node[p]
        node.append(value)
    return mutate


_WORLD_8265 = {"IpProtocol": "tcp", "FromPort": 8265, "ToPort": 8265, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}
_WORLD_ALL_V6 = {"IpProtocol": "-1", "Ipv6Ranges": [{"CidrIpv6": "::/0"}]}
_SSH_ONLY = {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}
_OFFICE_8265 = {"IpProtocol": "tcp", "FromPort": 8265, "ToPort": 8265, "IpRanges": [{"CidrIp": "203.0.113.0/24"}]}

BROKEN = [
    # (id, file, mutation, expected one-line problem prefix)
    ("no-cluster-name", "ray-cluster.yaml", _pop("cluster_name"), "cluster_name: missing"),
    ("min-gt-max", "ray-cluster.yaml", _set("available_node_types.gpu_1x.min_workers", 9),
     "available_node_types.gpu_1x.min_workers: 9 > max_workers 8"),
    ("gpu-count-1x", "ray-cluster.yaml", _set("available_node_types.gpu_1x.resources.GPU", 8),
     "available_node_types.gpu_1x.resources.GPU: 8 but g5.xlarge has 1 GPU"),
    ("gpu-count-8x", "ray-cluster.yaml", _set("available_node_types.gpu_8x.resources.GPU", 4),
     "available_node_types.gpu_8x.resources.GPU: 4 but p4d.24xlarge has 8 GPUs"),
    ("gpu-on-cpu-type", "ray-cluster.yaml", _set("available_node_types.cpu_worker.resources.GPU", 1),
     "available_node_types.cpu_worker.resources.GPU: 1 but m6i.2xlarge has no GPU"),
    ("dashboard-open", "ray-cluster.yaml", _set("provider.security_group.IpPermissions", [_WORLD_8265]),
     "provider.security_group.IpPermissions[0]: tcp port 8265 open to the internet"),
    ("all-open-v6", "ray-cluster.yaml", _set("provider.security_group.IpPermissions", [_SSH_ONLY, _WORLD_ALL_V6]),
     "provider.security_group.IpPermissions[1]: all ports open to the internet"),
    ("wandb-key-in-setup", "ray-cluster.yaml", _append("setup_commands", "export WANDB_API_KEY=0123456789abcdef"),
     "setup_commands[1]: literal WANDB_API_KEY value"),
    ("aws-secret-in-start", "ray-cluster.yaml",
     _append("head_start_ray_commands", "AWS_SECRET_ACCESS_KEY='wJalrXUtnFEMI/K7MDENG' ray status"),
     "head_start_ray_commands[2]: literal AWS_SECRET_ACCESS_KEY value"),
    ("aws-key-id-in-node-config", "ray-cluster.yaml",
     _set("available_node_types.gpu_1x.node_config.UserData", "key=AKIAABCDEFGHIJKLMNOP"),
     "available_node_types.gpu_1x.node_config.UserData: looks like an AWS access key id"),
    ("ray-schema-type", "ray-cluster.yaml", _set("max_workers", "many"), "max_workers: 'many' is not of type 'integer'"),
    ("ray-schema-unknown-field", "ray-cluster.yaml", _set("idle_timeout", 5), "idle_timeout: unknown field"),
    ("ray-schema-required", "ray-cluster.yaml", _pop("provider"), "provider.type: missing"),
    ("ray-head-type", "ray-cluster.yaml", _set("head_node_type", "gpu_16x"), "head_node_type: `head_node_type` must be one of"),
    ("local-min-gt-max", "cluster/local-autoscale.yaml", _set("available_node_types.gpu_1x.min_workers", 3),
     "available_node_types.gpu_1x.min_workers: 3 > max_workers 2"),
    ("local-missing-field", "cluster/local-autoscale.yaml", _pop("cluster_synced_files"), "cluster_synced_files: missing"),
    ("local-no-name", "cluster/local-autoscale.yaml", _pop("cluster_name"), "cluster_name: missing"),
    ("kuberay-autoscaling-off", "cluster/kuberay/raycluster.yaml", _set("spec.enableInTreeAutoscaling", False),
     "spec.enableInTreeAutoscaling: must be true"),
    ("kuberay-gpu-mismatch", "cluster/kuberay/raycluster.yaml",
     lambda c: c["spec"]["workerGroupSpecs"][1]["rayStartParams"].update({"num-gpus": "4"}),
     "spec.workerGroupSpecs[1].rayStartParams.num-gpus: 4 but the container's nvidia.com/gpu limit is 8"),
    ("kuberay-literal-key", "cluster/kuberay/rayjob-sweep.yaml",
     # (a new list: the head's env is a YAML alias shared with the worker group)
     lambda c: c["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0].update(
         env=[{"name": "A", "value": "1"}, {"name": "B", "value": "2"}, {"name": "C", "value": "3"},
              {"name": "WANDB_API_KEY", "value": "0123456789abcdef"}]),
     "spec.rayClusterSpec.headGroupSpec.template.spec.containers[0].env[3].value: literal WANDB_API_KEY value"),
    ("rayjob-no-entrypoint", "cluster/kuberay/rayjob-sweep.yaml", lambda c: c["spec"].pop("entrypoint"),
     "spec.entrypoint: missing"),
    # provider fields Ray's schema leaves free-form
    ("aws-provider-typo", "ray-cluster.yaml", _set("provider.regoin", "us-west-2"),
     "provider.regoin: unknown field for the aws provider"),
    ("aws-no-region", "ray-cluster.yaml", lambda c: c["provider"].pop("region"), "provider.region: missing"),
    ("aws-unknown-region", "ray-cluster.yaml", _set("provider.region", "us-west-9"),
     "provider.region: 'us-west-9' is not an AWS region botocore knows"),
    ("aws-zone-elsewhere", "ray-cluster.yaml", _set("provider.availability_zone", "us-west-2a,us-east-1b"),
     "provider.availability_zone: 'us-east-1b' is not a zone of region us-west-2"),
    # node_config against EC2's RunInstances input shape (botocore's service model)
    ("node-config-typo", "ray-cluster.yaml", _set("available_node_types.gpu_1x.node_config.InstanceTyp", "g5.xlarge"),
     "available_node_types.gpu_1x.node_config.InstanceTyp: unknown field of EC2 RunInstancesRequest "
     "(did you mean InstanceType?)"),
    ("node-config-deep-typo", "ray-cluster.yaml",
     lambda c: c["available_node_types"]["gpu_8x"]["node_config"]["BlockDeviceMappings"][0]["Ebs"].update(VolumeSise=9),
     "available_node_types.gpu_8x.node_config.BlockDeviceMappings[0].Ebs.VolumeSise: unknown field of EC2 "
     "EbsBlockDevice (did you mean VolumeSize?)"),
    ("node-config-type", "ray-cluster.yaml",
     lambda c: c["available_node_types"]["cpu_worker"]["node_config"]["BlockDeviceMappings"][0]["Ebs"].update(
         VolumeSize="200GB"),
     "available_node_types.cpu_worker.node_config.BlockDeviceMappings[0].Ebs.VolumeSize: expected integer"),
    # EFA node types (validate_efa.py): interfaces per network card, one subnet and group, placement
    ("efa-none", "ray-cluster.yaml", lambda c: _ni(c, "gpu_8x").clear(),
     "available_node_types.gpu_8x.node_config.NetworkInterfaces: no EFA interface: p4d.24xlarge has 4 EFA network "
     "cards, and without them NCCL moves every collective over TCP"),
    ("efa-too-few", "ray-cluster.yaml", lambda c: _ni(c, "gpu_8x_h100").__delitem__(slice(4, None)),
     "available_node_types.gpu_8x_h100.node_config.NetworkInterfaces: EFA interfaces on network cards 0, 1, 2, 3 "
     "but p5.48xlarge has 32"),
    ("efa-only-primary", "ray-cluster.yaml", lambda c: _ni(c, "gpu_8x")[0].update(InterfaceType="efa-only"),
     "available_node_types.gpu_8x.node_config.NetworkInterfaces[0].InterfaceType: the primary interface (card 0, "
     "device 0) cannot be efa-only"),
    ("efa-no-placement", "ray-cluster.yaml", lambda c: c["available_node_types"]["gpu_8x_spot"]["node_config"].pop(
        "Placement"), "available_node_types.gpu_8x_spot.node_config.Placement.GroupName: missing: p4d.24xlarge nodes "
                      "need a cluster placement group"),
    ("efa-two-groups", "ray-cluster.yaml", lambda c: _ni(c, "gpu_8x")[2].update(Groups=["sg-0other"]),
     "available_node_types.gpu_8x.node_config.NetworkInterfaces[2].Groups: another security group than the first; "
     "EFA needs all its interfaces in one group that allows all traffic to and from itself"),
    ("efa-two-subnets", "ray-cluster.yaml", lambda c: _ni(c, "gpu_8x_h100")[31].update(SubnetId="subnet-0other"),
     "available_node_types.gpu_8x_h100.node_config.NetworkInterfaces[31].SubnetId: in another subnet than the first"),
    ("efa-no-group", "ray-cluster.yaml", lambda c: _ni(c, "gpu_8x")[1].pop("Groups"),
     "available_node_types.gpu_8x.node_config.NetworkInterfaces[1].Groups: missing (Ray needs it on every interface)"),
    ("efa-and-subnetid", "ray-cluster.yaml", _set("available_node_types.gpu_8x.node_config.SubnetId", "subnet-0abc"),
     "available_node_types.gpu_8x.node_config.SubnetId: not with NetworkInterfaces"),
    ("interface-type-typo", "ray-cluster.yaml",
     lambda c: c["available_node_types"]["cpu_worker"]["node_config"].update(NetworkInterfaces=[
         {"DeviceIndex": 0, "InterfaceType": "EFA", "SubnetId": "subnet-0abc", "Groups": ["sg-0abc"]}]),
     "available_node_types.cpu_worker.node_config.NetworkInterfaces[0].InterfaceType: 'EFA' is not one of interface, "
     "efa, efa-only"),
    ("node-config-enum", "ray-cluster.yaml",
     _set("available_node_types.gpu_1x_spot.node_config.InstanceMarketOptions.MarketType", "spotty"),
     "available_node_types.gpu_1x_spot.node_config.InstanceMarketOptions.MarketType: 'spotty' is not one of"),
    # KubeRay manifests against KubeRay's CRD schema
    ("kuberay-unknown-deep", "cluster/kuberay/raycluster.yaml",
     lambda c: c["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0].update(resource={}),
     "spec.workerGroupSpecs[0].template.spec.containers[0].resource: unknown field (not in the KubeRay v1.7.0 CRD)"),
    ("kuberay-unknown-top", "cluster/kuberay/rayjob-sweep.yaml", _set("spec.shutdownAfterJobFinish", True),
     "spec.shutdownAfterJobFinish: unknown field"),
    ("kuberay-type", "cluster/kuberay/raycluster.yaml",
     lambda c: c["spec"]["workerGroupSpecs"][0].update(maxReplicas="two"),
     "spec.workerGroupSpecs[0].maxReplicas: expected integer"),
    ("kuberay-required", "cluster/kuberay/raycluster.yaml",
     lambda c: c["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0].pop("name"),
     "spec.headGroupSpec.template.spec.containers[0].name: missing (required by the KubeRay CRD)"),
]


@pytest.mark.parametrize("rel,mutate,expected", [b[1:] for b in BROKEN], ids=[b[0] for b in BROKEN])
def test_broken_variant_fails_with_its_one_line(rel: str, mutate: Mutation, expected: str) -> None:
    cfg = copy.deepcopy(_load(rel))
    mutate(cfg)
    problems = validate_cluster_config(cfg)
    assert len(problems) == 1, problems
    assert problems[0].startswith(expected), problems
    assert "\n" not in problems[0]


def test_secret_values_are_never_echoed() -> None:
    cfg = _load("ray-cluster.yaml")
    cfg["setup_commands"].append("export WANDB_API_KEY=supersecretvalue123")
    cfg["available_node_types"]["gpu_1x"]["node_config"]["UserData"] = "AKIAABCDEFGHIJKLMNOP"
    text = " ".join(validate_cluster_config(cfg))
    assert "supersecretvalue123" not in text and "AKIAABCDEFGHIJKLMNOP" not in text


def test_references_and_restricted_rules_are_fine() -> None:
    cfg = _load("ray-cluster.yaml")
    cfg["setup_commands"].append('echo "export WANDB_API_KEY=$WANDB_API_KEY" >> ~/.bashrc')
    cfg["provider"]["security_group"]["IpPermissions"] = [_SSH_ONLY, _OFFICE_8265]
    cfg["available_node_types"]["ray.head.default"]["resources"]["GPU"] = 0  # hiding GPUs is allowed
    assert validate_cluster_config(cfg) == []


def test_local_provider_config() -> None:
    local = {"cluster_name": "lab", "provider": {"type": "local", "head_ip": "10.0.0.1", "worker_ips": ["10.0.0.2"]},
             "auth": {"ssh_user": "me"}}
    assert validate_cluster_config(local) == []
    bad = dict(local, provider={"type": "local"})
    assert validate_cluster_config(bad) == ["provider: needs head_ip and worker_ips (or coordinator_address) "
                                            "for the local provider"]


def test_gpu_table() -> None:
    assert gpu_count_of("g5.xlarge") == 1 and gpu_count_of("p5.48xlarge") == 8 and gpu_count_of("P4d.24xlarge") == 8
    assert gpu_count_of("m6i.2xlarge") == 0
    assert gpu_count_of("g7.xlarge") is None  # unknown GPU family: unchecked, not guessed


def test_unreadable_files_raise_one_line(tmp_path: Path) -> None:
    with pytest.raises(ClusterConfigError, match=r"nope\.yaml: no such file"):
        validate_cluster_file(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("cluster_name: x\nprovider: [unclosed\n")
    with pytest.raises(ClusterConfigError, match=r"bad\.yaml: not valid YAML \(line \d+\)"):
        validate_cluster_file(bad)
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ClusterConfigError, match="expected a mapping"):
        validate_cluster_file(bad)


def test_check_cluster_file_raises_every_problem_on_one_line(tmp_path: Path) -> None:
    cfg = _load("ray-cluster.yaml")
    cfg.pop("cluster_name")
    cfg["available_node_types"]["gpu_1x"]["resources"]["GPU"] = 2
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ClusterConfigError) as err:
        check_cluster_file(path)
    msg = str(err.value)
    assert "\n" not in msg and "2 problem(s)" in msg and "cluster_name" in msg and "gpu_1x.resources.GPU" in msg
    check_cluster_file(ROOT / "ray-cluster.yaml")  # valid: no exception


def test_cli_validate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from e2e_dist.cli import main

    assert main(["cluster", "validate", str(ROOT / "ray-cluster.yaml"), str(ROOT / "cluster/local-autoscale.yaml")]) == 0
    out = capsys.readouterr()
    assert out.out.count(": ok") == 2 and out.err == ""  # the shipped files: no error, no warning
    cfg = _load("ray-cluster.yaml")
    cfg["available_node_types"]["gpu_1x"]["min_workers"] = 9
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(cfg))
    assert main(["cluster", "validate", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"e2e-dist: error: {bad}: available_node_types.gpu_1x.min_workers: 9 > max_workers 8; "
                   "the autoscaler could never satisfy it"]
    assert main(["cluster", "validate", str(tmp_path / "missing.yaml")]) == 2
    assert "e2e-dist: error:" in (e := capsys.readouterr().err) and "missing.yaml: no such file" in e


def test_workers_without_an_instance_profile_are_a_warning(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Ray gives its default role to the head only: GPU workers writing to s3:// would fail."""
    from e2e_dist.cli import main

    cfg = _load("ray-cluster.yaml")
    del cfg["available_node_types"]["gpu_8x"]["node_config"]["IamInstanceProfile"]
    del cfg["available_node_types"]["ray.head.default"]["node_config"]["IamInstanceProfile"]
    found = lint_cluster_config(cfg)
    assert found.errors == []
    assert [w.split(": ", 1)[0] for w in found.warnings] == [
        "available_node_types.ray.head.default.node_config.IamInstanceProfile",
        "available_node_types.gpu_8x.node_config.IamInstanceProfile"]
    assert "no AWS credentials" in found.warnings[1] and "ray-autoscaler-v1" in found.warnings[0]
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["cluster", "validate", str(path)]) == 0  # warnings do not fail validation
    out = capsys.readouterr()
    assert out.out.strip() == f"{path}: ok (2 warning(s))"
    assert [ln.split(": ")[1] for ln in out.err.splitlines()] == ["warning", "warning"]


def test_single_file_mounts_are_a_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray warns about a mounted single file on every `ray` command; validate says it once, and the
    shipped files mount folders only (checked from the repository root, where `ray up` runs)."""
    monkeypatch.chdir(ROOT)
    for rel in ("ray-cluster.yaml", "cluster/onprem.yaml"):
        assert lint_cluster_config(_load(rel)).warnings == [], rel
    cfg = _load("cluster/onprem.yaml")
    cfg["file_mounts"]["~/e2e-dist/pyproject.toml"] = "./pyproject.toml"
    found = lint_cluster_config(cfg)
    assert found.errors == [] and found.warnings == [
        "file_mounts.~/e2e-dist/pyproject.toml: ./pyproject.toml is a single file (Ray warns about it on every "
        "command); mount a folder"]
