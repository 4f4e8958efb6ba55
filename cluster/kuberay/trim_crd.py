"""Regenerate e2e_dist/cluster/schemas/kuberay-crd-spec.json from KubeRay's CRDs (maintainers only).

    git clone https://github.com/ray-project/kuberay && git -C kuberay checkout v1.7.0
    python cluster/kuberay/trim_crd.py kuberay v1.7.0

Keeps the `spec` schema of the v1 RayCluster and RayJob CRDs (ray-operator/config/crd/bases/),
drops `status` (no one writes it), and stores every subtree that occurs more than once (the pod
template of head, worker and submitter pods) once under `$defs`, referenced by `$ref`: 1.6 MB of
CRD yaml become ~75 KB. `e2e-dist cluster validate` checks manifests against it offline.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import yaml

OUT = Path(__file__).resolve().parents[2] / "e2e_dist" / "cluster" / "schemas" / "kuberay-crd-spec.json"
CRDS = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}
MIN_SHARED_BYTES = 2000  # smaller repeated subtrees stay inline (readable, and little to gain)


def _canon(node) -> str:
    return json.dumps(node, sort_keys=True, separators=(",", ":"))


def trim(specs: dict) -> dict:
    counts: Counter[str] = Counter()

    def count(node) -> None:
        if isinstance(node, dict):
            if "type" in node and len(text := _canon(node)) > MIN_SHARED_BYTES:  # schema nodes only
                counts[text] += 1
            for v in node.values():
                count(v)
        elif isinstance(node, list):
            for v in node:
                count(v)

    for spec in specs.values():
        count(spec)
    shared = {text for text, n in counts.items() if n > 1}
    defs: dict[str, dict] = {}

    def dedupe(node):
        if isinstance(node, list):
            return [dedupe(v) for v in node]
        if not isinstance(node, dict):
            return node
        text = _canon(node)
        inner = {k: dedupe(v) for k, v in node.items()}
        if text not in shared:
            return inner
        name = "d" + hashlib.sha1(text.encode()).hexdigest()[:10]
        defs.setdefault(name, inner)
        return {"$ref": f"#/$defs/{name}"}

    return {"kinds": {kind: dedupe(spec) for kind, spec in specs.items()}, "$defs": defs}


def main(repo: str, ref: str) -> None:
    specs = {}
    for kind, name in CRDS.items():
        text = subprocess.check_output(["git", "-C", repo, "show", f"{ref}:ray-operator/config/crd/bases/{name}"])
        crd = yaml.safe_load(text)
        version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
        specs[kind] = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    commit = subprocess.check_output(["git", "-C", repo, "rev-parse", f"{ref}^{{commit}}"], text=True).strip()
    out = {"source": "https://github.com/ray-project/kuberay ray-operator/config/crd/bases (Apache-2.0)",
           "version": ref, "commit": commit, "apiVersion": "ray.io/v1", **trim(specs)}
    OUT.write_text(json.dumps(out, sort_keys=True, separators=(",", ":")) + "\n")
    print(f"{OUT}: {OUT.stat().st_size} bytes, {len(out['$defs'])} shared subtrees")


if __name__ == "__main__":
    main(*sys.argv[1:3])
