"""Fixed cost of a run and of a sweep trial: seconds before the first step, whatever the run's length.

    .venv/bin/python benchmarks/startup.py [--rounds 3] [--sides cold,joined,bare,torchrun] [--sweep]
        [--checkout DIR] [--out runs/bench-startup]

Sides, taking turns for `--rounds` rounds (medians reported; 2 shared cores are noisy):
- cold:     `e2e-dist train tiny-text --set trainer.max_steps=1` (starts its own Ray), wall of the command
- joined:   the same with `--address auto` beside a running `e2e-dist cluster local` (no Ray start)
- bare:     a bare Ray Train V2 TorchTrainer, 2 workers, one gloo step of the same model on random
            bytes (no DeepSpeed, no data, no W&B), its own local Ray: imports + init + fit
- torchrun: `torchrun --nproc_per_node 2` of that same one-step loop (no Ray at all)
For `cold` and `joined` the run's own timeline (train/timeline.py) gives the first step's offset.
`--checkout DIR` runs e2e-dist from another checkout (e.g. a git worktree of the previous commit,
with this venv): before/after in one run. `--sweep`: an 8-trial x 20-step sweep with ASHA,
per-trial fixed cost (the trial's wall from its timeline minus its steps' time) and, for trials
ASHA stopped, the seconds from the decision to the workers released.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ONE_STEP = r'''
import os, sys, time
import torch, torch.distributed as dist
sys.path.insert(0, {root!r})
from e2e_dist.config import load_run_config
from e2e_dist.models.registry import build_model

def step():
    cfg = load_run_config("tiny-text", [])
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.data)
    if dist.is_initialized():
        model = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, 256, (cfg.trainer.micro_batch_size, cfg.data.seq_len + 1))
    loss = model({{"tokens": x}})
    loss.backward()
    opt.step()
    return float(loss.detach())
'''
BARE_RAY = ONE_STEP + r'''
import ray, ray.train
from ray.train.torch import TorchTrainer

def loop(_):
    loss = step()
    ray.train.report({{"loss": loss}})

os.environ["RAY_TRAIN_V2_ENABLED"] = "1"
ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", _node_ip_address="127.0.0.1",
         _temp_dir={temp!r})
r = TorchTrainer(loop, scaling_config=ray.train.ScalingConfig(num_workers=2),
                 run_config=ray.train.RunConfig(storage_path={storage!r})).fit()
assert r.error is None, r.error
'''
TORCHRUN = ONE_STEP + r'''
dist.init_process_group("gloo")
print("loss", step())
dist.destroy_process_group()
'''


def _env(checkout: Path, cache: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_GCS_SERVER_PORT")}
    env.update({"PYTHONPATH": str(checkout), "E2E_DIST_CACHE": str(cache), "WANDB_MODE": "offline",
                "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"})
    return env


def _timed(argv: list[str], env: dict[str, str], cwd: Path, timeout: int = 900) -> tuple[float, str]:
    t = time.time()
    p = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    wall = time.time() - t
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:6])}... exit {p.returncode}:\n{p.stderr[-2000:]}")
    return wall, p.stdout


def first_step_s(stdout: str) -> float | None:
    m = re.search(r"start-up +first step at ([\d.]+) s", stdout)
    return float(m.group(1)) if m else None


def run_e2e(checkout: Path, work: Path, name: str, extra: list[str]) -> dict[str, float]:
    argv = [sys.executable, "-m", "e2e_dist.cli", "train", "tiny-text", "--quiet", "--set", "trainer.max_steps=1",
            "--set", f"storage.path={work}/runs", "--set", f"name={name}", *extra]
    wall, out = _timed(argv, _env(checkout, work / "cache"), work)
    return {"wall_s": wall, "first_step_s": first_step_s(out) or float("nan")}


def run_script(code: str, argv_prefix: list[str], work: Path) -> dict[str, float]:
    path = work / f"side-{time.time_ns()}.py"
    path.write_text(code)
    wall, _ = _timed([*argv_prefix, str(path)], _env(ROOT, work / "cache"), work)
    return {"wall_s": wall}


class LocalCluster:
    """`e2e-dist cluster local --nodes 0` (a head with 2 CPUs) in its own cache folder, for `joined`."""

    def __init__(self, checkout: Path, work: Path):
        self.env = _env(checkout, work / "cache")
        self.out = work / "cluster.out"
        self.proc = subprocess.Popen([sys.executable, "-m", "e2e_dist.cli", "cluster", "local", "--nodes", "0",
                                      "--head-cpus", "2", "--auth", "disabled"], env=self.env, cwd=work,
                                     stdout=self.out.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
        end = time.time() + 300
        while "Ctrl-C stops" not in self.out.read_text(errors="replace"):
            if self.proc.poll() is not None or time.time() > end:
                raise RuntimeError(f"cluster local did not start:\n{self.out.read_text()[-2000:]}")
            time.sleep(0.5)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)


def measure_sides(sides: list[str], rounds: int, checkout: Path, work: Path) -> dict[str, list[dict[str, float]]]:
    results: dict[str, list[dict[str, float]]] = {s: [] for s in sides}
    cluster = LocalCluster(checkout, work) if "joined" in sides else None
    try:
        for r in range(rounds):
            for side in sides[r % len(sides):] + sides[:r % len(sides)]:  # rotated order
                tag = f"{side}-{r}"
                if side == "cold":
                    res = run_e2e(checkout, work, tag, [])
                elif side == "joined":
                    res = run_e2e(checkout, work, tag, ["--address", "auto"])
                elif side == "bare":
                    res = run_script(BARE_RAY.format(root=str(ROOT), temp=str(work / f"ray-{tag}"),
                                                     storage=str(work / "bare")), [sys.executable], work)
                else:
                    res = run_script(TORCHRUN.format(root=str(ROOT)),
                                     [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                                      "--master_addr", "127.0.0.1", "--master_port", str(29500 + r)], work)
                results[side].append(res)
                print(f"  round {r + 1} {side:<9} " + "  ".join(f"{k} {v:.1f}" for k, v in res.items()), flush=True)
    finally:
        if cluster:
            cluster.stop()
    return results


SWEEP = """name: bench-startup-sweep
base: tiny-text
search: grid
search_space:
  trainer.lr: {{grid: [0.01, 0.005, 0.003, 0.002, 0.001, 1.0e-5, 1.0e-6, 1.0e-7]}}
