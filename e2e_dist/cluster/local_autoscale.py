"""The fake autoscaler's config for a local cluster: the shipped yaml with this cluster's GCS address.

What works with Ray 2.60: `RAY_FAKE_CLUSTER=1 ray start --head --autoscaling-config=FILE` with
`provider.type: fake_multinode` and the GCS address written into the provider section.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from e2e_dist.cluster.local_node import LocalClusterError
from e2e_dist.train.ray_env import LOOPBACK

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_AUTOSCALE_CONFIG = REPO_ROOT / "cluster" / "local-autoscale.yaml"


def render_autoscale_config(source: str | Path, gcs_port: int, dest: Path, *,
                            idle_timeout_minutes: float | None = None) -> Path:
    """Copy the fake-autoscaler yaml with this cluster's GCS address (and idle timeout)."""
    try:
        config = yaml.safe_load(Path(source).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise LocalClusterError(f"{source}: cannot read autoscaling config: {e}".splitlines()[0]) from None
    provider = config.setdefault("provider", {})
    if provider.get("type") != "fake_multinode":
        raise LocalClusterError(f"{source}: provider.type must be fake_multinode for a local autoscaling cluster")
    provider["gcs_address"] = f"{LOOPBACK}:{gcs_port}"
    if idle_timeout_minutes is not None:
        config["idle_timeout_minutes"] = idle_timeout_minutes
    dest.write_text(yaml.safe_dump(config, sort_keys=False))
    return dest
