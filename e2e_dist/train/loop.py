"""The per-worker training function that Ray Train's TorchTrainer runs on every rank.

build model -> DeepSpeed engine -> restore latest committed checkpoint (if any) -> step loop with
metrics every `log_every`, evaluation every `eval_every`, checkpoint every `ckpt_every` -> final
checkpoint + sample. The function gets the validated RunConfig as a plain dict (Ray pickles it) and
never parses YAML or talks to storage itself: e2e_dist.checkpoint and e2e_dist.tracking own those.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from ray.data.collate_fn import NumpyBatchCollateFn

from e2e_dist.config import RunConfig
from e2e_dist.train.deepspeed_config import build_deepspeed_config, lr_lambda, resolve_compile, resolve_precision
from e2e_dist.train import preemption
from e2e_dist.train.faults import maybe_inject_fault
from e2e_dist.train.flops import peak_flops, train_flops_per_batch
from e2e_dist.train.metrics import MetricWindow, all_reduce_sum
from e2e_dist.train.ray_env import quiet_library_logs
from e2e_dist.train.resume import restore

log = logging.getLogger("e2e_dist.train")


class PreemptedError(RuntimeError):
    """Raised on every rank after the just-in-time checkpoint; Ray Train restarts the group."""


class ModalityCollate(NumpyBatchCollateFn):
    """Our modality's numpy -> tensor collate in the form Ray Data's `iter_torch_batches` takes.

    Ray runs it (and the pinning and host-to-device copy after it) in its prefetch threads, so the
    next batch is ready on the device while the current step computes."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, batch):
        return self.fn(batch)


