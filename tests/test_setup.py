"""The README's setup, as the Makefile runs it: its own lines are quiet."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_editable_install_step_prints_no_setuptools_prose():
    """`make setup` installs the package in editable mode; setuptools' multi-line 'Please be careful
    with folders in your working directory' warning must not reach the person running it."""
    line = next(ln.strip() for ln in (ROOT / "Makefile").read_text().splitlines() if "--no-deps -e ." in ln)
    env_part, cmd = re.match(r"((?:\w+=\S+ )*)\$\(BIN\)/python (.*)", line).groups()
    env = {**os.environ, **dict(kv.split("=", 1) for kv in env_part.split())}
    proc = subprocess.run([sys.executable, *shlex.split(cmd)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Please be careful" not in proc.stderr + proc.stdout
