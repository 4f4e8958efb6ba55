"""Offline validation of cluster yamls: Ray's own schema plus the mistakes Ray lets through.

Ray cluster-launcher files go through Ray's `prepare_config` (defaults) and `validate_config`
(JSON schema), exactly as `ray up` would, but without touching a cloud API. Then our checks, each
seen accepted by Ray 2.60:

- a missing `cluster_name` (Ray silently uses "default", so two such clusters collide);
- per node type `min_workers` > `max_workers`;
- (warning) a file mount that is a single file, which Ray warns about on every command;
- AWS (validate_aws.py): unknown `provider` keys, the region and zones, every `node_config`
  against EC2's RunInstances shape, GPU counts, world-open ingress; warnings for node types
  without an instance profile; EFA types (validate_efa.py): their EFA interfaces, one subnet and
  one security group for them, a cluster placement group;
- secrets written into the file (AWS keys, W&B key, Ray token) instead of passed at submit time.

KubeRay `RayCluster` / `RayJob` manifests: validate_kuberay.py (KubeRay's CRD schema + checks).

Every finding is one line that starts with the path of the key it is about. Errors fail
validation; warnings (`Findings.warnings`) are printed and do not.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from e2e_dist.cluster.validate_aws import (
    AWS_GPU_COUNT,
    aws_errors,
    aws_warnings,
    gpu_count_of,
    node_types,
)
from e2e_dist.cluster.validate_efa import efa_errors
from e2e_dist.cluster.validate_kuberay import kuberay_errors
from e2e_dist.config_files import safe_load_yaml
from e2e_dist.errors import UserError


class ClusterConfigError(UserError):
    """A cluster yaml is unreadable or has problems (all listed, `; `-separated)."""


SECRET_NAMES = (
    "AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN", "WANDB_API_KEY",
    "RAY_AUTH_TOKEN", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN",
)
# NAME=value / NAME: value with a literal value (not `$VAR`, `${VAR}`, empty or a quote pair).
_SECRET_ASSIGN = re.compile(
    r"\b(" + "|".join(SECRET_NAMES) + r")\s*[=:]\s*(?![\s'\"]*(?:\$|$|['\"]\s))['\"]?[^\s'\"$]")
_AWS_KEY_ID = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a yaml mapping or raise a one-line ClusterConfigError naming the file."""
    p = Path(path)
    if not p.is_file():
        raise ClusterConfigError(f"{path}: no such file")
    data = safe_load_yaml(p.read_text(), lambda line, problem: ClusterConfigError(
        f"{path}: not valid YAML{'' if line is None else f' (line {line})'}: {problem}"))
    if not isinstance(data, dict):
        raise ClusterConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


@dataclass
class Findings:
    """What validation found: errors fail it, warnings are said and do not."""

    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def lint_cluster_config(config: dict[str, Any]) -> Findings:
    if str(config.get("apiVersion", "")).startswith("ray.io/"):
        return Findings(_dedupe(kuberay_errors(config) + _secret_problems(config)))
    return _lint_launcher(config)


def lint_cluster_file(path: str | Path) -> Findings:
    """Errors and warnings of a cluster yaml. Unreadable files raise."""
    return lint_cluster_config(load_yaml(path))


def validate_cluster_config(config: dict[str, Any]) -> list[str]:
    """The errors of a cluster config (empty list: valid)."""
    return lint_cluster_config(config).errors


def validate_cluster_file(path: str | Path) -> list[str]:
    """The errors of a cluster yaml (empty list: valid). Unreadable files raise."""
    return lint_cluster_file(path).errors


def check_cluster_file(path: str | Path) -> None:
    """Raise ClusterConfigError (one line, every problem) unless the file is valid."""
    problems = validate_cluster_file(path)
    if problems:
        raise ClusterConfigError(f"{path}: {len(problems)} problem(s): " + "; ".join(problems))


