"""Evaluation under ZeRO-3 on two real ranks when the val set does not divide by the world size.

Two spawned processes form a gloo group and build real DeepSpeed ZeRO-3 engines with a persistence
threshold of 0, so every parameter is truly partitioned and every forward gathers shards
collectively. The val selection is 5 samples in 3 micro-batch chunks for 2 ranks: rank 0 owns one,
rank 1 two. A rank that simply stopped early would leave the other waiting in a gather forever;
`evaluate` must finish on both ranks and give the loss `evaluate` gives on one worker to 1e-6
(the same weights score the same at any world size), which is the plain model's loss.
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


class ArraySamples:
    """Stands in for the launcher's materialized val selection: samples by number, from memory."""

    def __init__(self, tokens: np.ndarray):
        self.tokens, self.n = tokens, len(tokens)

    def read(self, ids):
        return {"tokens": self.tokens[ids], "valid": np.ones(len(ids), dtype=bool)}, 0


def val_samples() -> ArraySamples:
    return ArraySamples(np.array([list(TEXT[7 * i:][:SEQ + 1]) for i in range(5)], dtype=np.int64))


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
    result = evaluate(engine, model, val_samples(), BATCH, collate, torch.device("cpu"), rank, 2)
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
    from e2e_dist.train.evaluate import evaluate

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

    # One worker over the same selection with a plain model (same seed -> the engines' initial weights).
    c = cfg()
    torch.manual_seed(0)
    plain = build_model(c.model, c.data)
    one = evaluate(plain, plain, val_samples(), BATCH, collate, torch.device("cpu"), 0, 1)
    assert results[0]["val_loss"] == pytest.approx(one["val_loss"], rel=1e-6, abs=1e-6)
    with torch.no_grad():
        s = plain.eval_sums(collate({"tokens": val_samples().tokens}))
    assert one["val_loss"] == pytest.approx(float(s["loss_sum"]) / float(s["count"]), rel=1e-5)
