"""Plan vs measured bytes per optimizer step (BENCHMARKS.md section 14), 2 CPU ranks over gloo.

    .venv/bin/python benchmarks/comm_volume.py

Runs tests/plan/comm_accounting.py on two ranks for ZeRO 0-3 at gradient accumulation 1 and 4 (and
ZeRO-3 with a release window below the model) and prints a markdown table: what DeepSpeed sent per
step by operation (payload, nccl-tests' size), the plan's figure (plan/comm.py), and what the
plan before issue 30 charged (2 or 3 ring passes of the gradients once per step, in bus bytes).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CASES = [{"stage": s, "grad_accum": g} for s in (0, 1, 2, 3) for g in (1, 4)] + [
    {"stage": 3, "grad_accum": 2, "overrides": {"zero_optimization": {"stage3_max_reuse_distance": 600_000,
                                                                      "stage3_prefetch_bucket_size": 0}}}]


def main() -> None:
    from e2e_dist.plan.comm import bus_factor
    from tests.fixtures.s3 import _free_port
    from tests.plan.test_comm_volume import _plan_bytes

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "tests.plan.comm_accounting", str(r), "2", str(port),
                               json.dumps(CASES)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True) for r in (0, 1)]
    rows = [json.loads(ln) for ln in procs[0].communicate()[0].splitlines() if ln.startswith("{")]
    procs[1].wait()
    print("| ZeRO | accum | measured MB/step (payload by op) | plan MB/step | plan / measured | "
          "bus MB/step measured | old model bus MB/step |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        got, plan = row["bytes_per_step"], _plan_bytes(row)
        by_op = ", ".join(f"{op} {b / 1e6:.3f}" for op, b in sorted(got.items()))
        total, planned = sum(got.values()), sum(plan.values())
        bus = sum(b * bus_factor(op, 2) for op, b in got.items())
        old = (3 if row["stage"] == 3 else 2) * 0.5 * row["n_params"] * 4  # passes x (n-1)/n x P x fp32
        extra = " (reuse 6e5)" if row.get("overrides") else ""
        print(f"| {row['stage']}{extra} | {row['grad_accum']} | {by_op} | {planned / 1e6:.3f} | "
              f"{planned / total:.4f} | {bus / 1e6:.2f} | {old / 1e6:.2f} |")


if __name__ == "__main__":
    main()
