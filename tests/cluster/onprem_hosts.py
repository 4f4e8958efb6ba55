"""Machines for tests/cluster/test_ray_up_ssh.py: a "laptop" and two SSH hosts, all on this machine.

Run as `python onprem_hosts.py --laptop WORK` inside fresh PID/net/mount/UTS namespaces (the test
does that with `unshare`); it becomes the laptop's init and builds, in its own network namespace:

    laptop   br0 = 10.88.0.1/24 (a bridge: the LAN), lo with 127.0.0.1 (its bystander Ray)
    head     eth0 = 10.88.0.2/24, sshd on 10.88.0.2:2222
    worker   eth0 = 10.88.0.3/24, sshd on 10.88.0.3:2222

Each host is `python onprem_hosts.py --host WORK NAME IP` in namespaces of its own (PID, network,
mount, UTS): its own process table, its own HOME (bound over the user's home), its own /tmp, its
own hostname, /etc/hosts naming both hosts and a resolver that answers nothing; no default route,
so no package index or anything else is reachable. They share what machines on a LAN share: the
network (the bridge) and one directory, /tmp/e2e-shared on both (an NFS mount, as it were). Every
interface lives in these namespaces; nothing is added to the machine's own network namespace,
and all of it goes away with the laptop's init (the kernel ends its PID namespace's processes).
This subnet (10.88.0.0/24) is not e2e_dist/cluster/netns.py's (10.77.0.0/24), though being in
separate namespaces they could not collide anyway.
"""

from __future__ import annotations

import os
import pwd
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SUBNET = "10.88.0"
LAPTOP_IP = f"{SUBNET}.1"
HOSTS = {"head": f"{SUBNET}.2", "worker": f"{SUBNET}.3"}
SSH_PORT = 2222
SHARED = "/tmp/e2e-shared"  # where every host sees the shared directory (WORK/shared)
RAY_WORDS = ("raylet", "gcs_server", "ray start", "monitor.py", "log_monitor", "dashboard", "agent",
             "ray::", "default_worker", "e2e-dist train")


def sh(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, **kw)


def wait_port(ip: str, port: int, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as s:
            s.settimeout(1)
            if s.connect_ex((ip, port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on {ip}:{port}")


def private_home(home: Path, mine: Path) -> None:
    """Mount `mine` over the real home, with read-only binds of what Python needs from it (the
    venv's interpreter may live under the real home, e.g. ~/.pyenv)."""
    needed = set()
    for p in (Path(sys.executable).resolve(), Path(sys.base_prefix).resolve(), Path(sys.prefix).resolve(), ROOT):
        if p.is_relative_to(home) and p != home:
            needed.add(p.relative_to(home).parts[0])
    for name in sorted(needed):
        src, dst = home / name, mine / name
        dst.mkdir() if src.is_dir() else dst.touch()
        sh(["mount", "--rbind", "-o", "ro", str(src), str(dst)])
    sh(["mount", "--rbind", str(mine), str(home)])


def keep_code_visible(new_tmp: Path) -> None:
    """Before `new_tmp` is bound over /tmp: bind the checkout and the venv into it at their own
    paths when they live under /tmp (a CI clone may), so the machine still runs our code."""
    root = Path(__file__).resolve().parents[2]
    for path in {root, Path(sys.prefix).resolve()}:
        if path.is_relative_to("/tmp"):
            dst = new_tmp / path.relative_to("/tmp")
            dst.mkdir(parents=True, exist_ok=True)
            sh(["mount", "--bind", str(path), str(dst)])


def user_home() -> Path:
    return Path(pwd.getpwuid(os.getuid()).pw_dir)


def reaping_init(main, *args) -> int:
    """PID 1 of a namespace: run `main(*args)` in a child and reap every orphan meanwhile (without a
    reaping init, stopped Ray processes stay zombies and stop commands wait out their grace period)."""
    child = os.fork()
    if child == 0:
        try:
            code = main(*args)
        except BaseException as e:  # report, never fall back into the init loop
            print(f"{main.__name__}: {type(e).__name__}: {e}", file=sys.stderr)
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    while True:
        pid, status = os.waitpid(-1, 0)
        if pid == child:
            return os.waitstatus_to_exitcode(status)  # the kernel kills the rest with us


# ------------------------------------------------------------------------------ a host
def prepare_host_files(work: Path, name: str, ip: str, authorized: str) -> None:
    """What the host's init needs, written from the laptop before it starts: its tmp dir with the
    sshd files (seen as /tmp/sshd there), HOME, /etc/hosts and resolv.conf."""
    base = work / name
    sshd = base / "tmp" / "sshd"
    sshd.mkdir(parents=True)
    (base / "home").mkdir()
    (base / "etc").mkdir()
    sh(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(sshd / "host_key")])
    (sshd / "authorized_keys").write_text(authorized)
    (sshd / "sshd_config").write_text("\n".join([
        f"Port {SSH_PORT}", f"ListenAddress {ip}", "HostKey /tmp/sshd/host_key", "PidFile /tmp/sshd/sshd.pid",
        "AuthorizedKeysFile /tmp/sshd/authorized_keys", "PubkeyAuthentication yes", "PasswordAuthentication no",
        "KbdInteractiveAuthentication no", "PermitRootLogin prohibit-password", "UsePAM no", "StrictModes no",
        "LogLevel ERROR", "MaxStartups 50", "MaxSessions 50", ""]))
    # As Debian/Ubuntu write it: the machine's own name on 127.0.1.1 (where Ray's fallback lands).
    hosts = ["127.0.0.1 localhost", f"127.0.1.1 {name}", f"{LAPTOP_IP} laptop"]
    hosts += [f"{a} {n}" for n, a in HOSTS.items() if n != name]
    (base / "etc" / "hosts").write_text("\n".join(hosts) + "\n")
    (base / "etc" / "resolv.conf").write_text("nameserver 127.0.0.1\n")  # lookups fail at once


def _host(work: Path, name: str, ip: str) -> int:
    base = work / name
    sh(["hostname", name])
    for f in ("hosts", "resolv.conf"):
        sh(["mount", "--bind", str(base / "etc" / f), f"/etc/{f}"])
    private_home(user_home(), base / "home")
    # Its own /tmp (Ray's temp dir, the launcher's state file), with the shared dir inside it.
    (base / "tmp" / "e2e-shared").mkdir()
    sh(["mount", "--bind", str(work / "shared"), str(base / "tmp" / "e2e-shared")])
    keep_code_visible(base / "tmp")
    sh(["mount", "--rbind", str(base / "tmp"), "/tmp"])
    deadline = time.monotonic() + 30  # the laptop moves our end of the cable in
    while subprocess.run(["ip", "link", "show", "eth0"], capture_output=True).returncode != 0:
        if time.monotonic() > deadline:
            raise TimeoutError("eth0 never arrived")
        time.sleep(0.1)
    for cmd in (["link", "set", "lo", "up"], ["addr", "add", f"{ip}/24", "dev", "eth0"], ["link", "set", "eth0", "up"]):
        sh(["ip", *cmd])
    Path("/run/sshd").mkdir(exist_ok=True)
    sshd = subprocess.run(["/usr/sbin/sshd", "-D", "-e", "-f", "/tmp/sshd/sshd_config"],
                          stdout=open("/tmp/sshd/sshd.log", "w"), stderr=subprocess.STDOUT)
    return sshd.returncode


def start_host(work: Path, name: str, ip: str, env: dict) -> subprocess.Popen:
    """The host's init in new namespaces, then a veth pair: our end on the bridge, its end (eth0)
    moved into its network namespace (`unshare` itself is in it)."""
    proc = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--mount-proc", "--net", "--uts", "--mount", "--kill-child=SIGKILL",
         sys.executable, __file__, "--host", str(work), name, ip],
        env=env, stdout=open(work / f"{name}-init.log", "w"), stderr=subprocess.STDOUT)
    me = Path("/proc/self/ns/net").resolve()
    deadline = time.monotonic() + 10
    while Path(f"/proc/{proc.pid}/ns/net").resolve() == me:  # until unshare has switched
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError(f"host {name} did not start: {(work / f'{name}-init.log').read_text()}")
        time.sleep(0.05)
    veth = f"v-{name}"
    sh(["ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", str(proc.pid)])
    sh(["ip", "link", "set", veth, "master", "br0"])
    sh(["ip", "link", "set", veth, "up"])
    return proc


