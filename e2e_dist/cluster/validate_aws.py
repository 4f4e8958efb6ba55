"""Checks of an AWS cluster-launcher file that Ray's own schema lets through, all offline.

Ray's schema leaves `provider` and every `node_config` free-form, so a misspelled key there goes
through until `ray up` calls EC2. Here:

- `provider`: only keys Ray's AWS provider or its autoscaler read; `region` known to botocore's
  endpoint data; each availability zone inside that region;
- `node_config`: the shape of EC2's `RunInstances` input from botocore's own service model (ships
  with boto3, no network): unknown keys at any depth, wrong types, values outside an enum;
- the GPU count a node type declares against its instance type;
- security-group ingress open to the world on anything but SSH;
- warnings (they do not fail validation): a worker type without an instance profile (Ray attaches
  its default role to the head only, so those workers cannot reach S3), a head on Ray's default
  role (EC2 and S3 full access).
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

# What Ray's AWS provider (autoscaler/_private/aws) and the autoscaler read from `provider:`.
AWS_PROVIDER_KEYS = frozenset({
    "type", "region", "availability_zone", "cache_stopped_nodes", "security_group", "use_internal_ips",
    "use_external_head_ip", "key_pair", "aws_credentials", "cloudwatch", "disable_node_updaters",
    "disable_launch_config_check", "foreground_node_launch", "worker_liveness_check",
})
# Enum-typed fields whose values are not checked: new instance types appear before botocore knows them.
_NO_ENUM_CHECK = frozenset({"InstanceType"})

POLICY_HINT = "cluster/aws/ (worker-policy.json, head-policy.json; cluster/README.md says how)"

# NVIDIA GPUs per AWS instance type (what Ray auto-detects on the node). Types of a family listed
# here but a size that is not are left unchecked, as are unknown g*/p* families.
AWS_GPU_COUNT: dict[str, int] = {
    **{f"g4dn.{s}": 1 for s in ("xlarge", "2xlarge", "4xlarge", "8xlarge", "16xlarge")}, "g4dn.12xlarge": 4,
    "g4dn.metal": 8,
    **{f"g5.{s}": 1 for s in ("xlarge", "2xlarge", "4xlarge", "8xlarge", "16xlarge")},
    "g5.12xlarge": 4, "g5.24xlarge": 4, "g5.48xlarge": 8,
    **{f"g6.{s}": 1 for s in ("xlarge", "2xlarge", "4xlarge", "8xlarge", "16xlarge")},
    "g6.12xlarge": 4, "g6.24xlarge": 4, "g6.48xlarge": 8,
    **{f"g6e.{s}": 1 for s in ("xlarge", "2xlarge", "4xlarge", "8xlarge", "16xlarge")},
    "g6e.12xlarge": 4, "g6e.24xlarge": 4, "g6e.48xlarge": 8,
    "p3.2xlarge": 1, "p3.8xlarge": 4, "p3.16xlarge": 8, "p3dn.24xlarge": 8,
    "p4d.24xlarge": 8, "p4de.24xlarge": 8,
    "p5.4xlarge": 1, "p5.48xlarge": 8, "p5e.48xlarge": 8, "p5en.48xlarge": 8, "p6-b200.48xlarge": 8,
}
# Families whose instances carry GPUs (or accelerators Ray does not count as GPU): never "0".
_ACCEL_FAMILY = re.compile(r"^(g\d|p\d|gr\d|inf\d|trn\d|dl\d|vt\d|f\d)")
_WORLD = ("0.0.0.0/0", "::/0")


def gpu_count_of(instance_type: str) -> int | None:
    """GPUs of an AWS instance type: the table, 0 for CPU-only families, None when unknown."""
    itype = instance_type.strip().lower()
    if itype in AWS_GPU_COUNT:
        return AWS_GPU_COUNT[itype]
    family = itype.split(".", 1)[0]
    if "." not in itype or _ACCEL_FAMILY.match(family):
        return None
    return 0


def node_types(config: dict[str, Any]) -> dict[str, Any]:
    types = config.get("available_node_types")
    return {k: v for k, v in types.items() if isinstance(v, dict)} if isinstance(types, dict) else {}


def aws_errors(raw: dict[str, Any], config: dict[str, Any]) -> list[str]:
    """Problems of an `aws` provider file (`raw` as written, `config` after Ray's preparation)."""
    out = _provider(raw.get("provider") or {})
    for name, spec in node_types(raw).items():
        node_config = spec.get("node_config")
        if isinstance(node_config, dict):
            out += _shape(node_config, _run_instances(), f"available_node_types.{name}.node_config")
    return out + _gpu_counts(config) + _ingress(config)


def aws_warnings(raw: dict[str, Any]) -> list[str]:
    head = raw.get("head_node_type")
    out = []
    for name, spec in node_types(raw).items():
        if "IamInstanceProfile" in (spec.get("node_config") or {}):
            continue
        where = f"available_node_types.{name}.node_config.IamInstanceProfile"
        if name == head:
            out.append(f"{where}: missing: Ray attaches its default role `ray-autoscaler-v1` (EC2 and S3 full "
                       f"access to every bucket); a least-privilege head role: {POLICY_HINT}")
        else:
            out.append(f"{where}: missing: Ray gives its default role to the head only, so this type's "
                       f"workers get no AWS credentials and checkpoint uploads to s3:// fail; attach a "
                       f"profile for the run bucket: {POLICY_HINT}")
    return out


# ------------------------------------------------------------------------------- provider
@lru_cache(maxsize=1)
def _regions() -> frozenset[str]:
    import botocore.session

    session = botocore.session.get_session()
    return frozenset(r for part in session.get_available_partitions()
                     for r in session.get_available_regions("ec2", partition_name=part))


def _provider(provider: dict[str, Any]) -> list[str]:
    out = [f"provider.{k}: unknown field for the aws provider" for k in provider if k not in AWS_PROVIDER_KEYS]
    region = provider.get("region")
    if not region:
        return [*out, "provider.region: missing (the AWS region nodes are launched in, e.g. us-west-2)"]
    if region not in _regions():
        return [*out, f"provider.region: {region!r} is not an AWS region botocore knows (e.g. us-west-2)"]
    zones = provider.get("availability_zone")
    if zones is not None:
        for zone in (z.strip() for z in str(zones).split(",")):
            # us-west-2a, or a Local Zone like us-west-2-lax-1a: always the region, then more
            if not re.fullmatch(re.escape(region) + r"(-[a-z0-9-]+)?[a-z]", zone):
                out.append(f"provider.availability_zone: {zone!r} is not a zone of region {region}")
    return out


# ------------------------------------------------------------------------------ node_config
@lru_cache(maxsize=1)
def _run_instances():
    import botocore.session

    return botocore.session.get_session().get_service_model("ec2").operation_model("RunInstances").input_shape


_SCALARS = {"string": (str,), "integer": (int,), "long": (int,), "boolean": (bool,), "double": (int, float),
            "float": (int, float), "timestamp": (str,), "blob": (str, bytes)}


def _shape(value: Any, shape: Any, at: str) -> list[str]:
    """Problems of `value` against a botocore shape: unknown keys, wrong types, enum values."""
    kind = shape.type_name
    if kind == "structure":
        if not isinstance(value, dict):
            return [f"{at}: expected a mapping ({shape.name}), got {type(value).__name__}"]
        out = []
        for key, sub in value.items():
            if key not in shape.members:
                close = _close_match(str(key), shape.members)
                out.append(f"{at}.{key}: unknown field of EC2 {shape.name}" + (f" (did you mean {close}?)" if close else ""))
            else:
                out += _shape(sub, shape.members[key], f"{at}.{key}")
        return out
    if kind == "list":
        if not isinstance(value, list):
            return [f"{at}: expected a list, got {type(value).__name__}"]
        return [p for i, v in enumerate(value) for p in _shape(v, shape.member, f"{at}[{i}]")]
    if kind == "map":
        if not isinstance(value, dict):
            return [f"{at}: expected a mapping, got {type(value).__name__}"]
        return [p for k, v in value.items() for p in _shape(v, shape.value, f"{at}.{k}")]
    allowed = _SCALARS.get(kind, (object,))
    if isinstance(value, bool) and bool not in allowed or not isinstance(value, allowed):
        return [f"{at}: expected {kind}, got {type(value).__name__} {value!r}"[:300]]
    enum = getattr(shape, "enum", None)
    if enum and value not in enum and at.rsplit(".", 1)[-1] not in _NO_ENUM_CHECK:
        return [f"{at}: {value!r} is not one of {', '.join(list(enum)[:8])}{', ...' if len(enum) > 8 else ''}"]
    return []


def _close_match(key: str, members: Any) -> str | None:
    import difflib

    lowered = {m.lower(): m for m in members}
    if key.lower() in lowered:
        return lowered[key.lower()]
    found = difflib.get_close_matches(key, list(members), n=1, cutoff=0.8)
    return found[0] if found else None


# ---------------------------------------------------------------------- GPUs and ingress
def _gpu_counts(config: dict[str, Any]) -> list[str]:
    out = []
    for name, spec in node_types(config).items():
        itype = (spec.get("node_config") or {}).get("InstanceType")
        resources = spec.get("resources") or {}
        if not itype or "GPU" not in resources:
            continue  # Ray detects the GPUs from the instance type itself
        expected = gpu_count_of(str(itype))
        declared = resources["GPU"]
        if expected is None or declared == expected or declared == 0:
            continue  # unknown type; or GPU: 0 hides the GPUs on purpose
        has = f"has {expected} GPU{'s' if expected != 1 else ''}" if expected else "has no GPU"
        out.append(f"available_node_types.{name}.resources.GPU: {declared} but {itype} {has}")
    return out


def _ports(rule: dict[str, Any]) -> str | None:
    """The world-open port range of an IpPermissions rule other than SSH, as text; else None."""
    world = [r.get("CidrIp") for r in rule.get("IpRanges") or []] + \
            [r.get("CidrIpv6") for r in rule.get("Ipv6Ranges") or []]
    if not any(cidr in _WORLD for cidr in world):
        return None
    proto = str(rule.get("IpProtocol", "tcp"))
    lo, hi = rule.get("FromPort", -1), rule.get("ToPort", rule.get("FromPort", -1))
    if proto == "-1" or lo in (-1, None) or hi in (-1, None):
        return "all ports"
    if proto == "tcp" and lo == 22 and hi == 22:
        return None
    return f"{proto} port {lo}" if lo == hi else f"{proto} ports {lo}-{hi}"


def _ingress(config: dict[str, Any]) -> list[str]:
    rules = ((config.get("provider") or {}).get("security_group") or {}).get("IpPermissions") or []
    out = []
    for i, rule in enumerate(rules):
        if isinstance(rule, dict) and (ports := _ports(rule)):
            out.append(f"provider.security_group.IpPermissions[{i}]: {ports} open to the internet; only SSH (22) "
                       f"may be: reach the dashboard / Jobs API with `ray dashboard` (an SSH tunnel)")
    return out
