"""The issue-7 goals as ratios, and the printed table, for benchmarks/gpu_mfu.py's results."""

from __future__ import annotations


def goal_checks(by_key: dict, compile_s: float | None, compiled: bool) -> list[dict]:
    """The issue's goals as ratios (higher is better for all), from row key -> gpu_mfu.Row."""
    def ratio(a: str, b: str) -> float | None:
        ra, rb = by_key.get(a), by_key.get(b)
        return rb.step_s / ra.step_s if ra and rb and ra.step_s and rb.step_s else None

    raw2, raw3 = ("ds2c", "ds3c") if compiled else ("ds2", "ds3")
    return [
        {"what": "ours ZeRO-2 tokens/s vs plain torch.compile", "ratio": ratio("ours2", "compile"), "goal": 1.00},
        {"what": "ours ZeRO-3 tokens/s vs plain torch.compile", "ratio": ratio("ours3", "compile"), "goal": 0.90},
        {"what": f"ours ZeRO-2 vs raw DeepSpeed ZeRO-2{' + compile' if compiled else ''} (Ray Train overhead, "
                 f"1/step-time ratio)", "ratio": ratio("ours2", raw2), "goal": 1 / 1.02},
        {"what": f"ours ZeRO-3 vs raw DeepSpeed ZeRO-3{' + compile' if compiled else ''} (Ray Train overhead, "
                 f"1/step-time ratio)", "ratio": ratio("ours3", raw3), "goal": 1 / 1.02},
    ]


def format_table(res: dict) -> str:
    out = [f"{res['device']} | shape {res['shape_name']} {res['shape']} | "
           f"{res['flops_per_step'] / 1e9:.2f} GFLOP per step (FlopCounterMode)"
           + (f" | {res['threads']} thread(s) per row" if res["threads"] else ""),
           "| row | tokens/s | MFU | peak mem GiB | vs compile |", "|---|---:|---:|---:|---:|"]
    for r in res["rows"]:
        if r["error"]:
            out.append(f"| {r['name']} | failed: {r['error']} | | | |")
            continue
        m = f"{r['mfu']:.1%}" if r["mfu"] is not None else f"{r['achieved_gflops']:.2f} GFLOP/s"
        mem = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] is not None else "-"
        vs = f"{r['ratio_to_compile']:.2f}x" if r["ratio_to_compile"] else "-"
        out.append(f"| {r['name']} | {r['tokens_per_s']:,.0f} | {m} | {mem} | {vs} |")
    on_gpu = not res["device"].startswith("CPU")
    out.append("" if on_gpu else "\nThe goals below are for one GPU; on CPU the ratios are recorded, not judged.")
    for c in res["checks"]:
        if c["ratio"] is not None:
            verdict = ("ok" if c["ratio"] >= c["goal"] else "below goal") if on_gpu else "GPU goal"
            out.append(f"{c['what']}: {c['ratio']:.2f}x ({verdict} >= {c['goal']:.2f}x)")
    return "\n".join(out)
