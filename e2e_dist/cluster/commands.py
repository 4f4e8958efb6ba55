"""CLI verbs for clusters and Ray Jobs, registered on the main parser by `e2e_dist.cli`.

    e2e-dist cluster validate FILE [FILE ...]
    e2e-dist cluster local [--nodes N | --autoscale] [--num-cpus N] ...
    e2e-dist cluster check [--address A]     (collective bandwidth between / inside the nodes)
    e2e-dist cluster stop-ray --tag T        (on a node: stop that cluster's Ray, nothing else)
    e2e-dist submit [--address URL] [--follow] [--working-dir .] [--py-module PATH] -- e2e-dist train|sweep ...
    e2e-dist jobs status|logs|stop|list [--address URL] [JOB_ID]

Each verb sets `func=<callable(args) -> int>`. Ray is imported inside the functions only, so
`e2e-dist --help` stays fast. Bad input raises `UserError` subclasses (one line; the CLI exits 2).
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from e2e_dist.errors import UserError

if TYPE_CHECKING:
    from e2e_dist.cluster.local import LocalCluster

_ADDRESS_HELP = ("Ray dashboard / Jobs API URL (default: $RAY_API_SERVER_ADDRESS, or $RAY_ADDRESS if it is an "
                 "http URL, else http://127.0.0.1:8265 where `ray dashboard ray-cluster.yaml` forwards the head's)")


def register(subparsers: Any) -> None:
    """Add `cluster`, `submit` and `jobs` to the main CLI's subparsers."""
    _register_cluster(subparsers)
    _register_submit(subparsers)
    _register_jobs(subparsers)


# -------------------------------------------------------------------------------- cluster
def _register_cluster(subparsers: Any) -> None:
    cluster = subparsers.add_parser("cluster", help="validate cluster yamls; run a local multi-node Ray cluster")
    verbs = cluster.add_subparsers(dest="cluster_verb", metavar="{validate,local,check,stop-ray}")
    verbs.required = True

    v = verbs.add_parser("validate", help="check cluster yamls offline (Ray's schema + checks Ray misses)")
    v.add_argument("files", nargs="+", metavar="FILE", help="ray-cluster.yaml, cluster/*.yaml, KubeRay manifests")
    v.set_defaults(func=cmd_cluster_validate)

    loc = verbs.add_parser("local", help="start a local multi-node Ray cluster on this machine (Ctrl-C stops it)")
    mode = loc.add_mutually_exclusive_group()
    mode.add_argument("--nodes", type=int, default=1, help="worker nodes besides the head (default 1)")
    mode.add_argument("--autoscale", action="store_true",
                      help="an autoscaling cluster with the node types of cluster/local-autoscale.yaml instead")
    loc.add_argument("--separate-hosts", action="store_true",
                     help="each node in its own network namespace with its own address, as on separate machines "
                          "(needs root); default: every node on this machine's loopback")
    loc.add_argument("--expose", type=int, action="append", default=[], metavar="PORT",
                     help="--separate-hosts: make 127.0.0.1:PORT here (an S3/MinIO server, say) reachable from the "
                          "nodes at the gateway address (repeatable)")
    loc.add_argument("--num-cpus", type=int, default=1, help="CPUs per worker node (default 1)")
    loc.add_argument("--head-cpus", type=int, default=None, help="CPUs of the head (default: --num-cpus)")
    loc.add_argument("--config", default=None, help="autoscaling yaml for --autoscale (default cluster/local-autoscale.yaml)")
    loc.add_argument("--idle-timeout-minutes", type=float, default=None, help="--autoscale: override idle timeout")
    loc.add_argument("--auth", choices=("token", "disabled"), default="token",
                     help="Ray token auth (default token; clients then need RAY_AUTH_MODE=token)")
    loc.add_argument("--home", default=None,
                     help="where the auth token is kept for clients here (default: your HOME); each node has its own HOME")
    loc.add_argument("--object-store-mb", type=int, default=256, help="object store per node in MiB (default 256)")
    loc.set_defaults(func=cmd_cluster_local)

    chk = verbs.add_parser("check", help="measure collective bandwidth between and inside a running cluster's nodes "
                                         "(before a long run), against what `plan` assumes")
    chk.add_argument("--address", default=None,
                     help="Ray address (default auto: $RAY_ADDRESS or the cluster on this machine), or the Jobs API "
                          "URL (http://127.0.0.1:8265 through `ray dashboard`): the check then runs as a job")
    chk.add_argument("--size-mb", type=float, default=64, help="MiB per collective (default 64)")
    chk.add_argument("--iters", type=int, default=5, help="timed repetitions per collective (default 5)")
    chk.add_argument("--interconnect", choices=("efa", "ib", "tcp"), default=None,
                     help="what the plan should assume between nodes (default: as `plan` does for the GPU)")
    chk.add_argument("--timeout", type=float, default=300, help="seconds a group may take (default 300)")
    chk.set_defaults(func=cmd_cluster_check)

    stop = verbs.add_parser("stop-ray", help="stop this machine's Ray processes of one cluster only (what "
                                             "cluster/onprem.yaml runs instead of a machine-wide `ray stop`)")
    stop.add_argument("--tag", required=True,
                      help="the cluster's tag: the value of E2E_DIST_RAY_CLUSTER its `ray start` ran with")
    stop.add_argument("--grace", type=float, default=10.0, help="seconds between SIGTERM and SIGKILL (default 10)")
    stop.add_argument("--workers-of", default=None, metavar="BOOTSTRAP_YAML",
                      help="on the head of a `local`-provider cluster: then stop the tag on every worker machine of "
                           "this config too, over SSH (~/ray_bootstrap_config.yaml; ignored where it does not exist)")
    stop.set_defaults(func=cmd_cluster_stop_ray)