# ----------------------------------------------------------------------- cluster launcher
def _lint_launcher(raw: dict[str, Any]) -> Findings:
    problems: list[str] = []
    if not raw.get("cluster_name"):
        problems.append("cluster_name: missing (Ray would use 'default', and two such clusters collide)")
    provider = raw.get("provider")
    if not isinstance(provider, dict) or not provider.get("type"):
        problems.append("provider.type: missing (aws, gcp, azure, local, external, ...)")
        return Findings(problems + _secret_problems(raw))
    prepared, ray_problems = _ray_schema(raw)
    config = prepared if prepared is not None else raw
    problems += _worker_bounds(config)
    warnings = _single_file_mounts(raw)
    if provider["type"] == "aws":
        problems += aws_errors(raw, config) + efa_errors(raw)
        warnings += aws_warnings(raw)
    # ours first: where Ray's schema sees the same field, our line says more
    return Findings(_dedupe(problems + ray_problems + _secret_problems(raw)), warnings)


def _single_file_mounts(raw: dict[str, Any]) -> list[str]:
    """Ray's own check, said once with its fix: every `ray` command warns about a file mount whose
    local side is a file (its Docker check runs for every provider, as the defaults hold `docker: {}`).
    Like Ray, relative to the current directory, where `ray up` runs."""
    mounts = raw.get("file_mounts")
    return [f"file_mounts.{remote}: {local} is a single file (Ray warns about it on every command); mount a folder"
            for remote, local in (mounts.items() if isinstance(mounts, dict) else ())
            if isinstance(local, str) and Path(local).is_file()]


def _ray_schema(raw: dict[str, Any]) -> tuple[dict[str, Any] | None, list[str]]:
    """Ray's own preparation + JSON schema, quietly (Ray's CLI logger prints on abort)."""
    import jsonschema
    from e2e_dist import ray_compat

    prepare_config, validate_config = ray_compat.autoscaler_config_checks()

    config = copy.deepcopy(raw)
    sink = io.StringIO()
    ray_log = logging.getLogger("ray.autoscaler")
    level = ray_log.level
    ray_log.setLevel(logging.ERROR)  # "setting max workers for ...", "dropping legacy field ...": noise here
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
    where = _dotted(e.absolute_path)
    msg = " ".join(str(e.message).split())
    extra = re.search(r"\('([^']+)' (?:was|were) unexpected\)", msg)
    required = re.match(r"'([^']+)' is a required property", msg)
    if extra:
        where = f"{where}.{extra.group(1)}" if where else extra.group(1)
        msg = "unknown field (Ray's schema does not allow it)"
    elif required:
        where = f"{where}.{required.group(1)}" if where else required.group(1)
        msg = "missing (required by Ray's schema)"
    return f"{where or '(top level)'}: {msg[:300]}"


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
    where = next((f for needle, f in _RAY_ERROR_FIELDS if needle in msg), "(config)")
    return f"{where}: {msg[:300]}"


def _worker_bounds(config: dict[str, Any]) -> list[str]:
    out = []
    for name, spec in node_types(config).items():
        lo, hi = spec.get("min_workers", 0), spec.get("max_workers")
        if isinstance(lo, int) and isinstance(hi, int) and lo > hi:
            out.append(f"available_node_types.{name}.min_workers: {lo} > max_workers {hi}; "
                       f"the autoscaler could never satisfy it")
        if isinstance(lo, int) and lo < 0:
            out.append(f"available_node_types.{name}.min_workers: {lo} is negative")
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
    for where, key, value in _walk(config):
        if value is None or value == "":
            continue
        text = str(value)
        if key in SECRET_NAMES and not text.startswith("$"):
            out.append(f"{where}: literal {key} value in the file; pass it from your environment at submit "
                       f"time (e2e-dist submit forwards it) or use instance profiles / k8s secrets")
            continue
        m = _SECRET_ASSIGN.search(text)
        if m:
            out.append(f"{where}: literal {m.group(1)} value in the file; pass it from your environment at "
                       f"submit time (e2e-dist submit forwards it) or use an instance profile")
        elif _AWS_KEY_ID.search(text):
            out.append(f"{where}: looks like an AWS access key id; use the nodes' instance profile instead")
    return out


def _dedupe(items: list[str]) -> list[str]:
    """One problem per field: the first (ours come before Ray's where both see the same field)."""
    seen: set[str] = set()
    return [x for x in items if not ((f := x.split(": ", 1)[0]) in seen or seen.add(f))]


__all__ = ["AWS_GPU_COUNT", "ClusterConfigError", "Findings", "check_cluster_file", "gpu_count_of",
           "lint_cluster_config", "lint_cluster_file", "load_yaml", "validate_cluster_config", "validate_cluster_file"]
