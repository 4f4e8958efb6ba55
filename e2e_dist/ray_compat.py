"""Every Ray symbol e2e-dist uses that is not Ray's public API, behind one door.

Ray moves its internals between releases without notice. Each function here names what we use,
why (the public API has no way to do it), and fails loudly with `RayCompatError` when a Ray
upgrade moved it; tests/test_ray_compat.py touches every one, so an upgrade shows up as a red test
instead of a silently lost guarantee. Nothing else in e2e_dist imports `ray.*._internal` /
`ray.*._private` or reads a `_`-prefixed Ray attribute.

Tested with: ray 2.60 (pyproject pins the range). Importing this module does not import Ray (the
loopback `ray start` wrapper below must set an environment variable before Ray is imported).
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from typing import Any, Callable

TESTED_WITH = "ray 2.60"


class RayCompatError(RuntimeError):
    """A Ray internal we rely on is gone or changed shape (a Ray upgrade)."""


def _internal(module: str, attr: str | None, purpose: str) -> Any:
    """`module.attr` (the module itself when attr is None), or RayCompatError saying what it is for."""
    try:
        found = importlib.import_module(module)
        return found if attr is None else getattr(found, attr)
    except (ImportError, AttributeError) as e:
        import ray

        raise RayCompatError(f"ray {ray.__version__} has no {module}{'.' + attr if attr else ''} (e2e-dist uses it to {purpose}; "
                             f"tested with {TESTED_WITH}): {e}") from e


# ------------------------------------------------------------------------- starting Ray locally
def disable_multinode_switch() -> None:
    """Keep a single-node Ray on loopback: with ENABLE_RAY_CLUSTER on, Ray maps 127.0.0.1 back to
    the machine's primary address. The switch is read from RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER at
    import; when Ray was imported before we could set it (library use), flip the constant."""
    constants = _internal("ray._private.ray_constants", None, "keep a local Ray instance on loopback")
    if not hasattr(constants, "ENABLE_RAY_CLUSTER"):
        raise RayCompatError("ray._private.ray_constants.ENABLE_RAY_CLUSTER is gone (keeps local Ray on loopback)")
    constants.ENABLE_RAY_CLUSTER = False


def local_init_kwargs(*, node_ip: str, temp_dir: str) -> dict[str, Any]:
    """ray.init's underscore arguments for a private local instance: the node's address (else Ray
    advertises the primary address) and its own temp dir (else every test shares /tmp/ray)."""
    return {"_node_ip_address": node_ip, "_temp_dir": temp_dir}


def ray_start_keeping_loopback() -> None:
    """`python -c 'from e2e_dist.ray_compat import ray_start_keeping_loopback as m; m()' start ARGS`:
    Ray's own `ray start` CLI with one rewrite disabled. `ray start --node-ip-address 127.0.0.1`
    (and `--address 127.0.0.1:PORT`) is rewritten to the machine's primary address by
    `services.resolve_ip_for_localhost`; RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 is exported to the
    node's children *after* Ray is imported here, so in those processes (autoscaler, job drivers,
    workers) get_node_ip_address() answers loopback too, while this one may start a multi-node Ray."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "1"
    services = _internal("ray._private.services", None, "start Ray nodes on loopback")
    if not hasattr(services, "resolve_ip_for_localhost"):
        raise RayCompatError("ray._private.services.resolve_ip_for_localhost is gone (Ray nodes on loopback)")
    from ray.scripts.scripts import main

    services.resolve_ip_for_localhost = lambda host: host
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    sys.argv = ["ray", *sys.argv[1:]]
    sys.exit(main())


LOOPBACK_RAY_START = ["-c", "from e2e_dist.ray_compat import ray_start_keeping_loopback as m; m()"]
"""Arguments after the Python executable that run `ray_start_keeping_loopback`."""


