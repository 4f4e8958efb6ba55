"""Offline checks of KubeRay `RayCluster` / `RayJob` manifests.

1. The manifest's `spec` against KubeRay's own CRD schema (v1), trimmed and shipped with the
   package (schemas/kuberay-crd-spec.json; its `source`, `version` and `commit` fields say where
   it came from, cluster/kuberay/trim_crd.py regenerates it): unknown fields at any depth (what
   `kubectl apply`'s strict field validation rejects), missing required fields, wrong types,
   values outside an enum.
2. What the schema cannot say: the autoscaler must be on for groups that scale from 0, replica
   bounds, `num-gpus` against the container's GPU limit, a job with nowhere to run.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

SCHEMA_FILE = Path(__file__).resolve().parent / "schemas" / "kuberay-crd-spec.json"
_TYPES = {"string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,), "object": (dict,),
          "array": (list,)}


@lru_cache(maxsize=1)
def crd_schema() -> dict[str, Any]:
    return json.loads(SCHEMA_FILE.read_text())


def kuberay_errors(doc: dict[str, Any]) -> list[str]:
    kind = doc.get("kind")
    spec = doc.get("spec")
    if kind not in ("RayCluster", "RayJob"):
        return [f"kind: {kind!r} is not RayCluster or RayJob"]
    if not isinstance(spec, dict):
        return ["spec: missing"]
    problems: list[str] = []
    if not (doc.get("metadata") or {}).get("name"):
        problems.append("metadata.name: missing")
    schema = crd_schema()
    problems += check(spec, schema["kinds"][kind], "spec", schema["$defs"])
    if kind == "RayCluster":
        problems += _raycluster_spec(spec, "spec")
    else:
        if not spec.get("entrypoint") and spec.get("submissionMode") != "InteractiveMode":
            problems.append("spec.entrypoint: missing (the command the job runs)")
        if "rayClusterSpec" in spec:
            problems += _raycluster_spec(spec["rayClusterSpec"] or {}, "spec.rayClusterSpec")
        elif not spec.get("clusterSelector"):
            problems.append("spec: needs rayClusterSpec (a cluster for the job) or clusterSelector (an existing one)")
    return problems


def check(value: Any, schema: dict[str, Any], at: str, defs: dict[str, Any]) -> list[str]:
    """Problems of `value` against a (structural, Kubernetes-flavoured) OpenAPI v3 schema."""
    while "$ref" in schema:
        schema = defs[schema["$ref"].rsplit("/", 1)[-1]]
    if value is None and schema.get("nullable"):
        return []
    if schema.get("x-kubernetes-int-or-string"):
        ok = isinstance(value, (int, str)) and not isinstance(value, bool)
        return [] if ok else [f"{at}: expected an integer or a string, got {type(value).__name__}"]
    kind = schema.get("type")
    if kind in _TYPES:
        allowed = _TYPES[kind]
        if isinstance(value, bool) and bool not in allowed or not isinstance(value, allowed):
            return [f"{at}: expected {kind}, got {type(value).__name__} {value!r}"[:300]]
    if "enum" in schema and value not in schema["enum"]:
        return [f"{at}: {value!r} is not one of {', '.join(map(str, schema['enum']))}"[:300]]
    if isinstance(value, list) and "items" in schema:
        return [p for i, v in enumerate(value) for p in check(v, schema["items"], f"{at}[{i}]", defs)]
    if isinstance(value, dict):
        return _check_object(value, schema, at, defs)
    return []


def _check_object(value: dict[str, Any], schema: dict[str, Any], at: str, defs: dict[str, Any]) -> list[str]:
    props, extra = schema.get("properties"), schema.get("additionalProperties")
    out = [f"{at}.{k}: missing (required by the KubeRay CRD)" for k in schema.get("required", []) if k not in value]
    for key, sub in value.items():
        if props is not None and key in props:
            out += check(sub, props[key], f"{at}.{key}", defs)
        elif isinstance(extra, dict):
            out += check(sub, extra, f"{at}.{key}", defs)
        elif props is not None and not extra and not schema.get("x-kubernetes-preserve-unknown-fields"):
            out.append(f"{at}.{key}: unknown field (not in the KubeRay {crd_schema()['version']} CRD)")
    return out


# ------------------------------------------------------------------- what the schema cannot say
def _raycluster_spec(spec: dict[str, Any], at: str) -> list[str]:
    out = []
    if not isinstance(spec.get("headGroupSpec"), dict):
        out.append(f"{at}.headGroupSpec: missing")
    autoscaling = bool(spec.get("enableInTreeAutoscaling"))
    from_zero = []
    for i, group in enumerate(spec.get("workerGroupSpecs") or []):
        if not isinstance(group, dict):
            continue
        where = f"{at}.workerGroupSpecs[{i}]"
        lo, hi = group.get("minReplicas", 0), group.get("maxReplicas")
        replicas = group.get("replicas", lo)
        if isinstance(hi, int) and isinstance(lo, int) and lo > hi:
            out.append(f"{where}.minReplicas: {lo} > maxReplicas {hi}")
        elif isinstance(hi, int) and isinstance(replicas, int) and isinstance(lo, int) and not lo <= replicas <= hi:
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
