"""Clusters: validating cluster yamls, local multi-node Ray clusters, Ray Jobs submission.

- `validate`: `lint_cluster_file(path) -> Findings` (errors, warnings): Ray's schema + checks Ray
  misses; AWS specifics in `validate_aws`, KubeRay's CRD schema in `validate_kuberay`.
- `local`: `LocalCluster(nodes=1, num_cpus_per_node=1, separate_hosts=False, ...)`, a context
  manager over `ray start` processes (`local_node`) that stops exactly what it started; nodes on
  loopback, or separate hosts in network/PID namespaces (`netns`, `forward`); with `autoscale`,
  the autoscaler adds nodes through `local_provider`.
- `jobs`: submit / status / logs / stop / list through Ray's `JobSubmissionClient`.
- `commands`: the `cluster`, `submit` and `jobs` CLI verbs (`register(subparsers)`).

Submodules import Ray lazily; import them directly (`from e2e_dist.cluster.local import ...`).
"""
