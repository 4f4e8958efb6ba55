"""The local autoscaling cluster's config: the shipped yaml with this cluster's addresses filled in.

What works with Ray 2.60: `ray start --head --autoscaling-config=FILE` runs the autoscaler (v1)
with FILE; `provider.type: external` with `module:` names our node provider
(cluster/local_provider.py), which reads the fields written into the provider section here.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from e2e_dist.cluster.local_node import LocalClusterError

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_AUTOSCALE_CONFIG = REPO_ROOT / "cluster" / "local-autoscale.yaml"
PROVIDER_MODULE = "e2e_dist.cluster.local_provider.LocalNodeProvider"


def render_autoscale_config(source: str | Path, dest: Path, *, gcs_address: str, head_ip: str, cluster_dir: Path,
                            netns_prefix: str | None, idle_timeout_minutes: float | None = None) -> Path:
    """Copy the autoscaling yaml with this cluster's GCS address, head, directory and network."""
    try:
        config = yaml.safe_load(Path(source).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise LocalClusterError(f"{source}: cannot read autoscaling config: {e}".splitlines()[0]) from None
    provider = config.setdefault("provider", {})
    if provider.get("type") != "external" or provider.get("module") != PROVIDER_MODULE:
        raise LocalClusterError(f"{source}: provider must be `type: external` with `module: {PROVIDER_MODULE}` "
                                f"for a local autoscaling cluster")
    provider.update(gcs_address=gcs_address, head_ip=head_ip, cluster_dir=str(cluster_dir),
                    netns_prefix=netns_prefix)
    if idle_timeout_minutes is not None:
        config["idle_timeout_minutes"] = idle_timeout_minutes
    dest.write_text(yaml.safe_dump(config, sort_keys=False))
    return dest
