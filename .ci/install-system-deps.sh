#!/usr/bin/env bash
# System packages the test suite needs beyond the Python venv (Debian/Ubuntu CI images).
#
#   openssh-server, openssh-client, rsync: tests/cluster/test_ray_up_ssh.py drives the real Ray
#       cluster launcher (`ray up` / `ray submit` / `ray down`) with the `local` provider over SSH to
#       127.0.0.1; the launcher copies file_mounts with rsync.
#   util-linux: `unshare` (a private PID namespace, so `ray stop` inside `ray down` only sees the
#       processes that test started; and each separate host's PID namespace) -- present on most
#       images, listed to be explicit.
#   iproute2: `ip netns` / veth / bridge for `e2e-dist cluster local --separate-hosts`, whose
#       nodes are network namespaces (tests/cluster/test_separate_hosts.py, test_autoscale.py).
#   procps: `ps`/`pkill`-free process inspection used when debugging CI logs.
#
# Idempotent: installs only what is missing, and skips apt entirely when nothing is.
# Needs root (or passwordless sudo); the Makefile/CI call it once before `make test`.
set -euo pipefail

PKGS=(openssh-server openssh-client rsync util-linux procps iproute2)

missing=()
for p in "${PKGS[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if [ "${#missing[@]}" -eq 0 ]; then
  echo "install-system-deps: all present (${PKGS[*]})"
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; else
    echo "install-system-deps: need root or sudo to install: ${missing[*]}" >&2; exit 1
  fi
fi

echo "install-system-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# --no-install-recommends: keep CI images small; we start sshd ourselves (no systemd needed).
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
