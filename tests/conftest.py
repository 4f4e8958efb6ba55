"""Shared test setup: an isolated HOME, W&B offline, one private local Ray instance per session."""

from __future__ import annotations

import os
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]

# Before anything imports ray/wandb: never touch the real HOME (Ray's auth token, W&B settings).
_HOME = Path(os.environ.get("E2E_DIST_TEST_HOME", "/tmp/e2e-dist-test-home-%d" % os.getpid()))
_HOME.mkdir(parents=True, exist_ok=True)
os.environ["HOME"] = str(_HOME)
os.environ["RAY_AUTH_MODE"] = "disabled"
# Keep every local Ray instance on 127.0.0.1 (read when ray is imported; see train/ray_env.py).
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["WANDB_MODE"] = "offline"
os.environ.pop("WANDB_API_KEY", None)
os.environ["WANDB_SILENT"] = "true"
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
# Built-in corpora (digits PNGs, the synthesized spoken digits) are generated once per checkout.
os.environ.setdefault("E2E_DIST_CACHE", str(ROOT / ".cache" / "e2e_dist"))
# The fresh HOME would make matplotlib rebuild its font cache (5-15 s) every session.
os.environ.setdefault("MPLCONFIGDIR", str(ROOT / ".cache" / "matplotlib"))
# Slow 2-core CI machines: a worker group may wait for CPUs another trial still holds.
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300")

pytest_plugins = ["tests.fixtures.ray_local", "tests.fixtures.s3", "tests.fixtures.tiny_deepspeed"]
