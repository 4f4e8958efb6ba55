"""The end-of-run summary printed by `e2e-dist train`."""

from __future__ import annotations

from e2e_dist.config import RunConfig
from e2e_dist.tracking.run_location import wandb_sync_command
from e2e_dist.train.launcher import RunSummary
from e2e_dist.train.timeline import startup_line


def _num(v, fmt: str = ".4f") -> str:
    return format(v, fmt) if isinstance(v, (int, float)) else "-"


def print_run_summary(s: RunSummary, cfg: RunConfig) -> None:
    m = s.metrics
    unit = "tokens" if "tokens_per_s" in m else "samples"
    lines = [
        f"run            {s.name}  ({s.wall_s:.0f} s)",
        f"steps          {m.get('step', '-')}   world size {m.get('world_size', '-')}   ZeRO {m.get('zero_stage', '-')}   {m.get('precision', '')}",
        f"train loss     {_num(m.get('loss'))}",
    ]
    t = cfg.trainer
    if t.early_stop_patience is not None:  # why the run ended where it did
        best = f"best val loss {_num(m.get('val_loss_best'))} at step {m.get('val_loss_best_step', '-')}"
        rule = f"{t.early_stop_patience} evaluations in a row without a val loss {t.early_stop_min_delta:g} below the best"
        why = (f"early at step {m.get('step')} of at most {t.max_steps}: {rule}" if m.get("stop_reason") == "val_loss_plateau"
               else f"at max_steps {t.max_steps}, still improving (early stop needs {rule})")
        lines.append(f"stopped        {why}; {best}")
    for key, label in (("val_loss", "val loss"), ("val_bpb", "bits per byte"), ("val_acc", "val accuracy"),
                       ("val_cer", "val CER"), ("val_wer", "val WER")):
        if key in m:
            lines.append(f"{label:<15}{_num(m[key])}")
    lines.append(f"{unit}/s       {_num(m.get(f'{unit}_per_s'), ',.0f')}   step {_num(m.get('step_time_s'), '.3f')} s"
                 f"   {_num(m.get('achieved_tflops_per_device'), '.3f')} TFLOP/s per worker"
                 + (f"   MFU {m['mfu']:.1%}" if isinstance(m.get("mfu"), float) else ""))
    lines.append(f"{unit} seen     {_num(m.get(f'{unit}_seen'), ',')}   params {_num(m.get('n_params'), ',')}")
    read = m.get("data/samples_read")
    if isinstance(read, (int, float)) and read > 0:  # streamed (a train set in memory reads nothing)
        lines.append(f"data read      {read:,.0f} samples, {m.get('data/bytes_read', 0) / 2**20:,.1f} MiB by the ranks; "
                     f"the largest rank {m.get('data/samples_read_max_rank', 0) / read:.0%} of the samples")
    fetched = m.get("restore/bytes_fetched")
    if isinstance(fetched, (int, float)):  # this start resumed: what its nodes downloaded to restore
        lines.append(f"restored       {fetched / 1e6:,.1f} MB fetched by all nodes, "
                     f"{m.get('restore/bytes_fetched_max_node', 0) / 1e6:,.1f} MB by the busiest")
    startup = startup_line(m)
    if startup:  # the fixed cost every run pays before training (the whole timeline: the log file)
        lines.append(f"start-up       {startup}")
    lines.append(f"checkpoint     {s.checkpoint_uri or '-'}")
    lines.append(f"W&B run        {s.wandb_dir or '-'}")
    if s.wandb_copy:
        lines.append(f"W&B files      {s.wandb_copy}")
    # Every session of the run, not just the newest folder shown above: a restart starts a new one.
    sync = wandb_sync_command(cfg)
    if sync:
        lines.append(f"               upload it: {sync}")
    if s.log_path:
        lines.append(f"log file       {s.log_path}")
    print("\n".join(lines))
    if m.get("sample"):
        print("sample:\n" + "-" * 60 + f"\n{m['sample']}\n" + "-" * 60)
