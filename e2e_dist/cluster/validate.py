"""Offline validation of cluster yamls: Ray's own schema plus the mistakes Ray lets through.

Ray cluster-launcher files (`ray up` / fake_multinode / local providers) go through Ray's
`prepare_config` (defaults) and `validate_config` (JSON schema), exactly as `ray up` would, but
without touching a cloud API. Then our checks, each seen accepted by Ray 2.60:

- a missing `cluster_name` (Ray silently uses "default", so two such clusters collide);
- per node type `min_workers` > `max_workers`;
- a GPU count that does not match the AWS instance type;
- security-group ingress open to the world (0.0.0.0/0, ::/0) on anything but SSH (22);
- secrets written into the file (AWS keys, W&B key, Ray token) instead of passed at submit time.

KubeRay `RayCluster` / `RayJob` manifests get the structural checks that matter here (autoscaler
on for groups that scale from 0, replica bounds, GPU limits, literal secrets).

Every problem is one line that starts with the field it is about.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import re
from pathlib import Path
from typing import Any, Iterator

import yaml

from e2e_dist.errors import UserError


class ClusterConfigError(UserError):
    """A cluster yaml is unreadable or has problems (all listed, `; `-separated)."""


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


def gpu_count_of(instance_type: str) -> int | None:
    """GPUs of an AWS instance type: the table, 0 for CPU-only families, None when unknown."""
    itype = instance_type.strip().lower()
    if itype in AWS_GPU_COUNT:
        return AWS_GPU_COUNT[itype]
    family = itype.split(".", 1)[0]
    if "." not in itype or _ACCEL_FAMILY.match(family):
        return None
    return 0


SECRET_NAMES = (
    "AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN", "WANDB_API_KEY",
    "RAY_AUTH_TOKEN", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN",
)
# NAME=value / NAME: value with a literal value (not `$VAR`, `${VAR}`, empty or a quote pair).
_SECRET_ASSIGN = re.compile(
    r"\b(" + "|".join(SECRET_NAMES) + r")\s*[=:]\s*(?![\s'\"]*(?:\$|$|['\"]\s))['\"]?[^\s'\"$]")
_AWS_KEY_ID = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")
_WORLD = ("0.0.0.0/0", "::/0")


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a yaml mapping or raise a one-line ClusterConfigError naming the file."""
    p = Path(path)
    if not p.is_file():
        raise ClusterConfigError(f"{path}: no such file")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise ClusterConfigError(f"{path}: not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    if not isinstance(data, dict):
        raise ClusterConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def validate_cluster_file(path: str | Path) -> list[str]:
    """All problems of a cluster yaml (empty list: valid). Unreadable files raise."""
    return validate_cluster_config(load_yaml(path))


def check_cluster_file(path: str | Path) -> None:
    """Raise ClusterConfigError (one line, every problem) unless the file is valid."""
    problems = validate_cluster_file(path)
    if problems:
        raise ClusterConfigError(f"{path}: {len(problems)} problem(s): " + "; ".join(problems))


def validate_cluster_config(config: dict[str, Any]) -> list[str]:
    if str(config.get("apiVersion", "")).startswith("ray.io/"):
        return _validate_kuberay(config)
    return _validate_launcher(config)


# ----------------------------------------------------------------------- cluster launcher
def _validate_launcher(raw: dict[str, Any]) -> list[str]:
    problems: list[str] = []
    if not raw.get("cluster_name"):
        problems.append("cluster_name: missing (Ray would use 'default', and two such clusters collide)")
    provider = raw.get("provider")
    if not isinstance(provider, dict) or not provider.get("type"):
        problems.append("provider.type: missing (aws, gcp, azure, local, fake_multinode, ...)")
        return problems + _secret_problems(raw)
    prepared, ray_problems = _ray_schema(raw)
    problems += ray_problems
    config = prepared if prepared is not None else raw
    problems += _worker_bounds(config)
    if provider["type"] == "aws":
        problems += _gpu_counts(config)
        problems += _ingress(config)
    problems += _secret_problems(raw)
    return _dedupe(problems)


def _ray_schema(raw: dict[str, Any]) -> tuple[dict[str, Any] | None, list[str]]:
    """Ray's own preparation + JSON schema, quietly (Ray's CLI logger prints on abort)."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = copy.deepcopy(raw)
    sink = io.StringIO()
    ray_log = logging.getLogger("ray.autoscaler")
    level = ray_log.level
    ray_log.setLevel(logging.WARNING)  # "setting max workers for ..." is noise here
    try:
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            try:
                config = prepare_config(config)
            except FileNotFoundError:
                # fake_multinode: its defaults file is not in the wheel, and Ray's autoscaler then
                # validates the file as written. Do the same (so every field must be present).
                config = copy.deepcopy(raw)
            validate_config(config)
    except jsonschema.ValidationError as e:
        return None, [_schema_problem(e)]
    except Exception as e:  # ValueError / RuntimeError / ClickException from Ray's checks
        return None, [_ray_error_problem(e)]
    finally:
        ray_log.setLevel(level)
    return config, []


def _dotted(path: Iterator[Any] | Any) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _schema_problem(e: Any) -> str:
    field = _dotted(e.absolute_path)
    msg = " ".join(str(e.message).split())
    extra = re.search(r"\('([^']+)' (?:was|were) unexpected\)", msg)
    required = re.match(r"'([^']+)' is a required property", msg)
    if extra:
        field = f"{field}.{extra.group(1)}" if field else extra.group(1)
        msg = "unknown field (Ray's schema does not allow it)"
    elif required:
        field = f"{field}.{required.group(1)}" if field else required.group(1)
        msg = "missing (required by Ray's schema)"
    return f"{field or '(top level)'}: {msg[:300]}"


_RAY_ERROR_FIELDS = (
    ("head_node_type", "head_node_type"), ("sum of `min_workers`", "max_workers"),
    ("cluster_synced_files", "cluster_synced_files"), ("available_node_types", "available_node_types"),
    ("worker_ips", "provider.worker_ips"), ("head_ip", "provider.head_ip"), ("docker", "docker"),
    ("container", "docker"), ("max_workers", "max_workers"), ("head_node", "head_node"),
)


_RAY_ERROR_REWRITES = (
    ("Missing 'cluster_synced_files'", "cluster_synced_files: missing (this provider has no defaults in Ray's "
                                       "wheel: every field of the config must be present, the empty ones too)"),
    ("supply a `head_ip`", "provider: needs head_ip and worker_ips (or coordinator_address) for the local provider"),
)


def _ray_error_problem(e: Exception) -> str:
    msg = " ".join(str(getattr(e, "message", None) or e).split()) or type(e).__name__
    for needle, rewritten in _RAY_ERROR_REWRITES:
        if needle in msg:
            return rewritten
    field = next((f for needle, f in _RAY_ERROR_FIELDS if needle in msg), "(config)")
    return f"{field}: {msg[:300]}"


def _node_types(config: dict[str, Any]) -> dict[str, Any]:
    types = config.get("available_node_types")
    return types if isinstance(types, dict) else {}


def _worker_bounds(config: dict[str, Any]) -> list[str]:
    out = []
    for name, spec in _node_types(config).items():
        if not isinstance(spec, dict):
            continue
        lo, hi = spec.get("min_workers", 0), spec.get("max_workers")
        if isinstance(lo, int) and isinstance(hi, int) and lo > hi:
            out.append(f"available_node_types.{name}.min_workers: {lo} > max_workers {hi}; "
                       f"the autoscaler could never satisfy it")
        if isinstance(lo, int) and lo < 0:
            out.append(f"available_node_types.{name}.min_workers: {lo} is negative")
    return out


def _gpu_counts(config: dict[str, Any]) -> list[str]:
    out = []
    for name, spec in _node_types(config).items():
        if not isinstance(spec, dict):
            continue
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


# --------------------------------------------------------------------------- secrets
def _walk(node: Any, path: str = "") -> Iterator[tuple[str, Any, Any]]:
    """(field path, key, value) for every leaf; key is the mapping key that holds it (or None)."""
    if isinstance(node, dict):
        for k, v in node.items():
            sub = f"{path}.{k}" if path else str(k)
            if isinstance(v, (dict, list)):
                yield from _walk(v, sub)
            else:
                yield sub, k, v
    elif isinstance(node, list):
        for i, v in enumerate(node):
            sub = f"{path}[{i}]"
            if isinstance(v, (dict, list)):
                # k8s style env: [{name: X, value: literal}]
                if isinstance(v, dict) and v.get("name") in SECRET_NAMES and "value" in v:
                    yield sub + ".value", v["name"], v["value"]
                    v = {k: x for k, x in v.items() if k != "value"}
                yield from _walk(v, sub)
            else:
                yield sub, None, v


def _secret_problems(config: dict[str, Any]) -> list[str]:
    """Literal secrets anywhere in the file. The values themselves are never echoed."""
    out = []
    for field, key, value in _walk(config):
        if value is None or value == "":
            continue
        text = str(value)
        if key in SECRET_NAMES and not text.startswith("$"):
            out.append(f"{field}: literal {key} value in the file; pass it from your environment at submit "
                       f"time (e2e-dist submit forwards it) or use instance profiles / k8s secrets")
            continue
        m = _SECRET_ASSIGN.search(text)
        if m:
            out.append(f"{field}: literal {m.group(1)} value in the file; pass it from your environment at "
                       f"submit time (e2e-dist submit forwards it) or use an instance profile")
        elif _AWS_KEY_ID.search(text):
            out.append(f"{field}: looks like an AWS access key id; use the nodes' instance profile instead")
    return out


# ----------------------------------------------------------------------------- KubeRay
def _validate_kuberay(doc: dict[str, Any]) -> list[str]:
    kind = doc.get("kind")
    spec = doc.get("spec")
    if not isinstance(spec, dict):
        return ["spec: missing"]
    problems: list[str] = []
    if not (doc.get("metadata") or {}).get("name"):
        problems.append("metadata.name: missing")
    if kind == "RayCluster":
        problems += _raycluster_spec(spec, "spec")
    elif kind == "RayJob":
        if not spec.get("entrypoint"):
            problems.append("spec.entrypoint: missing (the command the job runs)")
        if "rayClusterSpec" in spec:
            problems += _raycluster_spec(spec["rayClusterSpec"] or {}, "spec.rayClusterSpec")
        elif not spec.get("clusterSelector"):
            problems.append("spec: needs rayClusterSpec (a cluster for the job) or clusterSelector (an existing one)")
    else:
        problems.append(f"kind: {kind!r} is not RayCluster or RayJob")
    return problems + _secret_problems(doc)


def _raycluster_spec(spec: dict[str, Any], at: str) -> list[str]:
    out = []
    if not isinstance(spec.get("headGroupSpec"), dict):
        out.append(f"{at}.headGroupSpec: missing")
    autoscaling = bool(spec.get("enableInTreeAutoscaling"))
    from_zero = []
    for i, group in enumerate(spec.get("workerGroupSpecs") or []):
        where = f"{at}.workerGroupSpecs[{i}]"
        lo, hi = group.get("minReplicas", 0), group.get("maxReplicas")
        replicas = group.get("replicas", lo)
        if isinstance(hi, int) and isinstance(lo, int) and lo > hi:
            out.append(f"{where}.minReplicas: {lo} > maxReplicas {hi}")
        elif isinstance(hi, int) and isinstance(replicas, int) and not lo <= replicas <= hi:
            out.append(f"{where}.replicas: {replicas} outside [minReplicas {lo}, maxReplicas {hi}]")
        if lo == 0 and not autoscaling:
            from_zero.append(str(group.get("groupName", i)))
        out += _pod_gpu_problems(group, where)
    if from_zero:
        out.append(f"{at}.enableInTreeAutoscaling: must be true: worker group(s) {', '.join(from_zero)} start at "
                   f"0 replicas and only the autoscaler adds pods")
    return out


def _pod_gpu_problems(group: dict[str, Any], where: str) -> list[str]:
    """`num-gpus` in rayStartParams must match the container's nvidia.com/gpu limit."""
    containers = ((group.get("template") or {}).get("spec") or {}).get("containers") or []
    if not containers:
        return [f"{where}.template.spec.containers: missing"]
    limits = (containers[0].get("resources") or {}).get("limits") or {}
    gpus = limits.get("nvidia.com/gpu")
    declared = (group.get("rayStartParams") or {}).get("num-gpus")
    if gpus is not None and declared is not None and str(declared) != str(gpus):
        return [f"{where}.rayStartParams.num-gpus: {declared} but the container's nvidia.com/gpu limit is {gpus}"]
    return []


def _dedupe(items: list[str]) -> list[str]:
    """One problem per field: the first (ours come before Ray's where both see the same field)."""
    seen: set[str] = set()
    return [x for x in items if not ((f := x.split(": ", 1)[0]) in seen or seen.add(f))]


__all__ = ["AWS_GPU_COUNT", "ClusterConfigError", "check_cluster_file", "load_yaml", "validate_cluster_config",
           "validate_cluster_file"]
