"""benchmarks/gpu_mfu.py on CPU with the tiny shape: the table, every row measured for real.

The script runs in this process (sharing the session's Ray instance) exactly as its command line
would: plain eager and torch.compile loops, raw DeepSpeed ZeRO-1/2/3 engines on a private one-rank
gloo group, then our path through Ray Train for ZeRO-2 (its ZeRO-3 row is the same code with
another stage, and costs the suite a whole Ray Train run: `--rows` leaves it out here, and the
checks that need it print nothing). No timing is asserted (2 shared cores): only that every row
ran and produced a positive throughput.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import threading

import pytest
import torch

from tests.conftest import ROOT

EXPECTED = ["plain eager", "plain torch.compile", "raw DeepSpeed ZeRO-1", "raw DeepSpeed ZeRO-2",
            "raw DeepSpeed ZeRO-3", "e2e-dist Ray Train ZeRO-2"]


def load_script():
    spec = importlib.util.spec_from_file_location("bench_gpu_mfu", ROOT / "benchmarks" / "gpu_mfu.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_tiny_table_has_every_row(ray_local, tmp_path, capsys, monkeypatch):
    bench = load_script()
    threads = torch.get_num_threads()
    out = tmp_path / "table.json"
    # --nice 0: leave this test process's scheduling priority alone
    rc = bench.main(["--shape", "tiny", "--steps", "4", "--window", "2", "--warmup", "1", "--nice", "0",
                     "--rows", "eager,compile,ds1,ds2,ds3,ours2",
                     "--storage", str(tmp_path / "runs"), "--json", str(out)])
    printed = capsys.readouterr().out
    res = json.loads(out.read_text())

    assert rc == 0, [r["error"] for r in res["rows"] if r["error"]]
    assert [r["name"] for r in res["rows"]] == EXPECTED
    for r in res["rows"]:
        assert r["error"] is None
        assert r["tokens_per_s"] > 0 and r["achieved_gflops"] > 0 and r["ratio_to_compile"] > 0, r
        assert f"| {r['name']} | {r['tokens_per_s']:,.0f} |" in printed  # the printed table holds it too
    assert res["flops_per_step"] > 0 and res["tokens_per_step"] == 4 * 64
    assert not res["compile_ours"]  # CPU default: our rows uncompiled, so no "+ compile" raw rows
    ratios = {c["what"].split(" (")[0]: c["ratio"] for c in res["checks"]}
    assert all(r > 0 for w, r in ratios.items() if "ZeRO-2" in w), ratios
    assert all(r is None for w, r in ratios.items() if "ZeRO-3" in w), ratios  # that row did not run
    assert "ours ZeRO-2 tokens/s vs plain torch.compile" in printed and "ours ZeRO-3" not in printed
    # Our row trained through Ray Train and committed its final checkpoint in the given storage.
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert len(runs) == 1 and all((tmp_path / "runs" / r / "step_00000008" / "manifest.json").is_file() for r in runs)
    assert torch.get_num_threads() == threads  # the script restored this process's thread count
    # ... and left no stale process-group state behind: a DeepSpeed engine still builds and steps here
    from e2e_dist.config import RunConfig
    from tests.models import make_engine

    engine, model = make_engine(RunConfig.model_validate({"model": {"kind": "gpt", "n_layer": 1, "d_model": 16,
                                                                    "max_seq_len": 16}, "data": {"seq_len": 8},
                                                          "trainer": {"micro_batch_size": 2}}), monkeypatch)
    loss = engine(model.example_batch(2))
    engine.backward(loss)
    engine.step()
    engine.destroy()


@pytest.mark.parametrize("argv, message", [
    (["--rows", "eager,warp-drive"], "--rows: unknown warp-drive"),
    (["--steps", "5", "--window", "2"], "--window 2 must divide --steps 5"),
])
def test_bad_arguments_are_one_line_errors(capsys, argv, message):
    bench = load_script()
    with pytest.raises(SystemExit) as e:
        bench.parse_args(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_niceness_applies_to_the_calling_thread_only_and_is_restored():
    bench = load_script()
    seen: dict[str, int] = {}

    def body() -> None:  # a thread of its own: Linux niceness is per thread
        seen["before"] = os.getpriority(os.PRIO_PROCESS, 0)
        with bench.niceness(3):
            seen["inside"] = os.getpriority(os.PRIO_PROCESS, 0)
        seen["after"] = os.getpriority(os.PRIO_PROCESS, 0)

    main_before = os.getpriority(os.PRIO_PROCESS, 0)
    t = threading.Thread(target=body)
    t.start()
    t.join()
    assert seen["inside"] == min(seen["before"] + 3, 19)
    assert os.getpriority(os.PRIO_PROCESS, 0) == main_before
    if os.geteuid() == 0:  # lowering niceness back needs root
        assert seen["after"] == seen["before"]
