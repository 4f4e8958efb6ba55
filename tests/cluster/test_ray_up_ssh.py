"""`ray up` -> `ray submit` (a short training run) -> `ray down` with Ray's real cluster launcher.

The cluster config is the shipped cluster/onprem.yaml (Ray's `local` provider: its file mounts,
token auth, the project's install step, bashrc environment and tagged start/stop commands) pointed
at this machine over SSH. The launcher's output must carry none of Ray's file-mount warnings.
Another Ray instance runs on the same "machine" and must survive `ray down` (the launcher's own
teardown is a machine-wide `ray stop`; onprem.yaml narrows it to the cluster's processes).
Everything runs inside namespaces this test creates (`unshare`):

- a PID namespace, so whatever `ray up` / `ray down` stop on the "head" can only be processes of
  this test (and the kernel kills whatever is left when the test's init exits);
- a network namespace with only `lo`: sshd on 127.0.0.1:<non-standard port>, Ray's ports
  (6379, 8265, ...) and every byte of traffic stay inside it;
- a mount namespace with a private HOME bind-mounted over the user's real home (ssh reads
  ~/.ssh/config from the passwd home, not $HOME; Ray writes ~/ray_bootstrap_config.yaml, the
  token ~/.ray/auth_token, ...) and a UTS namespace whose hostname resolves to 127.0.0.1.

Ray has no ssh port setting: the private ~/.ssh/config gives the port. Needs root (namespaces,
sshd) plus openssh-server and rsync (`.ci/install-system-deps.sh`); skipped with the reason
otherwise. This file is also the script that runs inside the namespaces (`--inner`).
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
SSH_PORT = 2222
TIMEOUT_S = 540


def _skip_reason() -> str | None:
    if sys.platform != "linux":
        return "needs Linux namespaces"
    if os.geteuid() != 0:
        return "needs root (unshare of PID/net/mount namespaces, sshd); CI runs it as root"
    for tool in ("/usr/sbin/sshd", "ssh", "ssh-keygen", "rsync", "unshare", "ip", "mount"):
        if not (Path(tool).exists() if tool.startswith("/") else shutil.which(tool)):
            return f"{tool} missing: run .ci/install-system-deps.sh"
    probe = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "--net", "--uts", "true"],
                           capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        return f"cannot create namespaces here: {probe.stderr.strip()[:200]}"
    return None


# ----------------------------------------------------------------------------- the test

@pytest.mark.slow
@pytest.mark.timeout(TIMEOUT_S + 60)
def test_ray_up_submit_down_over_ssh() -> None:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    # Short path: Ray's sockets live under TMPDIR inside (108-byte unix socket limit).
    work = Path(subprocess.check_output(["mktemp", "-d", "/tmp/e2eup-XXXXXX"], text=True).strip())
    try:
        _write_cluster_config(work)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "WANDB_API"))}
        env.update(WANDB_MODE="offline", RAY_USAGE_STATS_ENABLED="0")
        proc = subprocess.run(
            ["unshare", "--pid", "--fork", "--mount-proc", "--net", "--uts", "--mount",
             sys.executable, __file__, "--inner", str(work)],
            env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
        log = (proc.stdout + proc.stderr)[-6000:]
        result_file = work / "result.json"
        assert result_file.exists(), f"inner script wrote no result (rc {proc.returncode}):\n{log}"
        result = json.loads(result_file.read_text())
        assert result["up_rc"] == 0, f"ray up failed:\n{result.get('up_tail')}\n{log}"
        assert result["submit_rc"] == 0, f"ray submit failed:\n{result.get('submit_tail')}"
        assert result["down_rc"] == 0, f"ray down failed:\n{result.get('down_tail')}"
        # Token auth was on: the head ran with RAY_AUTH_MODE=token and the shipped token mount.
        assert result["head_auth_mode"] == "token", result
        assert result["token_on_head"], "file_mounts did not put ~/.ray/auth_token on the head"
        # The shipped install step put the mounted package and the `e2e-dist` command in the venv.
        assert result["package_on_head"].startswith(result["home"] + "/e2e-dist/e2e_dist/"), result
        assert result["command_on_head"] == result["home"] + "/venv/bin/e2e-dist", result
        # Only folders are mounted: Ray warns on every command about a mount that is a single file.
        for name in ("up", "submit", "down"):
            warned = [line for line in (work / f"{name}.log").read_text().splitlines() if "refers to a file" in line]
            assert not warned, f"ray {name}: {warned}"
        # Train's resource request ({'CPU': 1.0} * workers, every 20 s) is infeasible to the
        # autoscaler while a node is still starting (the local provider's node type declares no
        # resources); such autoscaler events go to the run's log file, never to this console.
        assert "cluster constraint" not in (work / "submit.log").read_text()
        # The training run on the head wrote a committed checkpoint.
        run_dir = work / "runs" / "ssh-smoke"
        manifests = sorted(run_dir.glob("step_*/manifest.json"))
        assert manifests, f"no checkpoint under {run_dir}:\n{result.get('submit_tail')}"
        # `ray down` stopped the head's Ray processes (checked inside, before the namespace died)
        # and nothing else: the other Ray on the machine runs on, every process of it.
        assert result["ray_procs_after_down"] == [], result["ray_procs_after_down"]
        assert len(result["bystander_before"]) >= 2, result  # its GCS and raylet at least
        assert result["bystander_after"] == result["bystander_before"], result
        assert proc.returncode == 0, log
    finally:
        shutil.rmtree(work, ignore_errors=True)

def _write_cluster_config(work: Path) -> None:
    """The shipped cluster/onprem.yaml, pointed at this test's host: the head on 127.0.0.1 (sshd on a
    non-standard port), no worker machines, this checkout's files and venv."""
    cfg = yaml.safe_load((ROOT / "cluster" / "onprem.yaml").read_text())
    user = pwd.getpwuid(os.getuid()).pw_name
    assert cfg["provider"]["type"] == "local", cfg["provider"]
    cfg["cluster_name"] = f"e2e-ssh-{os.getpid()}"
    cfg["provider"].update(head_ip="127.0.0.1", worker_ips=[])
    cfg["auth"] = {"ssh_user": user, "ssh_private_key": str(work / "id_ed25519")}
    cfg["max_workers"] = 0
    # The project's files from this checkout (absolute: `ray up` runs from another cwd here).
    mounts = cfg["file_mounts"]
    assert "~/e2e-dist/e2e_dist" in mounts and "~/.ray/auth_token" in mounts, mounts
    cfg["file_mounts"] = {remote: str(ROOT / local) if local.startswith("./") else local
                          for remote, local in mounts.items()}
    # Setup: no network in here, so no pip. A fresh ~/venv sees this checkout's installed
    # dependencies (what the lock file would install; a plain path line, so the checkout's own
    # editable install is *not* seen), then the shipped steps: the project's install (package on the
    # path + `e2e-dist` command) and the bashrc step (venv, token auth, the cluster-only `ray stop`).
    shipped = cfg["setup_commands"]
    install_steps = [c for c in shipped if "e2e_dist.pth" in c or "from e2e_dist.cli import main" in c]
    env_step = [c for c in shipped if "e2e-dist onprem env" in c]
    assert len(install_steps) == 2, "cluster/onprem.yaml lost its project install steps"
    assert len(env_step) == 1, "cluster/onprem.yaml lost its bashrc environment step"
    purelib = "$(~/venv/bin/python -c 'import sysconfig; print(sysconfig.get_path(\"purelib\"))')"
    # DeepSpeed's JIT-built ops: reuse this checkout's cache instead of compiling them again.
    ext = os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    # The dependencies' commands (ray, ninja, ...) as pip would write them: this venv's interpreter.
    bin_dir = Path(sys.executable).parent
    commands = (f"for f in {bin_dir}/*; do n=$(basename $f); case $n in python*|pip*|activate*|Activate*) continue;; esac; "
                "if head -n1 $f | grep -q '^#!.*python'; then sed '1s|.*|#!'$HOME/venv/bin/python'|' $f > ~/venv/bin/$n "
                "&& chmod 755 ~/venv/bin/$n; else ln -sf $f ~/venv/bin/$n; fi; done")
    cfg["setup_commands"] = [
        f"test -x ~/venv/bin/python || {sys._base_executable} -m venv --without-pip ~/venv",
        f"echo {sysconfig.get_path('purelib')} > {purelib}/checkout_deps.pth", commands,
        *install_steps, *env_step, f"echo 'export TORCH_EXTENSIONS_DIR={ext}' >> ~/.bashrc"]
    (work / "cluster.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))


def _start_bystander_ray(work: Path, env: dict) -> None:
    """Someone else's Ray on the same machine (own ports and temp dir, no auth): `ray down` of the
    cluster must leave it running. Its processes carry BYSTANDER_RAY=1 so the test can tell them apart."""
    ray = str(Path(sys.executable).with_name("ray"))
    other = dict(env, RAY_AUTH_MODE="disabled", BYSTANDER_RAY="1")
    _sh([ray, "start", "--head", "--port=6390", "--node-ip-address=127.0.0.1", "--include-dashboard=false",
         "--ray-client-server-port=10011", "--object-manager-port=8091", "--node-manager-port=8092",
         "--min-worker-port=20000", "--max-worker-port=20100", f"--temp-dir={work / 'other-ray'}",
         "--num-cpus=0", "--disable-usage-stats"], env=other, capture_output=True)


def _ray_processes(*, bystander: bool) -> list[str]:
    import psutil

    found = []
    for p in psutil.process_iter(["cmdline"]):
        line = " ".join(p.info["cmdline"] or [])
        if not any(k in line for k in ("raylet", "gcs_server", "ray start", "monitor.py")):
            continue
        try:
            mine = p.environ().get("BYSTANDER_RAY") == "1"
        except psutil.Error:
            continue
        if mine == bystander:
            found.append(line[:120])
    return sorted(found)


# ----------------------------------------------------------------------- inside namespaces
def _sh(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, **kw)


def _wait_port(port: int, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


def _run_logged(name: str, cmd: list[str], work: Path, timeout_s: float, env: dict) -> tuple[int, str]:
    try:
        p = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=timeout_s)
        out, rc = p.stdout + p.stderr, p.returncode
    except subprocess.TimeoutExpired as e:
        out, rc = f"{name}: timed out after {timeout_s}s\n{e.stdout or ''}{e.stderr or ''}", 124
    (work / f"{name}.log").write_text(out)
    return rc, out[-3000:]


def _private_home(home: Path, private_home: Path) -> None:
    """Mount `private_home` over the real home, with read-only binds of what Python needs from it.

    The venv's interpreter may live under the real home (e.g. ~/.pyenv): those top-level entries
    are bound back in, read-only; everything Ray and ssh write lands in `private_home`.
    """
    needed = set()
    for p in (Path(sys.executable).resolve(), Path(sys.base_prefix).resolve(), Path(sys.prefix).resolve(), ROOT):
        if p.is_relative_to(home) and p != home:
            needed.add(p.relative_to(home).parts[0])
    for name in sorted(needed):
        src, dst = home / name, private_home / name
        dst.mkdir() if src.is_dir() else dst.touch()
        _sh(["mount", "--rbind", "-o", "ro", str(src), str(dst)])
    _sh(["mount", "--rbind", str(private_home), str(home)])


def _inner(work: Path) -> int:
    home = Path(pwd.getpwuid(os.getuid()).pw_dir)
    private_home = work / "home"
    private_home.mkdir()
    _sh(["ip", "link", "set", "lo", "up"])
    _sh(["hostname", "localhost"])  # Ray falls back to resolving the hostname: make it loopback
    _private_home(home, private_home)
    (work / "tmp").mkdir()
    env = dict(os.environ, HOME=str(home), TMPDIR=str(work / "tmp"), USER=pwd.getpwuid(os.getuid()).pw_name)

    # sshd on 127.0.0.1:SSH_PORT with its own host key; our key is the only way in.
    _sh(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(work / "host_key")])
    _sh(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(work / "id_ed25519")])
    (work / "authorized_keys").write_text((work / "id_ed25519.pub").read_text())
    (work / "sshd_config").write_text("\n".join([
        f"Port {SSH_PORT}", "ListenAddress 127.0.0.1", f"HostKey {work / 'host_key'}",
        f"PidFile {work / 'sshd.pid'}", f"AuthorizedKeysFile {work / 'authorized_keys'}",
        "PubkeyAuthentication yes", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
        "PermitRootLogin prohibit-password", "UsePAM no", "StrictModes no", "LogLevel ERROR",
        "MaxStartups 50", "MaxSessions 50", "",
    ]))
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation dir
    sshd = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(work / "sshd_config")],
                            stdout=open(work / "sshd.log", "w"), stderr=subprocess.STDOUT)
    _wait_port(SSH_PORT)
    # Login shells on the "head" keep Ray's files (sessions, cluster state) in this test's dir.
    (home / ".bashrc").write_text(f"export TMPDIR={work / 'tmp'}\n")
    ssh_dir = home / ".ssh"
    ssh_dir.mkdir(mode=0o700)
    (ssh_dir / "config").write_text(f"Host 127.0.0.1\n  Port {SSH_PORT}\n")

    # The Ray token `ray up` ships to the head (file_mounts: ~/.ray/auth_token).
    ray = str(Path(sys.executable).with_name("ray"))
    _sh([ray, "get-auth-token", "--generate"], env=env, capture_output=True)

    (work / "smoke.py").write_text(SMOKE_SCRIPT.format(storage=work / "runs"))
    _start_bystander_ray(work, env)
    result: dict = {"bystander_before": _ray_processes(bystander=True)}
    rc, tail = _run_logged("up", [ray, "up", "-y", "--no-config-cache", "cluster.yaml"], work, 300, env)
    result.update(up_rc=rc, up_tail=tail)
    if rc == 0:
        rc, tail = _run_logged("submit", [ray, "submit", "cluster.yaml", "smoke.py"], work, 360, env)
        result.update(submit_rc=rc, submit_tail=tail)
        status = (work / "head_env.json")
        head = json.loads(status.read_text()) if status.exists() else {}
        result.update(head_auth_mode=head.get("RAY_AUTH_MODE"), token_on_head=head.get("token", False),
                      home=head.get("home"), package_on_head=head.get("package", ""),
                      command_on_head=head.get("command"))
    rc, tail = _run_logged("down", [ray, "down", "-y", "cluster.yaml"], work, 120, env)
    result.update(down_rc=rc, down_tail=tail)
    time.sleep(2)
    result["ray_procs_after_down"] = _ray_processes(bystander=False)
    result["bystander_after"] = _ray_processes(bystander=True)
    sshd.terminate()
    sshd.wait(timeout=10)
    (work / "result.json").write_text(json.dumps(result))
    return 0