def cmd_cluster_check(args: argparse.Namespace) -> int:
    from e2e_dist.cluster.check import check_cli

    return check_cli(args)


def cmd_cluster_stop_ray(args: argparse.Namespace) -> int:
    from e2e_dist.cluster.stop_ray import stop_tagged, stop_workers

    # Here first: the head's autoscaler would otherwise restart workers it sees going away.
    termed, killed = stop_tagged(args.tag, grace_s=args.grace)
    print(f"stopped {termed} Ray process(es) of cluster {args.tag!r}" + (f" ({killed} needed SIGKILL)" if killed else ""))
    failed = stop_workers(args.tag, Path(args.workers_of).expanduser(), args.grace) if args.workers_of else []
    for line in failed:
        print(f"e2e-dist: error: stop-ray on worker {line}", file=sys.stderr)
    return 1 if failed else 0


def cmd_cluster_validate(args: argparse.Namespace) -> int:
    """One line per finding, `e2e-dist: error:` / `e2e-dist: warning:` like every verb; exit 2 on errors."""
    from e2e_dist.cluster.validate import lint_cluster_file

    bad = 0
    for path in args.files:
        found = lint_cluster_file(path)  # unreadable files raise a one-line UserError
        for w in found.warnings:
            print(f"e2e-dist: warning: {path}: {w}", file=sys.stderr)
        for p in found.errors:
            print(f"e2e-dist: error: {path}: {p}", file=sys.stderr)
        bad += bool(found.errors)
        if not found.errors:
            print(f"{path}: ok" + (f" ({len(found.warnings)} warning(s))" if found.warnings else ""))
    return 2 if bad else 0


def token_hint(home: Path) -> str:
    """How clients authenticate to a token-auth local cluster: where its token really is (`--home`)."""
    token = Path(home).expanduser().resolve() / ".ray" / "auth_token"
    return f"  clients           : export RAY_AUTH_MODE=token RAY_AUTH_TOKEN=$(cat {token})"


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


WATCH_INTERVAL_S = 1.0


def watch_nodes(cluster: LocalCluster, exited: set[str]) -> int:
    """Watch the nodes until the head exits (returns 1; Ctrl-C raises out of here). A worker node
    that exits is named once, with its log, and the rest go on: a real cluster loses machines and
    keeps running, and a local one is where runs that survive that are tried. Names go to `exited`."""
    while True:
        time.sleep(WATCH_INTERVAL_S)
        head = cluster.nodes[0]
        if not head.alive():
            exited.add(head.name)
            print(f"ray head node exited; stopping the cluster (its log: {head.log_path})", file=sys.stderr,
                  flush=True)
            return 1
        for node in cluster.nodes[1:]:
            if node.name not in exited and not node.alive():
                exited.add(node.name)
                print(f"ray node {node.name} exited; the rest of the cluster goes on (its log: {node.log_path})",
                      file=sys.stderr, flush=True)
                # A lost machine takes all its processes along: end what outlived its `ray start`.
                cluster.remove_worker(node)


