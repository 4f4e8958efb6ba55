"""The node image (cluster/Dockerfile): what ray-cluster.yaml and the KubeRay manifests run.

The static checks run everywhere; building it needs a Docker daemon and pulls Ray's image (GBs),
so that runs only where asked: E2E_DIST_DOCKER_SMOKE=1 (CPU base image, then `e2e-dist train` in it).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "cluster" / "Dockerfile"


def _instructions() -> list[str]:
    """The Dockerfile's instructions, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def test_the_image_installs_what_make_setup_does_in_its_order() -> None:
    runs = " ".join(i for i in _instructions() if i.startswith("RUN "))
    torch, lock, project = (runs.index("pip install --no-cache-dir torch==2.13.0"),
                            runs.index("-r requirements/lock.txt"), runs.index("--no-deps -e ."))
    assert torch < lock < project  # torch pinned first: a looser spec in the lock cannot pick another build
    assert ".ci/install-speech-deps.sh" in runs and ".ci/install-font-deps.sh" in runs
    make = (ROOT / "Makefile").read_text()
    assert "pip install -q torch==2.13.0" in make and "-r requirements/lock.txt" in make


def test_the_base_image_has_the_locks_ray_and_every_copied_path_exists() -> None:
    ray = re.search(r"^ray==(\S+)$", (ROOT / "requirements" / "lock.txt").read_text(), re.M).group(1)
    base = next(i for i in _instructions() if i.startswith("ARG RAY_IMAGE=")).split("=", 1)[1]
    assert base.startswith(f"rayproject/ray:{ray}-py311"), (base, ray)
    ignored = {ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
               if ln.strip() and not ln.startswith("#")}
    for copy in (i for i in _instructions() if i.startswith("COPY ")):
        *sources, _dest = [w for w in copy.split()[1:] if not w.startswith("--")]
        for src in sources:
            assert (ROOT / src).exists(), src
            assert src.split("/")[0] not in ignored, src


def test_every_cluster_definition_runs_the_same_image() -> None:
    aws = yaml.safe_load((ROOT / "ray-cluster.yaml").read_text())
    images = {aws["docker"]["image"]}
    for f in (ROOT / "cluster" / "kuberay").glob("*.yaml"):
        images |= set(re.findall(r"^\s*image: (\S+)", f.read_text(), re.M))
    assert len(images) == 1, images


@pytest.mark.skipif(os.environ.get("E2E_DIST_DOCKER_SMOKE") != "1",
                    reason="set E2E_DIST_DOCKER_SMOKE=1 to build the node image (needs a Docker daemon, pulls GBs)")
@pytest.mark.timeout(3600)
def test_the_image_builds_and_trains(tmp_path: Path) -> None:
    if shutil.which("docker") is None or subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
        pytest.skip("no Docker daemon")
    tag = "e2e-dist-smoke:test"
    subprocess.run(["docker", "build", "-f", str(DOCKERFILE), "-t", tag, "--build-arg",
                    "RAY_IMAGE=rayproject/ray:2.60.0-py311-cpu", str(ROOT)], check=True)
    out = subprocess.run(["docker", "run", "--rm", "--shm-size=2g", tag, "bash", "-lc",
                          "cd /tmp && e2e-dist train tiny-text --quiet --set trainer.max_steps=2 "
                          "--set trainer.num_workers=1 --set data.max_files=20 --set tracking.wandb=false"],
                         capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stderr[-3000:]
    assert re.search(r"steps +2 ", out.stdout), out.stdout
