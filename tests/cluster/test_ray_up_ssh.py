"""`ray up` -> `ray exec 'ray status'` -> `ray submit` (a 2-rank training run) -> `ray down` with Ray's
real cluster launcher, on two SSH machines: the shipped cluster/onprem.yaml, as a user runs it.

Three "machines" made of namespaces (tests/cluster/onprem_hosts.py has the layout): a laptop that
runs Ray's CLI and a bystander Ray of its own, and a head and a worker, each with its own network
(10.88.0.x on a bridge, no default route, nothing else reachable: no package index), process
table, HOME, /tmp and hostname, and sshd on a non-standard port. The autoscaler on the head SSHes
to the worker (the port comes from the ssh config folder the file mounts), each machine's Ray
must register under the address the file names for it, and the run puts one rank on each
machine (every rank takes all of a node's CPUs), checkpointing to a directory both machines
mount. `ray down` must leave no process of the cluster on either machine within 10 s, and the
bystander must run on (same PIDs, still answering).

Setup without network (README "Offline machines"): a fresh ~/venv sees this checkout's installed
dependencies through a path file (a shared venv), then the shipped steps run, their three pip
installs with `--no-index --find-links ~/wheelhouse` (a mounted, empty wheelhouse: everything is
already there, and no index is asked).
Needs root (namespaces, sshd) plus openssh-server and rsync (`.ci/install-system-deps.sh`);
skipped with the reason otherwise.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
import yaml

from tests.cluster import onprem_hosts as hosts

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 840
HEAD, WORKER = hosts.HOSTS["head"], hosts.HOSTS["worker"]


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


@pytest.mark.slow
@pytest.mark.timeout(TIMEOUT_S + 60)
def test_ray_up_two_machines_submit_down_over_ssh() -> None:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    work = Path(subprocess.check_output(["mktemp", "-d", "/tmp/e2eup-XXXXXX"], text=True).strip())
    try:
        _write_cluster_config(work)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "WANDB_API"))}
        env.update(WANDB_MODE="offline", RAY_USAGE_STATS_ENABLED="0")
        proc = subprocess.run(
            ["unshare", "--pid", "--fork", "--mount-proc", "--net", "--uts", "--mount",
             sys.executable, hosts.__file__, "--laptop", str(work)],
            env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
        log = (proc.stdout + proc.stderr)[-4000:]
        result_file = work / "result.json"
        assert result_file.exists(), f"the laptop wrote no result (rc {proc.returncode}):\n{log}"
        _check(json.loads(result_file.read_text()), work)
        assert proc.returncode == 0, log
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _check(result: dict, work: Path) -> None:
    debug = f"\nhead monitor.log:\n{result.get('monitor_tail')}"
    assert result["up_rc"] == 0, f"ray up failed:\n{result.get('up_tail')}"
    assert result["nodes"] == 2, f"ray status never showed 2 nodes:\n{result.get('status')}{debug}"
    assert "cannot modify limit" not in (work / "up.log").read_text(), "the start commands' ulimit failed"
    # Each machine registered under the address the file names for it (none as 127.0.0.1).
    assert sorted(result["node_ips"]) == [HEAD, WORKER], f"{result['node_ips']}{debug}"
    assert result["submit_rc"] == 0, f"ray submit failed:\n{result.get('submit_tail')}{debug}"
    head = result["head_env"]
    assert head.get("RAY_AUTH_MODE") == "token" and head.get("token"), head
    assert head["package"].startswith(head["home"] + "/e2e-dist/e2e_dist/"), head
    assert head["command"] == head["home"] + "/venv/bin/e2e-dist", head
    # One rank on each machine, and the run committed a checkpoint to the shared directory.
    assert sorted(head["rank_ips"]) == [HEAD, WORKER], head
    assert sorted((work / "shared" / "runs" / "onprem-2m").glob("step_*/manifest.json")), result["submit_tail"]
    for name in ("up", "submit", "down"):  # only folders are mounted (Ray warns about single files)
        warned = [x for x in (work / f"{name}.log").read_text().splitlines() if "refers to a file" in x]
        assert not warned, f"ray {name}: {warned}"
    assert "Found multiple active Ray instances" not in (work / "submit.log").read_text()
    assert result["down_rc"] == 0, f"ray down failed:\n{result.get('down_tail')}"
    # Nothing of the cluster is left on the head or the worker 10 s after `ray down` returned...
    assert result["left_after_down"] == [], result["left_after_down"]
    # ...and the laptop's other Ray runs on, every process of it, and answers.
    assert len(result["bystander_before"]) >= 2, result
    assert result["bystander_after"] == result["bystander_before"], result
    assert result["bystander_answers"], result


def _write_cluster_config(work: Path) -> None:
    """The shipped cluster/onprem.yaml with this test's machines, user, key and checkout, set up
    the README's offline way: a shared venv, and the shipped pip steps from a wheelhouse."""
    cfg = yaml.safe_load((ROOT / "cluster" / "onprem.yaml").read_text())
    assert cfg["provider"]["type"] == "local", cfg["provider"]
    cfg["cluster_name"] = f"e2e-ssh-{os.getpid()}"
    cfg["provider"].update(head_ip=HEAD, worker_ips=[WORKER])
    cfg["auth"] = {"ssh_user": pwd.getpwuid(os.getuid()).pw_name, "ssh_private_key": "/mnt/id_ed25519"}
    cfg["file_mounts"] = {remote: str(ROOT / local) if local.startswith("./") else local
                          for remote, local in cfg["file_mounts"].items()}
    # README "Offline machines": the shipped pip steps, from a wheelhouse and never an index; with
    # the shared venv on ~/venv's path they find everything installed (torch, the lock file, pip).
    cfg["file_mounts"]["~/wheelhouse"] = "/mnt/wheelhouse"  # the laptop sees `work` at /mnt
    (work / "wheelhouse").mkdir()
    shipped = [c.replace("-m pip install -q", "-m pip install -q --no-index --find-links ~/wheelhouse")
               for c in cfg["setup_commands"] if "-m venv" not in c]
    assert sum("--no-index" in c for c in shipped) == 3, "cluster/onprem.yaml's pip steps changed"
    assert any("e2e_dist.pth" in c for c in shipped), "cluster/onprem.yaml lost its project install step"
    purelib = "$(~/venv/bin/python -c 'import sysconfig; print(sysconfig.get_path(\"purelib\"))')"
    ext = os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    bin_dir = Path(sys.executable).parent  # the dependencies' commands (ray, ...), for ~/venv's python
    commands = (f"for f in {bin_dir}/*; do n=$(basename $f); case $n in python*|pip*|activate*|Activate*) continue;; esac; "
                "if head -n1 $f | grep -q '^#!.*python'; then sed '1s|.*|#!'$HOME/venv/bin/python'|' $f > ~/venv/bin/$n "
                "&& chmod 755 ~/venv/bin/$n; else ln -sf $f ~/venv/bin/$n; fi; done")
    cfg["setup_commands"] = [
        f"test -x ~/venv/bin/python || {sys._base_executable} -m venv --without-pip ~/venv",
        f"echo {sysconfig.get_path('purelib')} > {purelib}/checkout_deps.pth", commands,
        *shipped, f"echo 'export TORCH_EXTENSIONS_DIR={ext}' >> ~/.bashrc"]
    (work / "cluster.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))


# ----------------------------------------------------------------- on the laptop (namespaces)
def _run_logged(name: str, cmd: list[str], work: Path, timeout_s: float, env: dict) -> tuple[int, str]:
    try:
        p = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=timeout_s)
        out, rc = p.stdout + p.stderr, p.returncode
    except subprocess.TimeoutExpired as e:
        out, rc = f"{name}: timed out after {timeout_s}s\n{e.stdout or ''}{e.stderr or ''}", 124
    (work / f"{name}.log").write_text(out)
    return rc, out[-3000:]