class BatchStream:
    """Endless micro-batches from a Ray Data shard, epoch after epoch, with a resumable position.

    The position is (epoch, batches consumed in that epoch). Each epoch draws rows at random from
    a buffer of `shuffle_rows` rows, seeded by (seed, epoch): every epoch has its own order, and
    that order is the same on every run. Resuming replays the epoch's order and skips the consumed
    batches, so a restart sees the same data it would have seen without the crash (up to Ray
    Data's shard assignment between workers). Batches are prefetched `prefetch` deep; on a GPU
    they arrive pinned and already copied to the device.
    """

    def __init__(self, shard, batch_size: int, collate, device: torch.device, epoch: int = 0, consumed: int = 0,
                 prefetch: int = 2, shuffle_rows: int = 0, seed: int = 0):
        self.shard, self.batch_size, self.device, self.prefetch = shard, batch_size, device, prefetch
        self.shuffle_rows, self.seed = shuffle_rows, seed
        self.collate = ModalityCollate(collate)
        self.epoch, self.consumed = epoch, consumed
        self._it: Iterator | None = None

    def _start_epoch(self) -> None:
        shuffle = {}
        if self.shuffle_rows:
            # Ray wants the buffer at least one batch; the seed mixes run seed and epoch.
            shuffle = {"local_shuffle_buffer_size": max(self.shuffle_rows, self.batch_size),
                       "local_shuffle_seed": int(np.random.SeedSequence([self.seed, self.epoch]).generate_state(1)[0])}
        self._it = iter(self.shard.iter_torch_batches(
            batch_size=self.batch_size, collate_fn=self.collate, device=self.device,
            pin_memory=self.device.type == "cuda", drop_last=True, prefetch_batches=self.prefetch, **shuffle))
        for _ in range(self.consumed):  # fast-forward to the saved position
            next(self._it)

    def next(self) -> dict[str, torch.Tensor]:
        if self._it is None:
            self._start_epoch()
        while True:
            try:
                batch = next(self._it)
                break
            except StopIteration:
                if self.consumed == 0:
                    raise RuntimeError("a data shard yields no full batch: lower trainer.micro_batch_size or add data") from None
                self.epoch, self.consumed = self.epoch + 1, 0
                self._start_epoch()
        self.consumed += 1
        return batch

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "consumed": self.consumed}


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    # Decay matrices and conv kernels; not biases, norms or embeddings-as-vectors (the usual GPT recipe).
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _enable_activation_checkpointing(model) -> None:
    from torch.utils.checkpoint import checkpoint

    for block in model.blocks():
        fwd = block.forward
        block.forward = lambda *a, _f=fwd, **k: checkpoint(_f, *a, use_reentrant=False, **k)


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


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    import deepspeed
    import ray.train
    from ray.train import Checkpoint

    from e2e_dist import checkpoint as ckpt
    from e2e_dist.models.registry import build_model
    from e2e_dist.tracking import Tracker
    from e2e_dist.train.progress import ProgressSink

    cfg = RunConfig.model_validate(loop_config["run"])
    quiet_library_logs()
    t = cfg.trainer
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    on_gpu = device.type == "cuda"
    torch.manual_seed(t.seed)

    model = build_model(cfg.model, cfg.data)
    # Count FLOPs on the real module before DeepSpeed partitions it (ZeRO-3 hides full params).
    model.to(device)
    n_params, n_params_non_embedding = model.num_params(), model.num_params(non_embedding=True)
    flops_per_micro = train_flops_per_batch(model, model.example_batch(t.micro_batch_size, device))
    flops_per_step = flops_per_micro * t.grad_accum
    if t.activation_checkpointing:
        _enable_activation_checkpointing(model)
    optimizer = torch.optim.AdamW(_param_groups(model, t.weight_decay), lr=t.lr, betas=t.betas, fused=on_gpu)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    ds_config = build_deepspeed_config(cfg, world_size=world, on_gpu=on_gpu)
    if not on_gpu:
        _skip_cpu_shm_comm()
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config, dist_init_required=False
    )
    if resolve_compile(cfg, on_gpu):
        engine.compile()

    # ---- resume: the newest *committed* checkpoint in storage, fetched once per node (resume.py)
    local_root = Path(tempfile.mkdtemp(prefix=f"e2e-{cfg.name}-r{rank}-"))
    resumed = restore(engine, cfg, rank=rank, world=world, local_rank=ctx.get_local_rank(),
                      node_rank=ctx.get_node_rank())
    start_step, data_pos, units_seen, resumed_from = resumed.step, resumed.data, resumed.units_seen, resumed.resumed_from
    logged_at_resume = resumed.logged

    tracker = Tracker.start(cfg, rank=rank, resume_step=resumed_from,
                            extra_config={"n_params": n_params, "world_size": world,
                                          "n_params_non_embedding": n_params_non_embedding,
                                          "flops_per_step": flops_per_step})
    if resumed_from is not None:
        tracker.backfill(logged_at_resume, resumed_from)
    progress = ProgressSink.connect(loop_config.get("progress_actor"), rank)

    collate = loop_config["collate"]
    train_stream = BatchStream(ray.train.get_dataset_shard("train"), t.micro_batch_size, collate, device,
                               prefetch=t.prefetch_batches, seed=cfg.data.seed,
                               shuffle_rows=cfg.data.shuffle_buffer_batches * t.micro_batch_size, **data_pos)
    val_shard = ray.train.get_dataset_shard("val")
    window = MetricWindow(device, flops_per_step, peak_flops(device), world)
    base_metrics = {"n_params": n_params, "n_params_non_embedding": n_params_non_embedding,
                    "flops_per_step": flops_per_step, "precision": resolve_precision(cfg, on_gpu),
                    "zero_stage": cfg.deepspeed.zero_stage, "world_size": world, "run_name": cfg.name,
                    # which speed options really took effect (benchmarks and tests read these back)
                    "compiled": bool(engine.is_compiled), "grad_accum": t.grad_accum,
                    "activation_checkpointing": t.activation_checkpointing,
                    # what the data subset holds (train_tokens, train_bytes, ...): sweeps and
                    # scaling fits need the real data size of each run
                    **{k: v for k, v in loop_config.get("data_stats", {}).items() if isinstance(v, (int, float))}}
    last_eval: dict[str, float] = {}
    last: dict[str, float] = {}
    if rank == 0 and resumed_from is not None:
        log.warning("resumed from the committed checkpoint of step %d", resumed_from)

    pending: list = []  # the upload still in flight (at most one)

    def save_and_report(step: int, metrics: dict[str, Any], final: bool) -> float:
        """Checkpoint at `step`; returns the seconds training stood still for it."""
        t_stall = time.perf_counter()
        if pending:  # at most one upload in flight: bounded memory, and errors surface here
            prev = pending.pop()
            prev.done.wait()
            if prev.error is not None:
                raise prev.error
        local = local_root / ckpt.checkpoint_dir_name(step)
        # The row logged at this step travels with the checkpoint (see Tracker.backfill).
        logged = {k: v for k, v in last.items() if k != "step" and isinstance(v, (int, float))} if last.get("step") == step else {}
        client_state = {"step": step, "data": train_stream.state(), "units_seen": units_seen, "logged": logged}
        ckpt.save_engine(engine, local, client_state)
        meta = {"config": cfg.to_public_dict(), "model_kind": cfg.model.kind, "data": train_stream.state(),
                "units_seen": units_seen}
        upload = ckpt.make_upload_fn(run_uri=cfg.run_uri, storage_cfg=cfg.storage, rank=rank, world_size=world,
                                     step=step, meta=meta, keep_last=t.keep_last,
                                     zero_stage=cfg.deepspeed.zero_stage)
        mode = ray.train.CheckpointUploadMode.ASYNC if (t.async_checkpoint and not final) else ray.train.CheckpointUploadMode.SYNC
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(str(local)),
                         checkpoint_dir_name=ckpt.checkpoint_dir_name(step), checkpoint_upload_mode=mode,
                         checkpoint_upload_fn=upload, delete_local_checkpoint_after_upload=True)
        if mode == ray.train.CheckpointUploadMode.ASYNC:
            pending.append(upload)
        return time.perf_counter() - t_stall

    engine.train()
    step = start_step
    stall_s = 0.0
    while step < t.max_steps:
        for _ in range(t.grad_accum):
            batch = train_stream.next()
            loss = engine(batch)
            engine.backward(loss)
            engine.step()  # DeepSpeed only updates on the accumulation boundary
            n = model.units_in(batch)
            window.add_micro(loss, n)
            units_seen += n * world
        window.end_step()
        step += 1
        maybe_inject_fault(loop_config.get("fault"), loop_config.get("fault_dir", ""), cfg.name, step, rank)
        is_last = step == t.max_steps
        preempted = False
        if step % t.log_every == 0 or is_last:
            # SIGTERM on any rank: everyone checkpoints now (checked once per log interval, inside the
            # metrics collective, so the hot path has no extra collective).
            interval, any_preempt = window.flush(model.unit_name, preempt_requested=preemption.requested())
            preempted = any_preempt and not is_last
            last = {**interval, "lr": scheduler.get_last_lr()[0], "step": step,
                    f"{model.unit_name}_seen": units_seen, "epoch": train_stream.epoch}
            if stall_s:
                last["ckpt_stall_s"] = stall_s
        do_eval = step % t.eval_every == 0 or is_last
        if do_eval:
            last_eval = evaluate(engine, model, val_shard, t.eval_batches, t.micro_batch_size, collate, device,
                                 rank, world)
            last.update(last_eval)
        if step % t.log_every == 0 or do_eval:
            tracker.log({k: v for k, v in last.items() if k != "step"}, step=step, commit=True)
            progress.update(step, t.max_steps, last)
        if preempted:
            save_and_report(step, {**base_metrics, **last, "preempted": 1}, final=True)
            tracker.finish(exit_code=1)
            raise PreemptedError(f"preempted (SIGTERM) at step {step}: checkpoint committed, "
                                 f"a restart resumes from it")
        if step % t.ckpt_every == 0 and not is_last:
            stall_s = save_and_report(step, {**base_metrics, **last}, final=False)
            tracker.copy_to_storage()  # s3:// runs: W&B files next to the run, should this node go
        elif do_eval and not is_last:
            ray.train.report({**base_metrics, **last})  # feeds Tune schedulers between checkpoints

    final = {**base_metrics, **last, "step": step, f"{model.unit_name}_seen": units_seen}
    final["sample"] = _final_sample(engine, model, rank, cfg)
    tracker.log_summary({k: v for k, v in final.items() if isinstance(v, (int, float, str))})
    save_and_report(step, final, final=True)
    progress.update(step, t.max_steps, final, done=True)
    tracker.finish()
    shutil.rmtree(local_root, ignore_errors=True)


def _skip_cpu_shm_comm() -> None:
    """Keep DeepSpeed's CPU collectives on plain gloo.

    Its shared-memory all-reduce op is JIT-built on first use (~25 s on a fresh machine) and its
    rendezvous between Ray worker processes stalled init by ~60 s here; gloo is what the raw DDP
    baseline uses too, so CPU comparisons stay like for like.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def _final_sample(engine, model, rank: int, cfg: RunConfig) -> str:
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
