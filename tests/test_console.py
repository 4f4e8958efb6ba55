"""The console shows our lines only; everything libraries print goes to the run's log file.

A whole `e2e-dist train` as a user runs it, console and log file: the speech run of
tests/train/test_modalities_e2e.py; of a submitted job: tests/cluster/test_separate_hosts.py."""

from __future__ import annotations

import io
import logging
import subprocess
import sys

from e2e_dist import console


def test_workers_tag_our_records_and_leave_file_only_details_untagged():
    """What a Ray worker prints for the driver to pick out (a fresh process: the tagging is global);
    a FILE_ONLY detail is printed untagged: the driver's RunLog writes it to the log file only."""
    code = ("import logging; from e2e_dist.console import tag_our_lines, FILE_ONLY; tag_our_lines(); "
            "log = logging.getLogger('e2e_dist.data'); log.info('committed x'); log.warning('bad file f'); "
            "log.info('stats', extra=FILE_ONLY); log.debug('noise'); tag_our_lines(); log.info('once')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines() == ["[e2e-dist] INFO committed x", "[e2e-dist] WARNING bad file f",
                                        "INFO e2e_dist.data: stats", "[e2e-dist] INFO once"]
    assert console.parse_tagged("INFO e2e_dist.data: stats") is None
    assert console.parse_tagged("[e2e-dist] WARNING bad file f") == (logging.WARNING, "bad file f")
    assert console.parse_tagged("[e2e-dist] NOTALEVEL x") is None
    assert console.parse_tagged("(RayTrainWorker pid=1) [e2e-dist] INFO x") is None  # Ray's prefix is not in the data


def test_run_log_sends_worker_output_to_the_file_and_our_lines_to_the_console(tmp_path):
    shown = io.StringIO()
    path = tmp_path / "logs" / "r.log"
    lines = ["[2026-12-02 19:44:22,165] [WARNING] [real_accelerator.py:213:get_accelerator] Setting accelerator to CPU.",
             "[e2e-dist] INFO committed /runs/r/step_00000020 (6 files, 7164947 bytes)",
             "[e2e-dist] WARNING skipping unreadable image /d/x.png: truncated",
             "Traceback (most recent call last):"]
    before = (list(logging.getLogger().handlers), logging.getLogger().level, logging.getLogger("ray.data").propagate)
    with console.RunLog(path, console=shown, verbose=False) as run_log:
        for pid in (11, 12):  # two ranks say the same
            run_log.handle_worker_output({"pid": pid, "ip": "127.0.0.1", "actor_name": "RayTrainWorker", "lines": lines})
        run_log.handle_worker_output({"pid": 13, "ip": "127.0.0.1", "task_name": "MapBatches(decode)",
                                      "lines": ["[e2e-dist] DEBUG not a console level", "plain"]})
        logging.getLogger("ray.data").warning("Progress bars disabled")   # a library on the driver
        logging.getLogger("e2e_dist.launcher").info("log file: %s", path)  # ours, on the driver
    assert shown.getvalue().splitlines() == ["committed /runs/r/step_00000020 (6 files, 7164947 bytes)",
                                             "warning: skipping unreadable image /d/x.png: truncated"]
    text = path.read_text()
    assert text.count("Setting accelerator to CPU") == 2 and "(RayTrainWorker pid=12, ip=127.0.0.1) Traceback" in text
    assert "(MapBatches(decode) pid=13, ip=127.0.0.1) plain" in text
    assert "WARNING ray.data: Progress bars disabled" in text and "INFO e2e_dist.launcher: log file:" in text
    # after the block: logging as it was (the file handler gone, levels and propagation back)
    assert (list(logging.getLogger().handlers), logging.getLogger().level, logging.getLogger("ray.data").propagate) == before


def test_a_sweep_log_shows_only_warnings_of_workers(tmp_path):
    shown = io.StringIO()
    with console.RunLog(tmp_path / "s.log", console=shown, verbose=False, worker_level=logging.WARNING) as run_log:
        run_log.handle_worker_output({"pid": 1, "ip": "127.0.0.1", "actor_name": "t",
                                      "lines": ["[e2e-dist] INFO committed a", "[e2e-dist] ERROR trial failed: x"]})
    assert shown.getvalue() == "error: trial failed: x\n"


