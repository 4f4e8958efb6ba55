"""One rank of a CPU DeepSpeed run whose collectives are counted, for the plan's communication test.

Run as `python -m tests.plan.comm_accounting RANK WORLD PORT CASES_JSON`: for each case (ZeRO stage,
gradient accumulation, optional DeepSpeed overrides) builds the byte GPT with the project's own
`build_engine` (fp32 on CPU, gloo), takes WARMUP optimizer steps (ZeRO-3 records its parameter
trace in the first), then counts every torch.distributed collective of the next MEASURED steps and
prints one JSON line per case: payload bytes per optimizer step by operation.

Payload is nccl-tests' "size": all_reduce / reduce / broadcast the tensor, all_gather the gathered
(output) tensor, reduce_scatter the input (the whole, unscattered tensor). It is what the plan's
communication model counts (plan/comm.py), measured at torch.distributed's API, under DeepSpeed's
own deepspeed.comm layer, so nothing DeepSpeed sends escapes it. A collective called from inside
another one (torch's deprecated names call the new ones) is counted once.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import threading
from collections import defaultdict

import torch
import torch.distributed as dist

WARMUP, MEASURED = 2, 2
_OPS = {  # name -> (operation, payload bytes from the call's arguments)
    "all_reduce": ("all_reduce", lambda a, k: _nbytes(a[0] if a else k["tensor"])),
    "reduce": ("reduce", lambda a, k: _nbytes(a[0] if a else k["tensor"])),
    "broadcast": ("broadcast", lambda a, k: _nbytes(a[0] if a else k["tensor"])),
    "all_gather": ("all_gather", lambda a, k: sum(_nbytes(t) for t in (a[0] if a else k["tensor_list"]))),
    "all_gather_into_tensor": ("all_gather", lambda a, k: _nbytes(a[0] if a else k["output_tensor"])),
    "_all_gather_base": ("all_gather", lambda a, k: _nbytes(a[0] if a else k["output_tensor"])),
    "all_gather_coalesced": ("all_gather", lambda a, k: sum(_nbytes(t) for ts in a[0] for t in ts)),
    "reduce_scatter": ("reduce_scatter", lambda a, k: sum(_nbytes(t) for t in (a[1] if len(a) > 1 else k["input_list"]))),
    "reduce_scatter_tensor": ("reduce_scatter", lambda a, k: _nbytes(a[1] if len(a) > 1 else k["input"])),
    "_reduce_scatter_base": ("reduce_scatter", lambda a, k: _nbytes(a[1] if len(a) > 1 else k["input"])),
    "all_to_all_single": ("all_to_all", lambda a, k: _nbytes(a[1] if len(a) > 1 else k["input"])),
}


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class Counter:
    """Wraps torch.distributed's collectives (module and distributed_c10d names) and sums payload
    bytes by operation while `counting` is on."""

    def __init__(self) -> None:
        self.bytes: dict[str, int] = defaultdict(int)
        self.calls: dict[str, int] = defaultdict(int)
        self.counting = False
        self._depth = threading.local()
        c10d = dist.distributed_c10d
        for name, (op, size) in _OPS.items():
            original = getattr(c10d, name, None)
            if original is not None:
                wrapped = self._wrap(original, op, size)
                setattr(c10d, name, wrapped)
                if hasattr(dist, name):
                    setattr(dist, name, wrapped)

    def _wrap(self, fn, op, size):
        def counted(*args, **kwargs):
            depth = getattr(self._depth, "n", 0)
            if self.counting and depth == 0:
                self.bytes[op] += size(args, kwargs)
                self.calls[op] += 1
            self._depth.n = depth + 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth.n = depth
        return counted

    def reset(self) -> None:
        self.bytes.clear()
        self.calls.clear()


def run_case(counter: Counter, rank: int, world: int, case: dict) -> dict:
    from e2e_dist.config import RunConfig
    from e2e_dist.train.build import build_engine

    stage, accum = case["stage"], case["grad_accum"]
    cfg = RunConfig.model_validate({
        "name": "comm", "data": {"seq_len": 32},
        "model": {"kind": "gpt", "n_layer": 2, "n_head": 4, "d_model": 256, "max_seq_len": 32},
        "trainer": {"micro_batch_size": 2, "grad_accum": accum, "max_steps": 10, "num_workers": world},
        "deepspeed": {"zero_stage": stage, "overrides": case.get("overrides", {})}})
    built = build_engine(cfg, device=torch.device("cpu"), world=world)
    engine = built.engine
    gen = torch.Generator().manual_seed(rank)
    for step in range(WARMUP + MEASURED):
        counter.counting = step >= WARMUP
        for _ in range(accum):
            engine.backward(engine({"tokens": torch.randint(0, 256, (2, 33), generator=gen)}))
            engine.step()  # DeepSpeed steps the optimizer at the accumulation boundary only
    counter.counting = False
    row = {**case, "rank": rank, "n_params": built.n_params,
           "bytes_per_step": {op: b / MEASURED for op, b in counter.bytes.items()},
           "calls_per_step": {op: n / MEASURED for op, n in counter.calls.items()}}
    counter.reset()
    del engine, built
    gc.collect()
    return row


def main(rank: int, world: int, port: int, cases: list[dict]) -> None:
    os.environ["LOCAL_RANK"] = str(rank)
    from e2e_dist.train.rendezvous import init_loopback_process_group

    init_loopback_process_group("gloo", rank=rank, world_size=world, port=port)
    counter = Counter()
    for case in cases:
        print(json.dumps(run_case(counter, rank, world, case)), flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4]))
