"""The start-up timeline: rank 0's phases reach the driver as metrics, merge in time order, and
the summary line names the biggest parts."""

from __future__ import annotations

import time

from e2e_dist.train.timeline import (
    WORKER_PHASES,
    Timeline,
    metric_key,
    process_start,
    startup_line,
    worker_timeline,
)


def test_worker_phases_travel_as_metrics_and_merge_into_the_drivers_timeline() -> None:
    t0 = time.time() - 30.0
    driver = Timeline(t0=t0)
    driver.mark("Ray up", at=t0 + 5.0)
    driver.mark("data ready", at=t0 + 8.0)
    driver.mark("trainer started", at=t0 + 8.5)
    worker = Timeline(t0=t0)  # rank 0 marks against the driver's start (loop_config["timeline_t0"])
    worker.mark("training function entered", at=t0 + 17.0)
    worker.mark("engine built", at=t0 + 20.0)
    worker.mark("first step", at=t0 + 21.25)
    reported = worker.metrics()
    assert reported == {metric_key("training function entered"): 17.0, metric_key("engine built"): 20.0,
                        metric_key("first step"): 21.25}
    driver.mark("fit returned", at=t0 + 24.0)
    driver.add_reported({**reported, "loss": 1.0, metric_key("not a phase"): 3.0})
    lines = driver.render().splitlines()
    assert [line.split(")", 1)[1].strip() for line in lines] == [
        "Ray up", "data ready", "trainer started", "training function entered", "engine built", "first step",
        "fit returned"]
    assert lines[3].startswith("  +  17.00 s  (+  8.50)")  # from the start, and the gap: Train's group start here
    line = startup_line({**driver.metrics(), **reported})
    assert line == "first step at 21.2 s (Ray 5.0, data 3.0, workers 8.5, engine 3.0 s)"
    with_wandb = {**driver.metrics(), **reported, metric_key("checkpoint restored"): 20.0, metric_key("W&B started"): 21.0}
    assert startup_line(with_wandb) == "first step at 21.2 s (Ray 5.0, data 3.0, workers 8.5, engine 3.0, W&B 1.0 s)"


def test_no_first_step_no_line_and_worker_clock_defaults() -> None:
    assert startup_line({"loss": 1.0}) is None
    tl = worker_timeline(None)  # no driver start given: its own process start
    assert tl.marks[0][0] == "worker process started" and tl.t0 == tl.marks[0][1] == process_start()
    assert process_start() <= time.time() and tl.at("worker process started") == 0.0
    assert set(WORKER_PHASES) >= {"engine built", "first batch", "first step"}
    # the loop asks on every micro-batch: only the first call marks
    assert tl.mark_once("first batch") and not tl.mark_once("first batch")
    assert [p for p, _ in tl.marks].count("first batch") == 1 and tl.at("first batch") is not None