def test_raw_writes_to_fd_2_go_to_the_log_file_while_a_run_is_open(tmp_path):
    """Ray's C++ core worker writes its ERROR lines straight to fd 2 (seen: "Attempting to recover 1
    lost objects" when a node was lost): inside a run they belong in the log file, while our lines
    keep the console; after the run fd 2 is the console again (a fresh process: its own fd 2)."""
    log = tmp_path / "run.log"
    code = (
        "import logging, os, sys; from e2e_dist import console; console.setup_console(); "
        f"run = console.RunLog({str(log)!r}); run.__enter__(); "
        "os.write(2, b'[2026 E 1 2] core_worker.cc:609: lost objects\\n'); "
        "logging.getLogger('e2e_dist.x').warning('ours'); print('plain ours', file=sys.stderr); "
        "run.__exit__(None, None, None); os.write(2, b'after\\n')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines() == ["warning: ours", "plain ours", "after"]
    logged = log.read_text()
    assert "core_worker.cc:609: lost objects" in logged and "ours" in logged and "after" not in logged


def test_the_terminal_bar_knows_the_run_length_before_the_workers_report(ray_local):
    """Drawn on a terminal before any update arrived: 0/20 (the config's max_steps), not 0/None."""
    import io
    import time

    from rich.console import Console

    from e2e_dist.train.progress import ProgressDisplay

    out = io.StringIO()
    with ProgressDisplay("bar", interval_s=0.05, total=20, console=Console(file=out, force_terminal=True, width=120)):
        time.sleep(0.3)
    assert "0/20" in out.getvalue() and "None" not in out.getvalue(), out.getvalue()


def test_the_progress_actor_lives_on_the_drivers_node(ray_local, monkeypatch, capsys):
    """Hard affinity to the driver's node: Ray may put a 0-CPU actor on any node, and one on a node
    that is later lost took every later progress line with it (a node lost under a run:
    tests/cluster/test_separate_hosts.py). Plain lines: a step logged again by a group restarted
    from a checkpoint is shown again; the final update's repeat of the last step is not."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from e2e_dist.train import progress

    real, options = progress.ProgressActor, []

    class Recording:
        @staticmethod
        def options(**kw):
            options.append(kw)
            return real.options(**kw)

    monkeypatch.setattr(progress, "ProgressActor", Recording)
    with progress.ProgressDisplay("p", interval_s=0.05) as display:
        for step, done in ((5, False), (10, False), (10, False), (15, False), (15, True)):
            ray.get(display.actor.put.remote({"step": step, "total": 15, "metrics": {}, "done": done}))
    strategy = options[0]["scheduling_strategy"]
    assert isinstance(strategy, NodeAffinitySchedulingStrategy) and strategy.soft is False
    assert strategy.node_id == ray.get_runtime_context().get_node_id()
    shown = [ln.split()[2] for ln in capsys.readouterr().out.splitlines() if ln.startswith("[p] step ")]
    assert shown == ["5/15", "10/15", "10/15", "15/15"]


def test_submitting_a_job_does_not_narrate_its_upload():
    """Ray's job client logs 'Creating a file package ...' and 'Uploading package ...' at INFO through
    the "ray" logger's own console handler; after setup_console those records are not even made."""
    import logging

    import ray  # noqa: F401 - its import installs the "ray" logger's console handler

    from e2e_dist.console import setup_console

    ray_logger = logging.getLogger("ray")
    level = ray_logger.level
    ray_logger.setLevel(logging.INFO)  # as Ray configures it at import
    try:
        for name in ("ray._private.runtime_env.packaging", "ray.dashboard.modules.dashboard_sdk"):
            logging.getLogger(name).setLevel(logging.NOTSET)  # as Ray leaves them
        assert logging.getLogger("ray.dashboard.modules.dashboard_sdk").isEnabledFor(logging.INFO)
        setup_console(verbose=False)
        for name in ("ray._private.runtime_env.packaging", "ray.dashboard.modules.dashboard_sdk"):
            assert not logging.getLogger(name).isEnabledFor(logging.INFO), name
            assert logging.getLogger(name).isEnabledFor(logging.WARNING), name
    finally:
        ray_logger.setLevel(level)


def test_raylet_messages_go_to_the_log_file_not_the_console(ray_local, tmp_path, capfd):
    """What the driver's error thread prints (Ray's listen_error_messages: '(raylet) WARNING: 8 PYTHON
    worker processes have been started ...', a worker or node lost) goes to the run's log file; after
    the run, Ray prints them again."""
    import ray._private.worker as ray_worker

    original = ray_worker.print_to_stdstream
    shown = io.StringIO()
    message = {"lines": ["WARNING: 8 PYTHON worker processes have been started on node: x with address: "
                         "127.0.0.1. This could be a result of using a large number of actors."],
               "pid": "raylet", "is_err": False}
    with console.RunLog(tmp_path / "r.log", console=shown, verbose=False):
        ray_worker.print_to_stdstream(message, ignore_prefix=False)  # as listen_error_messages calls it
    assert shown.getvalue() == "" and "PYTHON worker processes" not in capfd.readouterr().err
    assert "(raylet pid=raylet" in (tmp_path / "r.log").read_text()
    assert ray_worker.print_to_stdstream is original
