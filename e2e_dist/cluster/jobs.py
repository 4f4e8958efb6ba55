"""Ray Jobs: submit `e2e-dist train|sweep ...` to a cluster, then status / logs / stop / list.

A thin layer over Ray's `JobSubmissionClient` (the same API as `ray job submit`), adding what a
run of this project needs: the working dir upload without venvs and run outputs, the env vars the
run needs (W&B, AWS/S3, DeepSpeed's extension cache) forwarded *without printing their values*,
token auth picked up when a token exists, and one-line errors. Ray itself is imported lazily so
`e2e-dist --help` stays fast.
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Iterable

from e2e_dist.errors import UserError
from e2e_dist.train.ray_env import WORKER_SETUP_HOOK

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
"""Where `ray dashboard ray-cluster.yaml` forwards the head's dashboard / Jobs API."""

# Env vars a run may need on the cluster. Values are read here at submit time and never printed.
FORWARDED_ENV = (
    "WANDB_API_KEY", "WANDB_MODE", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_BASE_URL",
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION",
    "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
    "TORCH_EXTENSIONS_DIR",
)
FORWARDED_PREFIXES = ("E2E_DIST_",)

# Never upload these with the working dir: environments, caches, run outputs, VCS metadata.
WORKING_DIR_EXCLUDES = [
    ".venv", "venv", ".cache", "runs", "wandb", ".git", "**/__pycache__", "*.egg-info",
    ".pytest_cache", "*.pt", "*.safetensors",
]

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
_SECRET_ARG = re.compile(r"(?i)^([^=]*(secret|password|token|api_key|access_key|session_key)[^=]*)=(.+)$")


class JobsError(UserError):
    """The Jobs API is unreachable, refuses us, or does not know the job."""


def redact_entrypoint(entrypoint: str) -> str:
    """`KEY=value` words whose key looks secret become `KEY=***` (for display only)."""
    try:
        words = shlex.split(entrypoint)
    except ValueError:
        return entrypoint
    return shlex.join(_SECRET_ARG.sub(r"\1=***", w) for w in words)


def resolve_address(address: str | None) -> str:
    """--address, else RAY_API_SERVER_ADDRESS, else RAY_ADDRESS if it is an http(s) URL (not a GCS
    host:port, as inside a Ray job), else the `ray dashboard` tunnel on 127.0.0.1:8265."""
    ray_address = os.environ.get("RAY_ADDRESS", "")
    address = (address or os.environ.get("RAY_API_SERVER_ADDRESS")
               or (ray_address if ray_address.startswith(("http://", "https://")) else None) or DEFAULT_ADDRESS)
    if address.startswith("ray://"):
        raise JobsError(f"--address {address}: use the dashboard / Jobs API URL (http://HOST:8265), not ray://")
    if "://" not in address:
        address = "http://" + address
    return address.rstrip("/")


def _enable_token_auth_if_available() -> None:
    """Like `ray start --head`: with RAY_AUTH_MODE unset and a token present, use the token.

    Without this, a client would talk to a token-protected cluster unauthenticated (HTTP 401).
    """
    if "RAY_AUTH_MODE" in os.environ:
        return
    from e2e_dist import ray_compat

    ray_compat.enable_token_auth_if_available()


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:400] + ("..." if len(text) > 400 else "")


def client(address: str | None = None) -> Any:
    """A connected `JobSubmissionClient`, or a one-line `JobsError` saying why not."""
    url = resolve_address(address)
    _enable_token_auth_if_available()
    from ray.job_submission import JobSubmissionClient

    # Ray lets RAY_API_SERVER_ADDRESS / RAY_ADDRESS override the address it is given: pin ours.
    saved = os.environ.get("RAY_API_SERVER_ADDRESS")
    os.environ["RAY_API_SERVER_ADDRESS"] = url
    try:
        return JobSubmissionClient(url)
    except Exception as e:  # ConnectionError, RuntimeError(auth), ValueError(address)
        msg = _one_line(e)
        if "401" in msg or "403" in msg or "uthentica" in msg:
            raise JobsError(f"{url}: the cluster wants a Ray auth token: set RAY_AUTH_MODE=token and put the "
                            f"cluster's token in ~/.ray/auth_token or RAY_AUTH_TOKEN") from None
        raise JobsError(f"cannot reach the Ray Jobs API at {url} ({msg}); for a ray-cluster.yaml cluster run "
                        f"`ray dashboard ray-cluster.yaml` first, or pass --address") from None
    finally:
        if saved is None:
            os.environ.pop("RAY_API_SERVER_ADDRESS", None)
        else:
            os.environ["RAY_API_SERVER_ADDRESS"] = saved


