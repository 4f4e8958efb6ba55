"""Evaluation on the validation set, and the text sample at the end of a run."""

from __future__ import annotations

import torch

from e2e_dist.config import RunConfig
from e2e_dist.data.order import eval_chunks
from e2e_dist.train.batches import model_batch
from e2e_dist.train.metrics import all_reduce_sum


def evaluate(engine, model, val, micro_batch: int, collate, device, rank: int, world: int,
             cache: dict | None = None) -> dict[str, float]:
    """Validation on `val`, the fixed selection of the val split (launcher: trainer.eval_samples of it).

    The selection is cut into micro-batch chunks at fixed places and dealt out in contiguous runs
    (order.eval_chunks): each chunk is the same forward at any world size and the sums are float64,
    so the same weights give the same metrics (to ~1e-12) on 1 or 8 workers. Each rank reads only
    its chunks, once (kept in `cache` for later evaluations). Every rank runs the same number of
    forwards: under ZeRO-3 each forward gathers parameter shards collectively, so a rank with fewer
    chunks repeats one and discards the result.
    """
    import numpy as np

    cache = {} if cache is None else cache
    mine, rounds = eval_chunks(val.n, micro_batch, rank, world)
    if "chunks" not in cache:
        cache["chunks"] = [val.read(np.arange(lo, hi))[0] for lo, hi in mine]
        cache["filler"] = cache["chunks"][0] if mine else val.read(np.arange(min(micro_batch, val.n)))[0]
    chunks = cache["chunks"]
    engine.eval()
    sums = {k: torch.zeros((), device=device, dtype=torch.float64) for k in model.eval_sum_keys()}
    with torch.no_grad(), own_parameters_gathered(model):
        for r in range(rounds):
            real = r < len(chunks)
            batch = {k: v.to(device) for k, v in model_batch(chunks[r] if real else cache["filler"], collate).items()}
            out = model.eval_sums(batch)
            if real:
                for k, v in out.items():
                    sums[k] = sums[k] + v.double()
    engine.train()
    return model.summarize_eval(all_reduce_sum(sums, device))


def own_parameters_gathered(model):
    """What `eval_sums` needs under ZeRO-3: it is not `forward`, and DeepSpeed's hooks gather a
    submodule's shards only when that submodule is called, so the parameters the model owns
    directly (a plug-in's class token, say) are gathered around it. Collective: every rank enters."""
    import deepspeed

    own = [p for p in model.parameters(recurse=False) if hasattr(p, "ds_id")]
    return deepspeed.zero.GatheredParameters(own, enabled=bool(own))


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
