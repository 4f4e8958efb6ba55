"""`e2e-dist plan` vs what a GPU really holds (BENCHMARKS.md section 10): one rank, each ZeRO stage.

For a preset (default gpt-125m) at one micro-batch, builds our DeepSpeed engine (train/build.py) at
ZeRO 0-3 on one GPU, runs two optimizer steps and compares `torch.cuda.max_memory_allocated` with
the plan's per-GPU bytes (model states + activations; the plan's 1 GiB reserve and 10% headroom are
for what allocation cannot see and are not part of the comparison). Run by benchmarks/gpu_run.sh.
On a machine without CUDA (`--device cpu`, a smoke test of this script) the peak is the process's
VmHWM growth instead, in fp32.

    python benchmarks/plan_gpu.py [--preset gpt-125m] [--micro 8] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _vmhwm() -> int:
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="gpt-125m")
    ap.add_argument("--micro", type=int, default=8)
    ap.add_argument("--stages", default="0,1,2,3")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="extra config overrides")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    import torch

    from e2e_dist.config import load_run_config
    from e2e_dist.plan.memory import GiB
    from e2e_dist.plan.recommend import Hardware
    from e2e_dist.plan.report import configured_option, plan_for
    from e2e_dist.train.build import build_engine
    from e2e_dist.train.rendezvous import init_loopback_process_group

    cuda = args.device == "cuda"
    os.environ.setdefault("LOCAL_RANK", "0")
    init_loopback_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    name = torch.cuda.get_device_name(0) if cuda else "CPU"
    mem_gib = torch.cuda.get_device_properties(0).total_memory / GiB if cuda else 1024.0
    rows = []
    for stage in map(int, args.stages.split(",")):
        cfg = load_run_config(args.preset, [
            f"deepspeed.zero_stage={stage}", f"trainer.micro_batch_size={args.micro}", "trainer.global_batch_size=null",
            "trainer.grad_accum=1", "trainer.num_workers=1", "trainer.check_memory=false",
            *([] if cuda else ["trainer.precision=fp32", "trainer.compile=false"]), *args.overrides])
        plan = plan_for(cfg, Hardware(gpus_per_node=1, gpu_mem_gib=mem_gib, gpu_name=name))
        mine = configured_option(plan, cfg)
        try:
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            else:
                open("/proc/self/clear_refs", "w").write("5")
            before = torch.cuda.memory_allocated() if cuda else _vmhwm()
            built = build_engine(cfg, device=device, world=1)
            engine, model = built.engine, built.model
            for _ in range(2):
                batch = {k: v.to(device) for k, v in model.example_batch(args.micro, device).items()}
                engine.backward(engine(batch))
                engine.step()
            if cuda:
                torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() if cuda else _vmhwm()) - before
            error = None
        except Exception as e:  # an out-of-memory is a result too
            peak, error = None, (str(e).splitlines() or [type(e).__name__])[0][:200]
        rows.append({"stage": stage, "micro": args.micro, "plan_states": mine.states.gpu,
                     "plan_activations": mine.activations.peak, "plan_total": mine.gpu_bytes, "measured": peak,
                     "ratio": peak / mine.gpu_bytes if peak else None, "error": error})
        engine = built = model = None  # noqa: F841 - free the stage's engine before the next one
        if cuda:
            torch.cuda.empty_cache()
    print(f"{args.preset} on {name}, micro-batch {args.micro}, one rank")
    print("| ZeRO | plan states GiB | plan activations GiB | plan total GiB | measured peak GiB | measured / plan |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        got = f"{r['measured'] / GiB:.2f}" if r["measured"] else f"failed: {r['error']}"
        ratio = f"{r['ratio']:.2f}" if r["ratio"] else "-"
        print(f"| {r['stage']} | {r['plan_states'] / GiB:.2f} | {r['plan_activations'] / GiB:.2f} | "
              f"{r['plan_total'] / GiB:.2f} | {got} | {ratio} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"preset": args.preset, "device": name, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