def _laptop_setup(work: Path) -> tuple[Path, dict]:
    """The laptop: its LAN bridge, private HOME and /tmp (the work dir moves to /mnt), SSH key and
    ssh config (the port of both machines, in the folder the file mounts to the head), the two
    machines up with sshd answering, the Ray token."""
    hosts.sh(["ip", "link", "set", "lo", "up"])
    hosts.sh(["hostname", "laptop"])
    for cmd in (["link", "add", "br0", "type", "bridge"], ["addr", "add", f"{hosts.LAPTOP_IP}/24", "dev", "br0"],
                ["link", "set", "br0", "up"]):
        hosts.sh(["ip", *cmd])
    hosts.sh(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(work / "id_ed25519")])
    (work / "shared").mkdir()
    (work / "laptop" / "tmp").mkdir(parents=True)
    (work / "laptop" / "home").mkdir()
    hosts.sh(["mount", "--rbind", str(work), "/mnt"])
    hosts.keep_code_visible(work / "laptop" / "tmp")
    hosts.sh(["mount", "--rbind", str(work / "laptop" / "tmp"), "/tmp"])
    work = Path("/mnt")
    home = hosts.user_home()
    hosts.private_home(home, work / "laptop" / "home")
    env = dict(os.environ, HOME=str(home), USER=pwd.getpwuid(os.getuid()).pw_name)
    env.pop("TMPDIR", None)
    ssh = home / ".ssh"
    (ssh / "e2e-dist-onprem").mkdir(parents=True, mode=0o700)
    (ssh / "e2e-dist-onprem" / "config").write_text(f"Host {HEAD} {WORKER}\n  Port {hosts.SSH_PORT}\n")
    (ssh / "config").write_text("Include ~/.ssh/e2e-dist-onprem/config\n")
    machines = []
    for name, ip in hosts.HOSTS.items():
        hosts.prepare_host_files(work, name, ip, (work / "id_ed25519.pub").read_text())
        machines.append(hosts.start_host(work, name, ip, env))
    for ip in hosts.HOSTS.values():
        hosts.wait_port(ip, hosts.SSH_PORT)
    hosts.sh([str(Path(sys.executable).with_name("ray")), "get-auth-token", "--generate"], env=env, capture_output=True)
    (work / "smoke.py").write_text(SMOKE_SCRIPT.format(shared=hosts.SHARED, head=HEAD))
    return work, env


