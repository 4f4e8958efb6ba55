"""Resume cost at the same layout vs another layout (issue 12): goal resized <= 2x same-size once converted.

One process, one gloo rank, local storage: a run's checkpoint is written at ZeRO-2, then resumed
through the loop's own restore path (train/resume.py `choose` + `restore`: find, verify, download,
convert or reuse the universal form, load) three ways, in rotating order, `--rounds` times:

    same        ZeRO-2 engine, native load (what a same-size resume does)
    first       ZeRO-3 engine, universal form not cached yet (conversion + upload included)
    cached      ZeRO-3 engine, universal form already committed (every later resize)

The layout change here is the ZeRO stage; a world-size change takes the same route (convert once,
load the universal form) and the conversion reads every rank's shards either way. Engine build time
is the same for all three and is not counted. Prints a table and one JSON line.

    python benchmarks/reshard_resume.py --shape tiny-text   (and --shape cpu-large)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

SHAPES = {
    # the tiny-text preset's model
    "tiny-text": ["model.n_layer=2", "model.d_model=128", "model.n_head=4", "model.max_seq_len=128", "data.seq_len=128"],
    # a larger CPU shape: ~25M parameters, ~300 MB per checkpoint with Adam moments
    "cpu-large": ["model.n_layer=8", "model.d_model=512", "model.n_head=8", "model.max_seq_len=256", "data.seq_len=256"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny-text")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    from e2e_dist.checkpoint import save_engine, universal
    from e2e_dist.checkpoint.discover import find_latest_committed
    from e2e_dist.config import load_run_config
    from e2e_dist.train.build import build_engine, skip_cpu_shm_comm
    from e2e_dist.train.rendezvous import init_loopback_process_group
    from e2e_dist.train.resume import choose, restore
    from tests.fixtures.tiny_deepspeed import upload

    init_loopback_process_group("gloo")
    skip_cpu_shm_comm()
    root = Path(tempfile.mkdtemp(prefix="e2eb-reshard-"))

    def cfg_at(stage: int):
        return load_run_config("tiny-text", [f"storage.path={root}/runs", "name=bench", "trainer.num_workers=1",
                                             f"deepspeed.zero_stage={stage}", *SHAPES[args.shape]])

    src_cfg = cfg_at(2)
    built = build_engine(src_cfg, device=torch.device("cpu"), world=1)
    batch = built.model.example_batch(2, torch.device("cpu"))
    for _ in range(2):  # optimizer state exists
        loss = built.engine(batch)
        built.engine.backward(loss)
        built.engine.step()
    client = {"step": 2, "data": {"epoch": 0, "samples": 4}, "units_seen": 0, "logged": {}}
    local = save_engine(built.engine, root / "save", client)
    upload(local, src_cfg.run_uri, 2, zero_stage=2, meta={"config": src_cfg.to_public_dict(), "model_kind": "gpt"},
           storage_cfg=src_cfg.storage)
    found, _ = find_latest_committed(src_cfg.run_uri, src_cfg.storage)
    ckpt_bytes = sum(f["size"] for f in found.manifest["files"])
    del built

    def resume(stage: int, *, drop_cache: bool) -> float:
        cfg = cfg_at(stage)
        if drop_cache:
            shutil.rmtree(Path(found.uri) / universal.UNIVERSAL_DIR, ignore_errors=True)
        engine = build_engine(cfg, device=torch.device("cpu"), world=1, load_universal=stage != 2).engine
        t0 = time.perf_counter()
        plan = choose(cfg, rank=0, world=1, node_rank=0)
        state = restore(engine, plan, cfg, rank=0, world=1, local_rank=0, node_rank=0)
        took = time.perf_counter() - t0
        assert state.step == 2 and plan.load_universal == (stage != 2)
        return took

    sides = {"same": lambda: resume(2, drop_cache=False), "first": lambda: resume(3, drop_cache=True),
             "cached": lambda: resume(3, drop_cache=False)}
    times: dict[str, list[float]] = {k: [] for k in sides}
    order = list(sides)
    for r in range(args.rounds):
        for name in order[r % 3:] + order[: r % 3]:
            if name == "cached" and not (Path(found.uri) / universal.UNIVERSAL_DIR / "manifest.json").exists():
                resume(3, drop_cache=False)  # make sure the cache is there for the cached side
            times[name].append(sides[name]())
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"shape {args.shape}: checkpoint {ckpt_bytes / 1e6:.1f} MB, {args.rounds} rounds, load avg "
          f"{os.getloadavg()[0]:.1f}")
    for k in sides:
        print(f"  {k:<7} median {med[k]:7.3f} s  ({', '.join(f'{t:.3f}' for t in times[k])})  "
              f"{med[k] / med['same']:.2f}x same")
    print(json.dumps({"shape": args.shape, "checkpoint_mb": round(ckpt_bytes / 1e6, 1), "median_s": med,
                      "first_vs_same": med["first"] / med["same"], "cached_vs_same": med["cached"] / med["same"]}))
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