def pin_autoscaling_coordinator_here() -> None:
    """Create Ray Data's / Train V2's detached AutoscalingCoordinator from this process, so it lands
    on this node (it gets hard affinity to its first user's node, and an autoscaled node hosting
    it never goes idle). No public API creates it."""
    _internal("ray.data._internal.cluster_autoscaler", "get_or_create_autoscaling_coordinator",
              "keep Ray's autoscaling coordinator off autoscaled nodes")()


def pin_data_stats_actor_here() -> None:
    """Create Ray Data's detached `_StatsActor` from this process: like the coordinator above it
    is pinned to its first creator's node (seen: a sweep trial's autoscaled node, kept from ever
    going idle). No public API creates it."""
    _internal("ray.data._internal.stats", "get_or_create_stats_actor",
              "keep Ray Data's stats actor off autoscaled nodes")()


def quiet_ray_loggers() -> None:
    """Raise Train V2's context logger (named after its file path, not its module) to WARNING and
    keep Ray Data's console handlers (not its session log file) at WARNING: their INFO lines (every
    report echoed, dataset plans) drown our progress lines."""
    context = _internal("ray.train.v2._internal.execution.context", None, "quiet Ray Train's per-report log lines")
    session_handler = _internal("ray.data._internal.logging", "SessionFileHandler", "quiet Ray Data's console")
    logging.getLogger(context.__file__).setLevel(logging.WARNING)
    for handler in logging.getLogger("ray.data").handlers:
        if not isinstance(handler, session_handler):
            handler.setLevel(logging.WARNING)


def _worker_output_dispatcher() -> Any:
    dispatcher = _internal("ray._private.ray_logging", "global_worker_stdstream_dispatcher",
                           "send Ray workers' output to the run's log file")
    if not all(hasattr(dispatcher, a) for a in ("add_handler", "remove_handler", "handlers", "_lock")):
        raise RayCompatError("ray._private.ray_logging.global_worker_stdstream_dispatcher changed its interface "
                             "(e2e-dist sends Ray workers' output to the run's log file through it)")
    return dispatcher


RAY_WORKER_PRINTER = "ray_print_logs"
"""The name of the handler ray.init(log_to_driver=True) prints workers' output with."""


def route_worker_output(name: str, handler: Callable[[dict], None], *, keep_ray_printer: bool) -> Any:
    """Send the driver's stream of Ray workers' stdout/stderr lines (log_to_driver) to `handler`
    (registered as `name`, once), and unless `keep_ray_printer` stop Ray printing them. Returns
    Ray's printer for `unroute_worker_output` (None if it was not there). No public API routes
    worker output anywhere but the console."""
    dispatcher = _worker_output_dispatcher()
    dispatcher.remove_handler(name)
    with dispatcher._lock:
        printer = next((pair for pair in dispatcher.handlers if pair[0] == RAY_WORKER_PRINTER), None)
    if printer is not None and not keep_ray_printer:
        dispatcher.remove_handler(RAY_WORKER_PRINTER)
    else:
        printer = None
    dispatcher.add_handler(name, handler)
    return printer


def unroute_worker_output(name: str, printer: Any) -> None:
    """Undo `route_worker_output`: Ray prints workers' output again (a shared Ray: tests, notebooks)."""
    dispatcher = _worker_output_dispatcher()
    dispatcher.remove_handler(name)
    if printer is not None:
        dispatcher.add_handler(*printer)


def route_error_messages(handler: Callable[[dict], None], *, keep_printing: bool) -> Callable | None:
    """The driver's error-message thread (worker.listen_error_messages: raylet warnings such as "N
    PYTHON worker processes have been started", "A worker died or was killed", "The node ... has been
    marked dead") prints through `ray._private.worker.print_to_stdstream` itself, not through the
    worker-output dispatcher `route_worker_output` takes over. Send its lines (pid "raylet") to
    `handler` too, printed only when `keep_printing`. Returns what to restore (`unroute_error_messages`)."""
    worker = _internal("ray._private.worker", None, "send Ray's raylet messages to the run's log file")
    original = _internal("ray._private.worker", "print_to_stdstream", "send Ray's raylet messages to the run's log file")
    original = getattr(original, "_e2e_dist_original", original)

    def route(data: dict, ignore_prefix: bool) -> None:
        if data.get("pid") != "raylet":
            return original(data, ignore_prefix)
        handler({**data, "actor_name": "raylet"})
        if keep_printing:
            original(data, ignore_prefix)

    route._e2e_dist_original = original  # type: ignore[attr-defined]
    worker.print_to_stdstream = route
    return original