overrides:
  data.max_files: 40
  trainer.max_steps: 20
  trainer.micro_batch_size: 8
  trainer.num_workers: 1
  trainer.log_every: 2
  trainer.eval_every: 5
  trainer.eval_samples: 32
  trainer.ckpt_every: 100000
  storage.path: {storage}
scheduler: {{type: asha, max_t: 4, grace_period: 2, reduction_factor: 2}}
metric: val_loss
mode: min
max_concurrent_trials: 2
resources_per_trial: {{num_workers: 1, cpus_per_worker: 0.99, driver_cpus: 0.01}}
"""


def measure_sweep(checkout: Path, work: Path) -> dict[str, object]:
    spec = work / "sweep.yaml"
    spec.write_text(SWEEP.format(storage=work / "sweeps"))
    wall, out = _timed([sys.executable, "-m", "e2e_dist.cli", "sweep", str(spec)], _env(checkout, work / "cache"),
                       work, timeout=3600)
    log = Path(re.search(r"log file: (\S+)", out).group(1)).read_text(errors="replace")
    rows = [json.loads(line) for line in (work / "sweeps" / "bench-startup-sweep" / "results.jsonl").read_text().splitlines()]
    fit_returned = {m.group(1): float(m.group(2)) for m in re.finditer(
        r"run '([^']+)' timeline, seconds from the process start:\n(?:[^\n]*\n)*?[^\n]*\+\s*([\d.]+) s\s+\(\+\s*[\d.]+\)\s+fit returned",
        log)}
    fixed = []
    for row in rows:
        m, name = row["metrics"], row["trial"]
        if row["status"] == "completed" and name in fit_returned and "step_time_s" in m:
            fixed.append(fit_returned[name] - m["step"] * m["step_time_s"])
    released = [float(x) for x in re.findall(r"its workers were released ([\d.]+) s after the decision", log)]
    firsts = [r["metrics"].get("startup/first_step_s") for r in rows if r["metrics"].get("startup/first_step_s")]
    return {"sweep_wall_s": wall, "trials": len(rows), "completed": sum(r["status"] == "completed" for r in rows),
            "fixed_cost_s": fixed, "first_step_s": firsts, "released_s": released}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--sides", default="cold,joined,bare,torchrun")
    p.add_argument("--sweep", action="store_true", help="also the 8-trial ASHA sweep")
    p.add_argument("--checkout", type=Path, default=ROOT, help="run e2e-dist from this checkout (default: this one)")
    p.add_argument("--work", type=Path, default=None, help="scratch folder (default: a new temp dir, removed)")
    args = p.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-startup-"))
    work.mkdir(parents=True, exist_ok=True)
    sides = [s for s in args.sides.split(",") if s]
    print(f"checkout {args.checkout}, work {work}")
    try:
        results = measure_sides(sides, args.rounds, args.checkout.resolve(), work) if sides else {}
        print("\nmedians of", args.rounds, "rounds:")
        med = {s: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for s, rs in results.items() if rs}
        for s, m in med.items():
            print(f"  {s:<9} " + "  ".join(f"{k} {v:.1f}" for k, v in m.items()))
        for base in ("bare", "torchrun"):
            if base in med:
                for s in ("cold", "joined"):
                    if s in med:
                        print(f"  {s} / {base}: {med[s]['wall_s'] / med[base]['wall_s']:.2f}x (wall)")
        if args.sweep:
            sw = measure_sweep(args.checkout.resolve(), work)
            fixed, rel = sw["fixed_cost_s"], sw["released_s"]
            print(f"\nsweep: {sw['trials']} trials ({sw['completed']} completed) in {sw['sweep_wall_s']:.0f} s; "
                  f"per-trial fixed cost median {statistics.median(fixed) if fixed else float('nan'):.1f} s "
                  f"({', '.join(f'{x:.1f}' for x in fixed)}); first step at "
                  f"{', '.join(f'{x:.1f}' for x in sw['first_step_s'])} s; ASHA stop -> workers released "
                  f"{', '.join(f'{x:.1f}' for x in rel) or '-'} s")
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
