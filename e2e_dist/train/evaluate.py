"""Evaluation on the validation set, and the text sample at the end of a run."""

from __future__ import annotations

import torch

from e2e_dist.config import RunConfig
from e2e_dist.train.metrics import all_reduce_sum


def evaluate(engine, model, val_iter, batches: int, batch_size: int, collate, device, rank: int, world: int) -> dict[str, float]:
    """Validation on the first `batches * world` batches of the (unsplit, deterministic) val set.

    Every rank reads the same val stream and takes every world-th batch, so the evaluated set is
    identical from run to run and across restarts, whatever Ray Data's split would have done.
    Every rank runs the same number of forwards: under ZeRO-3 each forward gathers parameter shards
    collectively, so a rank that stopped one batch early would hang the others. A rank short of a
    batch (a val set that does not divide by the world size) repeats one and discards the result.
    """
    mine, total, filler = [], 0, None
    for i, np_batch in enumerate(val_iter.iter_batches(batch_size=batch_size, batch_format="numpy",
                                                       drop_last=False)):
        if i >= batches * world:
            break
        total += 1
        if i == 0:
            filler = np_batch  # what a short rank runs (and discards)
        if i % world == rank:
            mine.append(np_batch)
    rounds = -(-total // world)  # the same on every rank: they all read the same stream
    engine.eval()
    sums = {k: torch.zeros((), device=device) for k in model.eval_sum_keys()}
    with torch.no_grad():
        for r in range(rounds):
            real = r < len(mine)
            batch = {k: v.to(device) for k, v in collate(mine[r] if real else filler).items()}
            out = model.eval_sums(batch)
            if real:
                for k, v in out.items():
                    sums[k] = sums[k] + v.float()
    engine.train()
    return model.summarize_eval(all_reduce_sum(sums, device))



def final_sample(engine, model, rank: int, cfg: RunConfig) -> str:
    """A short generated text (text models) from rank 0; empty for other modalities.

    Generation runs on a plain copy of the model: under ZeRO-3 the engine's module fetches its
    parameter shards with collectives in every forward, which only rank 0 would call here.
    """
    if not hasattr(model, "generate"):
        return ""
    import deepspeed

    from e2e_dist.models.registry import build_model

    # Gathering ZeRO-3 shards is collective, so every rank enters the context.
    state = None
    with deepspeed.zero.GatheredParameters(list(model.parameters()), enabled=cfg.deepspeed.zero_stage == 3):
        if rank == 0:
            state = {k: v.detach().float().cpu().clone() for k, v in model.state_dict().items()}
    if rank != 0:
        return ""
    plain = build_model(cfg.model, cfg.data)
    plain.load_state_dict(state)
    plain.eval()
    g = torch.Generator().manual_seed(cfg.trainer.seed)
    return "def " + plain.generate(b"def ", max_new_bytes=160, generator=g).decode("utf-8", errors="replace")
