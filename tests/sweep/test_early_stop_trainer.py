"""A data ablation's trials train until their val loss stops improving: the trainer's early stop
on a plateau (trainer.early_stop_patience, early_stop_min_delta), through a real local Ray and
DeepSpeed run (tiny GPT, 1 worker), and the rule itself on RunState (resumes included)."""

from __future__ import annotations

import math

import pytest

from e2e_dist.config import load_run_config
from e2e_dist.sweep.results import still_learning
from e2e_dist.train.run_state import RunState


def test_patience_counts_evaluations_without_a_gain_of_min_delta_and_survives_a_resume() -> None:
    state, counts = RunState(), []
    # 2.10 beats 2.15 by only 0.05 (< min_delta 0.1): the best, not a gain; NaN is no gain either.
    for step, v in ((10, 2.5), (20, 2.3), (30, 2.15), (40, 2.10), (50, math.nan), (60, 2.0), (70, 2.05)):
        state.step = step
        row = {"val_loss": v}
        state.note_eval(row, min_delta=0.1)
        counts.append(state.evals_without_gain)
    assert counts == [0, 0, 0, 1, 2, 0, 1]  # 2.0 is 0.15 below 2.15, the loss the count started from
    assert (state.best_val_loss, state.best_val_step, state.gain_loss) == (2.0, 60, 2.0)
    back = RunState.from_client_state(state.client_state(), micro_batch_size=8, world=2)
    assert (back.gain_loss, back.evals_without_gain) == (2.0, 1)
    old = {k: v for k, v in state.client_state().items() if k not in ("gain_loss", "evals_without_gain")}
    fresh = RunState.from_client_state(old, micro_batch_size=8, world=2)  # a checkpoint from before the fields
    fresh.note_eval({"val_loss": 2.5})
    assert (fresh.gain_loss, fresh.evals_without_gain) == (2.5, 0)


def test_an_early_stopped_trial_is_not_still_learning() -> None:
    rows = [{"trial": t, "metrics": {"val_loss_best_step": 2600, "step": 3000, "stop_reason": r}}
            for t, r in (("a", "val_loss_plateau"), ("b", "max_steps"))]
    assert still_learning(rows, ["a", "b"]) == {"b": "best evaluation at step 2600 of 3000"}


def test_an_early_stopped_trial_is_a_completed_row_that_enters_the_fit() -> None:
    """The sweep's table: a trial that ended on its own plateau finished (a scheduler's stop, at the
    same step, did not); its stop_reason is kept in results.jsonl."""
    from e2e_dist.sweep.table import SweepBook, TrialRow, clean_metrics

    reported = clean_metrics({"step": 3400, "val_loss_best": 1.54, "stop_reason": "val_loss_plateau", "sample": "def"})
    assert reported == {"step": 3400, "val_loss_best": 1.54, "stop_reason": "val_loss_plateau"}
    row = TrialRow("t1", "abl-t001", {}, max_steps=6000, metrics=reported)
    assert SweepBook._finish_state(row) == "completed"
    row.metrics = {"step": 3400, "val_loss_best": 1.54}  # ASHA's stop: the run did not end itself
    assert SweepBook._finish_state(row) == "stopped"
    row.metrics = {"step": 6000, "stop_reason": "max_steps"}
    assert SweepBook._finish_state(row) == "completed"


def test_d_of_an_early_stopped_ablation_is_the_subset_not_the_tokens_it_read() -> None:
    """Early-stopped trials read different token counts; D is still the unique data each had."""
    from e2e_dist.sweep.results import fit_points

    rows = [{"trial": f"t{i}", "status": "completed", "params": {},
             "metrics": {"val_loss_best": 2.5 - 0.2 * i, "n_params_non_embedding": 394496,
                         "train_tokens": 32768 * 2**i, "tokens_seen": 2048 * (600 + 500 * i)}} for i in range(4)]
    names, n, d, loss, key = fit_points(rows, "val_loss_best")
    assert key == "train_tokens" and list(d) == [32768, 65536, 131072, 262144]
    for r in rows:  # one subset for all (a compute sweep): the tokens read are what varies
        r["metrics"]["train_tokens"] = 4_000_000
    assert fit_points(rows, "val_loss_best")[4] == "tokens_seen"


def test_config_refuses_a_patience_of_zero() -> None:
    from e2e_dist.errors import ConfigError

    with pytest.raises(ConfigError, match=r"trainer.early_stop_patience: .*greater than or equal to 1"):
        load_run_config("tiny-text", ["trainer.early_stop_patience=0"])


@pytest.mark.slow
def test_a_run_stops_on_a_plateau_and_says_why(ray_local, tmp_path, capsys) -> None:
    """min_delta larger than any gain: the first evaluation sets the mark, the next `patience` do not
    beat it, so the run stops at the third evaluation (step 12 of at most 40), deterministically."""
    from e2e_dist.train.launcher import run_training
    from e2e_dist.train.report import print_run_summary

    cfg = load_run_config("tiny-text", [
        "name=es", f"storage.path={tmp_path}", "data.max_files=20", "data.max_bytes=65536",
        "model.n_layer=1", "model.d_model=32", "model.n_head=2", "model.max_seq_len=64", "data.seq_len=64",
        "trainer.num_workers=1", "trainer.cpus_per_worker=0.99", "trainer.micro_batch_size=4",
        "trainer.max_steps=40", "trainer.log_every=4", "trainer.eval_every=4", "trainer.eval_samples=16",
        "trainer.ckpt_every=1000", "trainer.warmup_steps=1",
        "trainer.early_stop_patience=2", "trainer.early_stop_min_delta=100",
    ])
    summary = run_training(cfg, quiet=True)
    m = summary.metrics
    assert m["step"] == 12 and m["stop_reason"] == "val_loss_plateau"
    assert m["val_loss_best"] <= m["val_loss"] and m["val_loss_best_step"] in (4, 8, 12)
    assert summary.checkpoint_uri  # the final checkpoint is taken at the stop
    print_run_summary(summary, cfg)
    out = capsys.readouterr().out
    assert "stopped        early at step 12 of at most 40: 2 evaluations in a row without a val loss 100" in out