def cmd_cluster_local(args: argparse.Namespace) -> int:
    from e2e_dist.cluster.local import LocalCluster
    from e2e_dist.cluster.local_record import clear_record, write_record

    if args.nodes < 0 or args.num_cpus < 0:
        raise UserError(f"--nodes {args.nodes} / --num-cpus {args.num_cpus}: must be >= 0")
    if args.expose and not args.separate_hosts:
        raise UserError("--expose: only with --separate-hosts (loopback nodes reach 127.0.0.1 already)")
    cluster = LocalCluster(
        nodes=args.nodes, num_cpus_per_node=args.num_cpus, head_num_cpus=args.head_cpus,
        autoscale=args.autoscale, autoscaling_config=args.config,
        idle_timeout_minutes=args.idle_timeout_minutes, auth_mode=args.auth, home=args.home,
        object_store_memory=args.object_store_mb * 2**20, separate_hosts=args.separate_hosts,
    )
    # SIGTERM (e.g. from a CI runner) stops the cluster like Ctrl-C does; SIGINT explicitly too,
    # since a shell's background job starts with SIGINT ignored.
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
    exited: set[str] = set()
    try:
        cluster.start()
        for port in args.expose:
            cluster.expose(port)
        print(cluster.describe())
        if not args.separate_hosts:  # a driver joins through a raylet on its own machine: loopback nodes only
            print(f"  this machine     : e2e-dist train|sweep ... --address auto   (joins this cluster: {write_record(cluster.address, cluster.dashboard_url)})")
        if args.auth == "token":
            print(token_hint(cluster.home))
        print("Ctrl-C stops every process this command started (and nothing else).", flush=True)
        return watch_nodes(cluster, exited)
    except KeyboardInterrupt:
        kept = f" (logs kept in {cluster.base_dir}: {', '.join(sorted(exited))} exited)" if exited else ""
        print(f"stopping ...{kept}", file=sys.stderr)
        return 0
    finally:
        clear_record()
        # The logs of a node that exited on its own are what explains it: keep them.
        cluster.stop(keep_dirs=bool(exited))
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# --------------------------------------------------------------------------------- submit
def _register_submit(subparsers: Any) -> None:
    s = subparsers.add_parser(
        "submit", help="submit `e2e-dist train|sweep ...` to a Ray cluster as a Ray job",
        description="Submit a command as a Ray job (Ray Jobs SDK). Everything after `--` is the command, e.g. "
                    "`e2e-dist submit --follow -- e2e-dist train tiny-text --set trainer.use_gpu=true`. "
                    "W&B / AWS / E2E_DIST_* variables set here are passed to the job (values never printed).")
    s.add_argument("--address", default=None, help=_ADDRESS_HELP)
    s.add_argument("--follow", action="store_true", help="stream the logs until the job ends; exit 1 unless it succeeded")
    s.add_argument("--working-dir", default=".", help="directory uploaded as the job's working dir (default .)")
    s.add_argument("--no-working-dir", action="store_true", help="upload nothing (the cluster has the code)")
    s.add_argument("--py-module", dest="py_modules", action="append", default=[], metavar="PATH",
                   help="a package folder, .py file or .whl shipped with the job (Ray runtime_env py_modules): a "
                        "plug-in named by import path then imports on every node without being installed there "
                        "(repeatable)")
    s.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="extra env var for the job")
    s.add_argument("--submission-id", default=None, help="job id to use (default: Ray picks one)")
    s.add_argument("--timeout", type=float, default=None, help="--follow: stop waiting after this many seconds")
    s.add_argument("command", nargs=argparse.REMAINDER, help="-- e2e-dist train|sweep ...")
    s.set_defaults(func=cmd_submit)


def _parse_env(pairs: list[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise UserError(f"--env {pair.split('=')[0]!r}: expected NAME=VALUE")
        env[name.strip()] = value
    return env


def cmd_submit(args: argparse.Namespace) -> int:
    from e2e_dist.cluster import jobs

    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise UserError("submit: no command; put it after `--`, e.g. `e2e-dist submit -- e2e-dist train tiny-text`")
    job_id = jobs.submit(command, address=args.address,
                         working_dir=None if args.no_working_dir else args.working_dir,
                         env_vars=_parse_env(args.env), submission_id=args.submission_id,
                         py_modules=args.py_modules)
    if not args.follow:
        print(f"follow it: e2e-dist jobs logs --follow {job_id}   stop it: e2e-dist jobs stop {job_id}")
        return 0
    state = jobs.follow(job_id, args.address, timeout_s=args.timeout)
    print(f"job {job_id}: {state}")
    return jobs.exit_code(state)


# ----------------------------------------------------------------------------------- jobs
def _register_jobs(subparsers: Any) -> None:
    j = subparsers.add_parser("jobs", help="status / logs / stop / list of Ray jobs")
    verbs = j.add_subparsers(dest="jobs_verb", metavar="{status,logs,stop,list}")
    verbs.required = True
    for name, helptext in (("status", "a job's status"), ("logs", "a job's logs"), ("stop", "stop a job")):
        p = verbs.add_parser(name, help=helptext)
        p.add_argument("job_id", metavar="JOB_ID")
        p.add_argument("--address", default=None, help=_ADDRESS_HELP)
        if name == "logs":
            p.add_argument("--follow", action="store_true", help="stream until the job ends")
        if name == "stop":
            p.add_argument("--wait", type=float, default=60.0, help="seconds to wait for it to stop (default 60)")
        p.set_defaults(func=cmd_jobs)
    p = verbs.add_parser("list", help="all jobs of the cluster")
    p.add_argument("--address", default=None, help=_ADDRESS_HELP)
    p.set_defaults(func=cmd_jobs)


def cmd_jobs(args: argparse.Namespace) -> int:
    from e2e_dist.cluster import jobs

    verb = args.jobs_verb
    if verb == "list":
        jobs.print_summaries(jobs.list_jobs(args.address))
        return 0
    if verb == "status":
        info = jobs.status(args.job_id, args.address)
        jobs.print_summaries([info])
        return 0
    if verb == "logs":
        if args.follow:
            return jobs.exit_code(jobs.follow(args.job_id, args.address))
        sys.stdout.write(jobs.logs(args.job_id, args.address))
        return 0
    state = jobs.stop(args.job_id, args.address, wait_s=args.wait)
    print(f"job {args.job_id}: {state}")
    return 0 if state in jobs.TERMINAL else 1
