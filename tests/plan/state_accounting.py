"""One rank of a CPU DeepSpeed run whose model-state tensors are counted, for the plan-vs-reality test.

Run as `python -m tests.plan.state_accounting RANK WORLD PORT`: builds the byte GPT under ZeRO 0-3
(fp32, as on CPU), takes one step (Adam's state exists), runs the next forward + backward (gradients
and reduction buckets exist: the in-step peak of model states), and prints one JSON line per stage
with the bytes of every distinct tensor storage reachable from the engine's optimizer and the model.
"""

from __future__ import annotations

import gc
import json
import os
import sys

import torch


def reachable_bytes(*roots) -> int:
    """Bytes of the distinct storages reachable from `roots` through DeepSpeed / torch.optim objects,
    dicts, lists and parameters' .grad (depth-limited)."""
    seen, storages = set(), {}

    def walk(obj, depth):
        if depth > 6 or id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            s = obj.untyped_storage()
            if s.nbytes():
                storages[s.data_ptr()] = max(storages.get(s.data_ptr(), 0), s.nbytes())
            if obj.grad is not None:
                walk(obj.grad, depth + 1)
            return
        if isinstance(obj, dict):
            for v in obj.values():
                walk(v, depth + 1)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                walk(v, depth + 1)
        elif type(obj).__module__.startswith(("deepspeed", "torch.optim")) and hasattr(obj, "__dict__"):
            for v in vars(obj).values():
                walk(v, depth + 1)

    for r in roots:
        walk(r, 0)
    return sum(storages.values())


def main(rank: int, world: int, port: int) -> None:
    os.environ["LOCAL_RANK"] = str(rank)
    from e2e_dist.config import RunConfig
    from e2e_dist.train.build import build_engine
    from e2e_dist.train.rendezvous import init_loopback_process_group

    init_loopback_process_group("gloo", rank=rank, world_size=world, port=port)
    for stage in (0, 1, 2, 3):
        cfg = RunConfig.model_validate({
            "name": "acct", "data": {"seq_len": 32},
            "model": {"kind": "gpt", "n_layer": 2, "n_head": 4, "d_model": 256, "max_seq_len": 32},
            "trainer": {"micro_batch_size": 2, "max_steps": 5, "num_workers": world},
            "deepspeed": {"zero_stage": stage}})
        built = build_engine(cfg, device=torch.device("cpu"), world=world)
        engine = built.engine
        batch = {"tokens": torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(rank))}
        engine.backward(engine(batch))
        engine.step()
        engine.backward(engine(batch))
        measured = reachable_bytes(engine.optimizer, list(engine.module.parameters()))
        print(json.dumps({"stage": stage, "rank": rank, "bytes": measured, "n_params": built.n_params}), flush=True)
        del engine, built
        gc.collect()


if __name__ == "__main__":
    main(*map(int, sys.argv[1:4]))
