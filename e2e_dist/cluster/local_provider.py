"""The autoscaler's node provider for local clusters: nodes it adds are made like real machines.

Ray's `fake_multinode` provider starts its nodes inside the autoscaler process with the head's
session folder, so the nodes share one runtime-env cache: a worker node deleting "unused" working
dirs deleted the package a submitted sweep's driver on the head still ran in (its job then failed
at the end with FileNotFoundError). This provider (Ray's `external` provider type, autoscaler v1,
public NodeProvider interface) starts each node through cluster/local_node.py as the cluster
launcher does: own temp dir, own HOME and TMPDIR, and in separate-host mode its own network
namespace and address (cluster/netns.py). In loopback mode each node gets its own loopback
address (127.0.0.N, all on `lo`): the autoscaler tells nodes apart by address, as on a cloud.

It runs in the autoscaler (monitor) process on the head. Its nodes are recorded in a JSON file in
the cluster's directory, so a restarted monitor finds them again and `LocalCluster.stop()` stops
whatever is left.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

from ray.autoscaler.node_provider import NodeProvider
from ray.autoscaler.tags import (
    NODE_KIND_HEAD,
    NODE_KIND_WORKER,
    STATUS_UP_TO_DATE,
    TAG_RAY_NODE_KIND,
    TAG_RAY_NODE_NAME,
    TAG_RAY_NODE_STATUS,
    TAG_RAY_USER_NODE_TYPE,
)

from e2e_dist.cluster.local_node import LocalNode, launch, stop_node
from e2e_dist.cluster.local_ports import node_port_args
from e2e_dist.cluster.netns import AddressBook, Host, Network

log = logging.getLogger(__name__)

HEAD_ID = "head"
HEAD_TYPE = "ray.head.default"
NODES_FILE = "autoscaled-nodes.json"
LOOPBACK_BOOK = "loopback-hosts.json"


def read_node_records(cluster_dir: Path) -> dict[str, dict[str, Any]]:
    """node id -> {"node": LocalNode.record(), "tags": {...}} of every node the provider started."""
    path = Path(cluster_dir) / NODES_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def loopback_host(cluster_dir: Path, name: str) -> str:
    """A loopback address of its own for an autoscaled node (127.0.0.1 is the head's)."""
    return f"127.0.0.{AddressBook(Path(cluster_dir) / LOOPBACK_BOOK).allocate(name)}"


class LocalNodeProvider(NodeProvider):
    """Provider config (written by cluster/local_autoscale.py): `cluster_dir`, `gcs_address`,
    `head_ip`, `netns_prefix` (separate hosts) or null (loopback). A node's CPUs, GPUs and object
    store come from its node type's `resources`."""

    def __init__(self, provider_config: dict[str, Any], cluster_name: str) -> None:
        super().__init__(provider_config, cluster_name)
        self.cluster_dir = Path(provider_config["cluster_dir"])
        self.gcs_address = provider_config["gcs_address"]
        self.head_ip = provider_config["head_ip"]
        prefix = provider_config.get("netns_prefix")
        self.network = Network(prefix, self.cluster_dir) if prefix else None
        self.lock = threading.RLock()
        self._nodes = read_node_records(self.cluster_dir)
        self._popens: dict[str, LocalNode] = {}  # nodes this process started (it reaps them)
        self._counter = max((int(k.rsplit("-", 1)[1]) for k in self._nodes), default=0)

    # ------------------------------------------------------------------------------ queries
    def _head_tags(self) -> dict[str, str]:
        return {TAG_RAY_NODE_KIND: NODE_KIND_HEAD, TAG_RAY_USER_NODE_TYPE: HEAD_TYPE, TAG_RAY_NODE_NAME: HEAD_ID,
                TAG_RAY_NODE_STATUS: STATUS_UP_TO_DATE}

    def _node(self, node_id: str) -> LocalNode:
        return self._popens.get(node_id) or LocalNode.from_record(self._nodes[node_id]["node"])

    def non_terminated_nodes(self, tag_filters: dict[str, str]) -> list[str]:
        with self.lock:
            for node_id in [n for n in self._nodes if not self._node(n).alive()]:
                log.warning("local node %s exited on its own; see %s", node_id, self._node(node_id).log_path)
                self._forget(node_id)
            ids = [HEAD_ID, *self._nodes]
            return [i for i in ids if all(self.node_tags(i).get(k) == v for k, v in tag_filters.items())]

    def is_running(self, node_id: str) -> bool:
        with self.lock:
            return node_id == HEAD_ID or (node_id in self._nodes and self._node(node_id).alive())

    def is_terminated(self, node_id: str) -> bool:
        return not self.is_running(node_id)

    def node_tags(self, node_id: str) -> dict[str, str]:
        with self.lock:
            return self._head_tags() if node_id == HEAD_ID else dict(self._nodes[node_id]["tags"])

    def internal_ip(self, node_id: str) -> str:
        with self.lock:
            return self.head_ip if node_id == HEAD_ID else self._nodes[node_id]["node"]["ip"]

    def external_ip(self, node_id: str) -> str:
        return self.internal_ip(node_id)

    def set_node_tags(self, node_id: str, tags: dict[str, str]) -> None:
        with self.lock:
            if node_id in self._nodes:
                self._nodes[node_id]["tags"].update(tags)
                self._save()

    # ------------------------------------------------------------------------ create / end
    def create_node(self, node_config: dict[str, Any], tags: dict[str, str], count: int) -> None:
        self.create_node_with_resources_and_labels(node_config, tags, count, {}, {})

    def create_node_with_resources_and_labels(self, node_config: dict[str, Any], tags: dict[str, str], count: int,
                                              resources: dict[str, float], labels: dict[str, str]) -> None:
        for _ in range(count):
            self._create_one(tags, dict(resources))

    def _create_one(self, tags: dict[str, str], resources: dict[str, float]) -> None:
        with self.lock:
            self._counter += 1
            node_id = f"node-{self._counter}"
        host: Host | None = self.network.add_host(node_id) if self.network else None
        ip = host.ip if host else loopback_host(self.cluster_dir, node_id)
        args = ["--address", self.gcs_address, "--num-cpus", str(int(resources.pop("CPU", 0))),
                "--num-gpus", str(int(resources.pop("GPU", 0)))]
        store = resources.pop("object_store_memory", None)
        if store:
            args += ["--object-store-memory", str(int(store))]
        if resources:
            args += ["--resources", json.dumps(resources)]
        token = _auth_token()
        # Not waiting for readiness here: the autoscaler counts a launched node as pending until
        # its raylet registers, and non_terminated_nodes() notices one that died on the way.
        node = launch(node_id, self.cluster_dir, lambda: _with_ports(args), dict(os.environ), ip=ip, host=host,
                      token=token, wait=False)
        all_tags = {TAG_RAY_NODE_KIND: NODE_KIND_WORKER, TAG_RAY_NODE_NAME: node_id,
                    TAG_RAY_NODE_STATUS: STATUS_UP_TO_DATE, **tags}
        with self.lock:
            self._popens[node_id] = node
            self._nodes[node_id] = {"node": node.record(), "tags": all_tags}
            self._save()
        log.info("started local node %s (%s) at %s", node_id, all_tags.get(TAG_RAY_USER_NODE_TYPE), ip)

    def terminate_node(self, node_id: str) -> None:
        with self.lock:
            if node_id == HEAD_ID or node_id not in self._nodes:
                return
            stop_node(self._node(node_id), timeout_s=10)
            self._forget(node_id)

    def _forget(self, node_id: str) -> None:
        rec = self._nodes.pop(node_id)["node"]
        self._popens.pop(node_id, None)
        if self.network is not None and rec.get("netns"):
            self.network.remove_host(self.network.host(node_id))
        else:
            AddressBook(self.cluster_dir / LOOPBACK_BOOK).release(node_id)
        self._save()

    def _save(self) -> None:
        path = self.cluster_dir / NODES_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self._nodes, indent=1, sort_keys=True))
        os.replace(tmp, path)


def _with_ports(args: list[str]) -> tuple[list[str], dict[str, int]]:
    port_args, ports = node_port_args([])
    return [*args, *port_args], ports


def _auth_token() -> str | None:
    """The cluster's token from the head's HOME (this process runs on the head), when auth is on."""
    if os.environ.get("RAY_AUTH_MODE") != "token":
        return None
    path = Path.home() / ".ray" / "auth_token"
    return path.read_text().strip() if path.exists() else None