def unroute_error_messages(original: Callable | None) -> None:
    if original is not None:
        _internal("ray._private.worker", None, "restore Ray's raylet message printer").print_to_stdstream = original


def autoscaler_events(lines: list[str]) -> list[str]:
    """Of the autoscaler's lines that Ray streams to drivers, the events (node added, ...) that Ray's
    own printer keeps; its periodic status tables are dropped."""
    return list(_internal("ray._private.worker", "filter_autoscaler_events", "keep autoscaler events in the run's log")(lines))


# ------------------------------------------------------------------------------- Ray Train V2
def propagate_env_to_train_controller(name: str) -> None:
    """Train V2 copies the driver's variables named in ENV_VARS_TO_PROPAGATE to its controller
    (whose children, e.g. the placement-group cleaner, inherit them). A trial driver uses it for
    RAY_ADDRESS; Train has no public knob for it."""
    names = _internal("ray.train.v2._internal.constants", "ENV_VARS_TO_PROPAGATE",
                      "pass RAY_ADDRESS to a sweep trial's Train controller")
    names.add(name)


def train_attempt_id() -> str | None:
    """An id shared by every rank of the running Ray Train worker group and new on each restart (its
    synchronization actor's id): commit fencing, so a dead attempt's part file is never committed.
    None outside a Ray Train worker; RayCompatError when inside one but Ray moved it."""
    get_train_context = _internal("ray.train.v2._internal.execution.context", "get_train_context",
                                  "fence checkpoint commits per worker-group attempt")
    try:
        ctx = get_train_context()
    except Exception:  # noqa: BLE001 - not in a Train worker (unit tests, export tools)
        return None
    try:
        return ctx.execution_context.synchronization_actor._actor_id.hex()
    except AttributeError as e:
        raise RayCompatError(f"Ray Train's worker context changed shape ({e}); tested with {TESTED_WITH}") from e


def train_storage_context() -> Any:
    """The running Train run's StorageContext (its filesystem and experiment path): a checkpoint we
    hand back from a custom upload must live there, or Ray refuses it."""
    import ray.train

    ctx = ray.train.get_context()
    if not hasattr(ctx, "get_storage"):
        raise RayCompatError(f"ray.train's context has no get_storage (tested with {TESTED_WITH})")
    return ctx.get_storage()


def train_context_callback_base() -> type:
    """Base class of worker-side Train callbacks (`on_report` around each `ray.train.report`)."""
    return _internal("ray.train.v2._internal.execution.callback", "TrainContextCallback",
                     "end a scheduler-stopped trial's W&B run at its next report")


def train_controller_callback_base() -> type:
    """Base class of controller-side Train callbacks (a DeveloperAPI that no public module exports):
    `before_controller_execute_failure_decision` runs in the controller before each retry."""
    return _internal("ray.train.v2._internal.execution.callback", "ControllerCallback",
                     "refresh Ray's view of the nodes before an elastic restart")


def refresh_autoscaling_coordinator(timeout_s: float = 10.0) -> None:
    """Have Ray's AutoscalingCoordinator re-read the cluster's live nodes now. Train V2's elastic
    policy sizes each new worker group from the coordinator's per-node reservations, which it
    recomputes from `ray.nodes()` every 20 s (`_AutoscalingCoordinatorActor.TICK_INTERVAL_S`) or when
    a request changes: right after a node loss they still hold the lost node, so Train asks for a
    group of the old size and waits its worker-group start timeout for it.
    `get_reserved_resources(..., recompute=True)` is how Ray's own callers refresh it (a full tick;
    for an unknown requester it reserves nothing); no public API does."""
    import ray

    coordinator = _internal("ray.data._internal.cluster_autoscaler", "get_or_create_autoscaling_coordinator",
                            "refresh Ray's view of the nodes before an elastic restart")()
    ray.get(coordinator.get_reserved_resources.remote("e2e-dist-refresh", recompute=True), timeout=timeout_s)


