"""Clusters: validating cluster yamls, local multi-node Ray clusters, Ray Jobs submission.

- `validate`: `validate_cluster_file(path) -> list[str]` (Ray's schema + checks Ray misses).
- `local`: `LocalCluster(nodes=1, num_cpus_per_node=1, ...)`, a context manager over `ray start`
  processes on 127.0.0.1 that stops exactly what it started.
- `jobs`: submit / status / logs / stop / list through Ray's `JobSubmissionClient`.
- `commands`: the `cluster`, `submit` and `jobs` CLI verbs (`register(subparsers)`).

Submodules import Ray lazily; import them directly (`from e2e_dist.cluster.local import ...`).
"""
