"""The plan's communication per optimizer step against what DeepSpeed really sends.

Two CPU ranks over gloo build the byte GPT with the project's own build_engine under ZeRO 1, 2 and 3
with gradient accumulation 1 and 4, and count the payload of every torch.distributed collective
(tests/plan/comm_accounting.py); the plan's bytes per step (plan/comm.py step_collectives, the
figure its step time is made of) must match within 10%, operation by operation. A model that
charges the gradient traffic once per optimizer step is off by 4x for ZeRO-2 and ZeRO-3 at
accumulation 4. One more case moves ZeRO-3's release window (stage3_max_reuse_distance) so that
most parameters are gathered again in backward: the plan's module-trace walk must follow it.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from e2e_dist.models.gpt import ByteGPT
from e2e_dist.plan.comm import model_trace, step_collectives

ROOT = Path(__file__).resolve().parents[2]
CASES = [{"stage": s, "grad_accum": g} for s in (1, 2, 3) for g in (1, 4)] + [
    # Release window below the model: forward's parameters are dropped and gathered again in backward
    # (prefetch off, or its window would keep them: plan/comm.py).
    {"stage": 3, "grad_accum": 2, "overrides": {"zero_optimization": {"stage3_max_reuse_distance": 600_000,
                                                                      "stage3_prefetch_bucket_size": 0}}}]


@pytest.fixture(scope="module")
def measured() -> list[dict]:
    from tests.fixtures.s3 import _free_port

    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-m", "tests.plan.comm_accounting", str(r), "2", str(port),
                               json.dumps(CASES)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True) for r in (0, 1)]
    rows = [json.loads(line) for p in procs for line in p.communicate(timeout=600)[0].splitlines()
            if line.startswith("{")]
    assert all(p.returncode == 0 for p in procs) and len(rows) == 2 * len(CASES), rows
    return rows


def _plan_bytes(row: dict) -> dict[str, float]:
    zero = row.get("overrides", {}).get("zero_optimization", {})
    model = ByteGPT(2, 4, 256, 32)  # comm_accounting's model
    out: dict[str, float] = {}
    for c in step_collectives(stage=row["stage"], grad_accum=row["grad_accum"], n_params=row["n_params"],
                              precision="fp32", trace=model_trace(model),
                              max_reuse=zero.get("stage3_max_reuse_distance", 1e9),
                              prefetch=zero.get("stage3_prefetch_bucket_size", 5e7)):
        out[c.op] = out.get(c.op, 0.0) + c.nbytes
    return out


def test_plan_bytes_per_step_match_what_deepspeed_sends(measured: list[dict]) -> None:
    for row in measured:
        got, plan = row["bytes_per_step"], _plan_bytes(row)
        label = f"ZeRO-{row['stage']} accum {row['grad_accum']} {row.get('overrides', '')}"
        total = sum(got.values())
        assert sum(plan.values()) == pytest.approx(total, rel=0.10), (label, got, plan)
        for op, nbytes in plan.items():
            assert nbytes == pytest.approx(got.get(op, 0.0), rel=0.10), (label, op, got, plan)
        # what the plan leaves out (gradient-norm and overflow scalars) is noise
        assert sum(v for op, v in got.items() if op not in plan) < 0.01 * total, (label, got)


def test_gradient_traffic_follows_the_micro_steps(measured: list[dict]) -> None:
    """The schedule itself: ZeRO-1 reduces once per step, ZeRO-2 and ZeRO-3 once per micro-step."""
    def reduced(stage: int, accum: int) -> float:
        row = next(r for r in measured if (r["stage"], r["grad_accum"]) == (stage, accum) and "overrides" not in r)
        return row["bytes_per_step"].get("all_reduce", 0.0) + row["bytes_per_step"].get("reduce_scatter", 0.0)

    assert reduced(1, 4) == pytest.approx(reduced(1, 1), rel=0.01)
    assert reduced(2, 4) == pytest.approx(4 * reduced(2, 1), rel=0.01)
    assert reduced(3, 4) == pytest.approx(4 * reduced(3, 1), rel=0.01)