def forwarded_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The env vars to pass to the job: the known names and E2E_DIST_* that are set here."""
    env = {k: v for k, v in os.environ.items() if k in FORWARDED_ENV or k.startswith(FORWARDED_PREFIXES)}
    env.update(extra or {})
    return env


def build_runtime_env(working_dir: str | Path | None, env_vars: dict[str, str],
                      py_modules: Iterable[str | Path] = ()) -> dict[str, Any]:
    """runtime_env for the job: the project dir (minus venvs/outputs), the env vars, the plug-in
    packages to ship (`py_modules`: see `py_module`), and the SIGTERM setup hook.

    Why the hook here: Ray runs `worker_process_setup_hook` only from the job-level runtime_env
    (an actor's is ignored), and without it Ray's own SIGTERM handler kills a worker at once
    instead of letting it take a just-in-time checkpoint (train/preemption.py). The job's
    runtime_env is that job-level one for its driver and every worker the driver starts. The
    cluster's Python must be able to import e2e_dist (installed there, or the working dir).
    """
    runtime_env: dict[str, Any] = {"env_vars": dict(env_vars), "worker_process_setup_hook": WORKER_SETUP_HOOK}
    if working_dir is not None:
        wd = Path(working_dir).expanduser().resolve()
        if not wd.is_dir():
            raise JobsError(f"--working-dir {working_dir}: not a directory")
        runtime_env["working_dir"] = str(wd)
    modules = [py_module(p) for p in py_modules]
    if modules:
        runtime_env["py_modules"] = modules
    if working_dir is not None or modules:  # Ray applies the one `excludes` to both uploads
        runtime_env["excludes"] = list(WORKING_DIR_EXCLUDES)
    return runtime_env


def py_module(path: str | Path) -> str:
    """`--py-module PATH` -> the absolute path Ray's `runtime_env.py_modules` takes: a package
    folder (Ray uploads it and puts it on every node's import path, driver included, so a
    plug-in named by import path imports there without being installed), a single `.py` module
    or a `.whl`. One line naming PATH otherwise."""
    p = Path(path).expanduser().resolve()
    if p.is_file() and p.suffix in (".py", ".whl"):
        return str(p)
    if p.is_dir() and (p / "__init__.py").is_file():
        return str(p)
    if p.is_dir():  # most often a project folder: name the package inside it
        inside = sorted(c.name for c in p.iterdir() if (c / "__init__.py").is_file())
        hint = f" (give the package in it: --py-module {Path(path) / inside[0]})" if inside else ""
        raise JobsError(f"--py-module {path}: a folder without __init__.py is not a Python package{hint}")
    what = "no such file or folder" if not p.exists() else "not a package folder, .py file or .whl"
    raise JobsError(f"--py-module {path}: {what}")


def cluster_entrypoint(argv: list[str]) -> list[str]:
    """`e2e-dist train|sweep ...` without --address gets `--address auto`: in a Ray job that is the
    job's own cluster (RAY_ADDRESS), where the run must go instead of a private local Ray."""
    if (len(argv) >= 2 and Path(argv[0]).name == "e2e-dist" and argv[1] in ("train", "sweep")
            and not any(a == "--address" or a.startswith("--address=") for a in argv)):
        return [*argv, "--address", "auto"]
    return list(argv)


def submit(
    entrypoint: list[str] | str,
    *,
    address: str | None = None,
    working_dir: str | Path | None = ".",
    env_vars: dict[str, str] | None = None,
    submission_id: str | None = None,
    entrypoint_num_cpus: float | None = None,
    entrypoint_resources: dict[str, float] | None = None,
    py_modules: Iterable[str | Path] = (),
    out: IO[str] | None = None,
) -> str:
    """Submit `entrypoint` (argv list or shell string) and return the submission id.
    entrypoint_resources: where the driver may run, e.g. {"node:10.0.0.5": 0.01} for one node.
    py_modules: packages shipped with the job (plug-ins named by import path)."""
    out = out or sys.stdout
    command = entrypoint if isinstance(entrypoint, str) else shlex.join(cluster_entrypoint(entrypoint))
    if not command.strip():
        raise JobsError("nothing to submit: give the command after `--`, e.g. `-- e2e-dist train tiny-text`")
    env = forwarded_env(env_vars)
    # A driver that passes its own runtime_env to ray.init (a user's script; ours adds only the
    # setup hook where it is missing) may repeat a key we set: let Ray combine the two instead of
    # refusing to start the driver.
    env.setdefault("RAY_OVERRIDE_JOB_RUNTIME_ENV", "1")
    runtime_env = build_runtime_env(working_dir, env, py_modules)
    jc = client(address)
    try:
        job_id = jc.submit_job(entrypoint=command, runtime_env=runtime_env, submission_id=submission_id,
                               entrypoint_num_cpus=entrypoint_num_cpus, entrypoint_resources=entrypoint_resources)
    except Exception as e:
        raise JobsError(f"job submission to {resolve_address(address)} failed: {_one_line(e)}") from None
    # Names only: values of forwarded variables (keys, tokens) are never printed.
    names = ", ".join(sorted(env)) or "none"
    print(f"submitted {job_id}: {redact_entrypoint(command)}", file=out)
    print(f"  env vars forwarded (values hidden): {names}", file=out)
    if runtime_env.get("py_modules"):
        print(f"  py_modules shipped: {', '.join(runtime_env['py_modules'])}", file=out)
    return job_id


@dataclass
class JobSummary:
    """What `jobs status` / `jobs list` show (never the runtime_env: it holds env var values)."""

    job_id: str
    status: str
    entrypoint: str
    message: str
    start_time: float | None
    end_time: float | None

    def line(self) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.start_time / 1000)) if self.start_time else "-"
        msg = f"  {self.message.splitlines()[0][:160]}" if self.message else ""
        return f"{self.job_id:<28} {self.status:<10} {started:<19} {redact_entrypoint(self.entrypoint)}{msg}"


