"""Evaluation under ZeRO-3 on two real ranks when the val set does not divide by the world size.

Two spawned processes form a gloo group and build real DeepSpeed ZeRO-3 engines with a persistence
threshold of 0, so every parameter is truly partitioned and every forward gathers shards
collectively. The val stream has 3 batches for 2 ranks: rank 0 owns two, rank 1 one. A rank that
simply stopped early would leave the other waiting in a gather forever; `evaluate` must finish
on both ranks and give exactly the loss of a plain model over the 3 batches.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

SEQ, BATCH = 16, 2
MODEL = {"kind": "gpt", "n_layer": 1, "n_head": 2, "d_model": 32, "max_seq_len": SEQ}
TEXT = b"def evaluate(engine, model, val):\n    return sum(model(b) for b in val)\n" * 3


class ListStream:
    """Stands in for a Ray Data val shard: the same fixed numpy batches on every rank."""

    def __init__(self, batches):
        self.batches = batches

    def iter_batches(self, **_):
        return iter(self.batches)


def val_batches() -> list[dict]:
    rows = [list(TEXT[7 * i:][:SEQ + 1]) for i in range(5)]
    tokens = np.array(rows, dtype=np.int64)
    return [{"tokens": tokens[i:i + BATCH]} for i in range(0, 5, BATCH)]  # 2 + 2 + 1 rows: 3 batches


def cfg():
    from e2e_dist.config import RunConfig

    return RunConfig.model_validate({
        "model": MODEL, "data": {"seq_len": SEQ},
        "trainer": {"micro_batch_size": BATCH, "precision": "fp32"},
        "deepspeed": {"zero_stage": 3, "overrides": {"zero_optimization": {"stage3_param_persistence_threshold": 0}}},
    })


def rank_main(rank: int, port: int, out: str) -> None:
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    import deepspeed
    import torch.distributed as dist

    from e2e_dist.data.text import collate
    from e2e_dist.models.registry import build_model
    from e2e_dist.train.deepspeed_config import build_deepspeed_config
    from e2e_dist.train.build import skip_cpu_shm_comm as _skip_cpu_shm_comm
    from e2e_dist.train.evaluate import evaluate

    from e2e_dist.train.rendezvous import init_loopback_process_group

    init_loopback_process_group("gloo", rank=rank, world_size=2, port=port)
    _skip_cpu_shm_comm()
    c = cfg()
    torch.manual_seed(0)
    model = build_model(c.model, c.data)
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()),
                                      config=build_deepspeed_config(c, world_size=2, on_gpu=False),
                                      dist_init_required=False)
    partitioned = all(p.numel() == 0 for p in model.parameters())
    result = evaluate(engine, model, ListStream(val_batches()), batches=8, batch_size=BATCH, collate=collate,
                      device=torch.device("cpu"), rank=rank, world=2)
    Path(out, f"rank{rank}.json").write_text(json.dumps({"partitioned": partitioned, **result}))
    dist.barrier()
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_zero3_evaluate_with_uneven_val_batches_finishes_and_is_exact(tmp_path):
    from e2e_dist.data.text import collate
    from e2e_dist.models.registry import build_model

    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=rank_main, args=(r, port, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=180)
    hung = [p.pid for p in procs if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
    assert not hung, "evaluate hung under ZeRO-3 (ranks ran different numbers of forwards)"
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(r.pop("partitioned") for r in results), "parameters were not partitioned: the test proves nothing"
    assert results[0] == results[1]

    # The plain model over the same 3 batches (same seed -> same initial weights as the engines).
    c = cfg()
    torch.manual_seed(0)
    plain = build_model(c.model, c.data).eval()
    with torch.no_grad():
        sums = [plain.eval_sums(collate(b)) for b in val_batches()]
    loss = sum(float(s["loss_sum"]) for s in sums) / sum(float(s["count"]) for s in sums)
    assert results[0]["val_loss"] == pytest.approx(loss, rel=1e-5)