# Runs on the "head" via `ray submit`: records what the login shell gave it, then a short training
# run of this project against the cluster `ray up` started (token auth on).
SMOKE_SCRIPT = '''
import json, os, subprocess, sys
from pathlib import Path
work = Path("{storage}").parent
import shutil
import e2e_dist
(work / "head_env.json").write_text(json.dumps({{
    "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE"),
    "token": (Path.home() / ".ray" / "auth_token").is_file(),
    "home": str(Path.home()), "package": e2e_dist.__file__, "command": shutil.which("e2e-dist"),
}}))
cmd = ["e2e-dist", "train", "tiny-text", "--quiet", "--address", "127.0.0.1:6379",
       "--set", "name=ssh-smoke", "--set", "storage.path={storage}",
       "--set", "trainer.num_workers=1", "--set", "trainer.max_steps=2", "--set", "trainer.log_every=1",
       "--set", "trainer.eval_every=2", "--set", "trainer.ckpt_every=2", "--set", "trainer.eval_samples=16",
       "--set", "data.max_bytes=100000", "--set", "data.max_files=10"]
sys.exit(subprocess.run(cmd).returncode)
'''


def _init_main(work: Path) -> int:
    """PID 1 of the namespace: run `_inner` in a child and reap every orphan meanwhile.

    Without a reaping init, Ray's processes become zombies when `ray stop` kills them, and
    `ray stop` then waits out its grace period for processes that are already gone.
    """
    child = os.fork()
    if child == 0:
        try:
            code = _inner(work)
        except BaseException as e:  # report, never fall back into the init loop
            print(f"inner: {type(e).__name__}: {e}", file=sys.stderr)
            code = 1
        sys.stdout.flush()
        os._exit(code)
    while True:
        pid, status = os.waitpid(-1, 0)
        if pid == child:
            return os.waitstatus_to_exitcode(status)  # the kernel kills the rest with us


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--inner":
        sys.exit(_init_main(Path(sys.argv[2])))
    print(f"usage: {sys.argv[0]} --inner WORKDIR (run by the test inside namespaces)", file=sys.stderr)
    sys.exit(2)