def _summary(info: Any) -> JobSummary:
    return JobSummary(
        job_id=info.submission_id or info.job_id or "?", status=str(getattr(info.status, "value", info.status)),
        entrypoint=info.entrypoint or "", message=info.message or "",
        start_time=info.start_time, end_time=info.end_time,
    )


def status(job_id: str, address: str | None = None) -> JobSummary:
    jc = client(address)
    try:
        return _summary(jc.get_job_info(job_id))
    except Exception as e:
        raise JobsError(f"job {job_id}: {_one_line(e)}") from None


def list_jobs(address: str | None = None) -> list[JobSummary]:
    jc = client(address)
    try:
        jobs = [_summary(j) for j in jc.list_jobs()]
    except Exception as e:
        raise JobsError(f"listing jobs at {resolve_address(address)} failed: {_one_line(e)}") from None
    return sorted(jobs, key=lambda j: j.start_time or 0)


def logs(job_id: str, address: str | None = None) -> str:
    jc = client(address)
    try:
        return jc.get_job_logs(job_id)
    except Exception as e:
        raise JobsError(f"job {job_id}: {_one_line(e)}") from None


def stop(job_id: str, address: str | None = None, *, wait_s: float = 60.0) -> str:
    """Ask Ray to stop the job; wait (bounded) for a terminal state and return it."""
    jc = client(address)
    try:
        jc.stop_job(job_id)
    except Exception as e:
        raise JobsError(f"job {job_id}: {_one_line(e)}") from None
    return wait(job_id, address, timeout_s=wait_s, jc=jc)


def wait(job_id: str, address: str | None = None, *, timeout_s: float | None = None, jc: Any = None,
         poll_s: float = 1.0) -> str:
    """Poll until the job is terminal (or `timeout_s` passes); return the last status seen."""
    jc = jc or client(address)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        try:
            state = str(getattr(jc.get_job_status(job_id), "value", ""))
        except Exception as e:
            raise JobsError(f"job {job_id}: {_one_line(e)}") from None
        if state in TERMINAL or (deadline is not None and time.monotonic() > deadline):
            return state
        time.sleep(poll_s)


async def _tail(jc: Any, job_id: str, out: IO[str]) -> None:
    async for chunk in jc.tail_job_logs(job_id):
        out.write(chunk)
        out.flush()


def follow(job_id: str, address: str | None = None, *, timeout_s: float | None = None,
           out: IO[str] | None = None) -> str:
    """Stream the job's logs until it is terminal; return its final status.

    `timeout_s` bounds the wait (the job keeps running; the returned status is then not terminal).
    """
    out = out or sys.stdout
    jc = client(address)
    try:
        asyncio.run(asyncio.wait_for(_tail(jc, job_id, out), timeout=timeout_s))
    except asyncio.TimeoutError:
        pass
    except Exception as e:
        # The log stream can drop (e.g. head restart); fall back to polling the status.
        print(f"[e2e-dist] log stream ended early ({_one_line(e)}); waiting for the job status", file=out)
    remaining = None if timeout_s is None else 5.0
    return wait(job_id, address, timeout_s=remaining, jc=jc)


def exit_code(state: str) -> int:
    """0 for SUCCEEDED, 1 for any other end (FAILED, STOPPED, still running after a timeout)."""
    return 0 if state == "SUCCEEDED" else 1


def print_summaries(rows: Iterable[JobSummary], out: IO[str] | None = None) -> None:
    out = out or sys.stdout
    rows = list(rows)
    if not rows:
        print("no jobs", file=out)
        return
    print(f"{'job id':<28} {'status':<10} {'started':<19} entrypoint", file=out)
    for row in rows:
        print(row.line(), file=out)