def abort_current_train_run() -> None:
    """From a controller callback: abort the Train run as Ray does on Ctrl+C (`TrainController.abort`:
    workers shut down, placement group removed). Train V2 has no public way to end a run early."""
    import ray

    actor = ray.get_runtime_context().current_actor
    if not hasattr(actor, "abort"):
        raise RayCompatError(f"Ray Train's controller has no abort() (tested with {TESTED_WITH})")
    actor.abort.remote()


# ------------------------------------------------------------------------------------ Ray Tune
def function_trainable_class(fn: Any) -> type:
    """Tune's own wrapper class of a function trainable, to subclass (its `cleanup` is Tune's only
    hook into a stopping trial). Keeps the function's trainable name, so `Tuner.restore` accepts it."""
    return _internal("ray.tune.trainable.function_trainable", "wrap_function",
                     "let a scheduler-stopped sweep trial end gracefully")(fn)


# ------------------------------------------------------------------------- cluster launcher/jobs
def autoscaler_config_checks() -> tuple[Any, Any]:
    """(prepare_config, validate_config) of Ray's cluster launcher: `e2e-dist cluster validate`
    checks a cluster file with Ray's own defaults and JSON schema before anything starts."""
    module = "ray.autoscaler._private.util"
    purpose = "validate cluster files with Ray's own schema"
    return _internal(module, "prepare_config", purpose), _internal(module, "validate_config", purpose)


def enable_token_auth_if_available() -> None:
    """What `ray start --head` does: with RAY_AUTH_MODE unset and a token on disk, use it (else a
    Jobs client talks to a token-protected cluster unauthenticated: HTTP 401). Its "token auth is
    enabled" warning is noise for a client."""
    setup = _internal("ray._private.authentication.authentication_token_setup", None,
                      "authenticate Jobs clients with the cluster's token")
    log = logging.getLogger(setup.__name__)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        setup.maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    finally:
        log.setLevel(level)


def check_all() -> list[str]:
    """Resolve every internal without using it (what the loud test runs); returns what it checked."""
    checked = []
    for module, attr in (("ray._private.ray_constants", "ENABLE_RAY_CLUSTER"),
                         ("ray._private.services", "resolve_ip_for_localhost"),
                         ("ray.data._internal.cluster_autoscaler", "get_or_create_autoscaling_coordinator"),
                         ("ray.data._internal.logging", "SessionFileHandler"),
                         ("ray._private.ray_logging", "global_worker_stdstream_dispatcher"),
                         ("ray._private.worker", "filter_autoscaler_events"),
                         ("ray._private.worker", "print_to_stdstream"),
                         ("ray.data._internal.stats", "get_or_create_stats_actor"),
                         ("ray.train.v2._internal.execution.context", "get_train_context"),
                         ("ray.train.v2._internal.constants", "ENV_VARS_TO_PROPAGATE"),
                         ("ray.train.v2._internal.execution.callback", "TrainContextCallback"),
                         ("ray.train.v2._internal.execution.callback", "ControllerCallback"),
                         ("ray.tune.trainable.function_trainable", "wrap_function"),
                         ("ray.autoscaler._private.util", "prepare_config"),
                         ("ray.autoscaler._private.util", "validate_config"),
                         ("ray._private.authentication.authentication_token_setup",
                          "maybe_enable_token_auth_if_token_available")):
        _internal(module, attr, "(checked)")
        checked.append(f"{module}.{attr}")
    return checked