def _wait_nodes(work: Path, env: dict, ray: str, result: dict, timeout_s: float = 300) -> None:
    """`ray exec 'ray status'` until it shows 2 active nodes (the worker joins after `ray up`)."""
    deadline = time.monotonic() + timeout_s
    while True:
        _, out = _run_logged("status", [ray, "exec", "cluster.yaml", "ray status"], work, 90, env)
        active = re.search(r"(?:Active|Healthy):\n(.*?)\n\s*Pending:", out, re.DOTALL)
        result["nodes"] = sum(int(n) for n in re.findall(r"^\s*(\d+) ", active.group(1), re.MULTILINE)) if active else 0
        result["status"] = out[-1500:]
        if result["nodes"] >= 2 or time.monotonic() > deadline:
            return
        time.sleep(5)


def _after_down(result: dict, other: dict) -> None:
    deadline = time.monotonic() + 10
    while (left := hosts.cluster_processes(bystander=False)) and time.monotonic() < deadline:
        time.sleep(0.5)
    result["left_after_down"] = left
    result["bystander_after"] = hosts.cluster_processes(bystander=True)
    result["bystander_answers"] = hosts.bystander_answers(other)


def laptop(work: Path) -> int:
    work, env = _laptop_setup(work)
    ray = str(Path(sys.executable).with_name("ray"))
    other = hosts.start_bystander(work, env)
    result: dict = {"bystander_before": hosts.cluster_processes(bystander=True)}
    try:
        rc, tail = _run_logged("up", [ray, "up", "-y", "--no-config-cache", "cluster.yaml"], work, 300, env)
        result.update(up_rc=rc, up_tail=tail, nodes=0)
        if rc == 0:
            _wait_nodes(work, env, ray, result)
            node_ips = work / "shared" / "node_ips.json"
            _run_logged("ips", [ray, "exec", "cluster.yaml", f"python -c {NODE_IPS!r} > {hosts.SHARED}/node_ips.json"],
                        work, 90, env)
            result["node_ips"] = json.loads(node_ips.read_text()) if node_ips.exists() else []
        if result["nodes"] == 2:
            rc, tail = _run_logged("submit", [ray, "submit", "cluster.yaml", "smoke.py"], work, 420, env)
            head_env = work / "shared" / "head_env.json"
            result.update(submit_rc=rc, submit_tail=tail,
                          head_env=json.loads(head_env.read_text()) if head_env.exists() else {})
        logs = sorted((work / "head" / "tmp" / "ray").glob("session_*/logs/monitor.log"))
        result["monitor_tail"] = logs[-1].read_text()[-3000:] if logs else "(none)"
    finally:
        rc, tail = _run_logged("down", [ray, "down", "-y", "cluster.yaml"], work, 120, env)
        result.update(down_rc=rc, down_tail=tail)
        _after_down(result, other)
        (work / "result.json").write_text(json.dumps(result))
    return 0


NODE_IPS = "import json, ray; ray.init(address='auto'); print(json.dumps([n['NodeManagerAddress'] for n in ray.nodes() if n['Alive']]))"

# Runs on the head via `ray submit`: what the login shell gave it, then a 2-rank training run with
# each rank taking every CPU of a node (so one per machine), checkpoints in the shared directory.
SMOKE_SCRIPT = '''
import json, os, shutil, subprocess, sys
from pathlib import Path
import e2e_dist, ray
info = {{"RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE"), "token": (Path.home() / ".ray" / "auth_token").is_file(),
         "home": str(Path.home()), "package": e2e_dist.__file__, "command": shutil.which("e2e-dist")}}
ray.init(address="{head}:6379")
cpus = min(int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n["Alive"])
ray.shutdown()
cmd = ["e2e-dist", "train", "tiny-text", "--quiet", "--address", "{head}:6379",
       "--set", "name=onprem-2m", "--set", "storage.path={shared}/runs",
       "--set", "trainer.num_workers=2", f"--set", f"trainer.cpus_per_worker={{cpus}}",
       "--set", "trainer.max_steps=2", "--set", "trainer.log_every=1", "--set", "trainer.eval_every=2",
       "--set", "trainer.ckpt_every=2", "--set", "trainer.eval_samples=16",
       "--set", "data.max_bytes=100000", "--set", "data.max_files=10"]
rc = subprocess.run(cmd).returncode
ray.init(address="{head}:6379")
from ray.util.state import list_actors
actors = list_actors(filters=[("class_name", "=", "RayTrainWorker")], detail=True, limit=100)
ip_of = {{n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}}
info["rank_ips"] = [ip_of.get(a.node_id, a.node_id) for a in actors]
Path("{shared}/head_env.json").write_text(json.dumps(info))
sys.exit(rc)
'''