# ----------------------------------------------------------------------------- processes
def cluster_processes(*, bystander: bool) -> list[str]:
    """The bystander's Ray processes (BYSTANDER_RAY=1 in their environment, and their descendants:
    `ray::DashboardAgent` and the like rename themselves, which hides their environment), or Ray's
    processes on the head and the worker (in PID namespaces below ours: the laptop's own ssh
    clients are not)."""
    import psutil

    laptop_ns = os.readlink("/proc/self/ns/pid")
    found, marked = {}, set()
    for p in psutil.process_iter(["cmdline", "pid"]):
        line = " ".join(p.info["cmdline"] or [])
        if not any(k in line for k in RAY_WORDS) or "onprem_hosts.py" in line:
            continue
        try:
            if bystander:
                keep = p.environ().get("BYSTANDER_RAY") == "1"
                if keep:
                    marked.update(c.pid for c in p.children(recursive=True))
            else:
                keep = os.readlink(f"/proc/{p.pid}/ns/pid") != laptop_ns
        except (psutil.Error, OSError):
            keep = False
        found[p.pid] = (keep, f"{p.pid} {line[:120]}")
    return sorted(line for pid, (keep, line) in found.items() if keep or pid in marked)


def start_bystander(work: Path, env: dict) -> dict:
    """Someone else's Ray on the laptop (own ports and temp dir, no auth, 127.0.0.1)."""
    ray = str(Path(sys.executable).with_name("ray"))
    other = dict(env, RAY_AUTH_MODE="disabled", BYSTANDER_RAY="1")
    done = subprocess.run(
        [ray, "start", "--head", "--port=6390", "--node-ip-address=127.0.0.1", "--include-dashboard=false",
         "--ray-client-server-port=10011", "--object-manager-port=8091", "--node-manager-port=8092",
         "--min-worker-port=20000", "--max-worker-port=20100", f"--temp-dir={work / 'other-ray'}",
         "--num-cpus=0", "--disable-usage-stats"], env=other, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"bystander `ray start` failed:\n{(done.stdout + done.stderr)[-2000:]}")
    return other


def bystander_answers(other: dict) -> bool:
    ray = str(Path(sys.executable).with_name("ray"))
    done = subprocess.run([ray, "status", "--address", "127.0.0.1:6390"], env=other, capture_output=True, timeout=60)
    return done.returncode == 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--laptop":
        sys.path.insert(0, str(ROOT))
        from tests.cluster.test_ray_up_ssh import laptop

        sys.exit(reaping_init(laptop, Path(sys.argv[2])))
    if len(sys.argv) == 5 and sys.argv[1] == "--host":
        sys.exit(reaping_init(_host, Path(sys.argv[2]), sys.argv[3], sys.argv[4]))
    print(f"usage: {sys.argv[0]} --laptop WORK | --host WORK NAME IP (run by the test)", file=sys.stderr)
    sys.exit(2)
