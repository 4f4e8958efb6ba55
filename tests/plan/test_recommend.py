"""`e2e-dist plan` on the presets people train, and the refusal `train` makes on a GPU."""

import pytest

from e2e_dist.cli import main
from e2e_dist.config import load_run_config
from e2e_dist.errors import ConfigError
from e2e_dist.plan.memory import GiB
from e2e_dist.plan.recommend import TIE, refuse_if_too_big
from e2e_dist.plan.report import configured_option, hardware, plan_for

GPT_PRESETS = {"gpt-125m": 128e6, "gpt-350m": 354e6, "gpt-1.3b": 1.31e9}


@pytest.mark.parametrize("preset", [*GPT_PRESETS, "resnet-25m"])
@pytest.mark.parametrize("gpus", [1, 8])
def test_every_preset_has_a_setting_that_fits_80gib(preset, gpus):
    cfg = load_run_config(preset, [])
    plan = plan_for(cfg, hardware(gpu="H100", gpus_per_node=gpus, gpu_mem_gib=80))
    best = plan.best
    assert best is not None and best.gpu_bytes <= best.usable_bytes < 80 * GiB
    assert best.grad_accum * best.micro_batch * gpus == plan.global_batch
    if preset in GPT_PRESETS:
        assert plan.shape.n_params == pytest.approx(GPT_PRESETS[preset], rel=0.01)
    # The recommendation is the fastest fitting option (to within the TIE the estimates cannot resolve),
    # and 8 GPUs are faster than one.
    assert all(best.step_s <= o.step_s * (1 + TIE) + 1e-12 for o in plan.options if o.fits)
    if gpus == 8:
        one = plan_for(cfg, hardware(gpu="H100", gpus_per_node=1, gpu_mem_gib=80)).best
        assert best.units_s > 4 * one.units_s


def test_sharding_lowers_per_gpu_states_of_the_largest_preset():
    cfg = load_run_config("gpt-1.3b", [])
    one = plan_for(cfg, hardware(gpus_per_node=1, gpu_mem_gib=80))
    eight = plan_for(cfg, hardware(gpus_per_node=8, gpu_mem_gib=80))

    def states(plan, stage):
        return next(o.states for o in plan.options if o.layout.zero_stage == stage and not o.layout.offload_optimizer)

    assert states(eight, 0).gpu == states(one, 0).gpu
    assert states(eight, 2).optimizer * 8 == pytest.approx(states(one, 2).optimizer, rel=1e-6)
    assert states(eight, 3).gpu < states(eight, 2).gpu < states(eight, 1).gpu


def test_a_setting_that_cannot_fit_is_refused_with_the_fix():
    cfg = load_run_config("gpt-1.3b", ["deepspeed.zero_stage=0", "trainer.micro_batch_size=32", "trainer.num_workers=8"])
    plan = plan_for(cfg, hardware(gpu="A100", gpus_per_node=8, gpu_mem_gib=40))
    with pytest.raises(ConfigError) as e:
        refuse_if_too_big(plan, configured_option(plan, cfg), "gpt-1.3b")
    msg = str(e.value)
    assert "\n" not in msg and "ZeRO-0 with trainer.micro_batch_size=32 needs" in msg
    assert "--set deepspeed.zero_stage=" in msg and "e2e-dist plan gpt-1.3b" in msg
    refuse_if_too_big(plan, plan.best, "gpt-1.3b")  # the recommendation itself passes


def test_plan_cli(capsys):
    assert main(["plan", "gpt-1.3b", "--gpus", "8", "--gpu", "A100-SXM4-40GB"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("plan: gpt-1.3b: 1313.6M parameters") and "on 1 node(s) x 8 GPU(s) = 8, 40 GiB each" in out
    rows = [line for line in out.splitlines() if line.lstrip("* ").startswith("ZeRO-")]
    assert len(rows) == 14 and sum(r.startswith("*") for r in rows) == 1  # 7 layouts x checkpointing off/on
    assert "recommended: ZeRO-2" in out
    assert "DeepSpeed's accounting (its own estimators" in out


def test_plan_cli_bad_input(capsys):
    with pytest.raises(SystemExit) as e:
        main(["plan", "gpt-125m", "--gpus", "0"])
    assert e.value.code == 2 and "--gpus: '0' is not a GPU count >= 1" in capsys.readouterr().err
    assert main(["plan", "gpt-125m", "--gpu", "Voodoo2"]) == 2
    assert "--gpu 'Voodoo2': unknown card" in capsys.readouterr().err
    assert main(["plan", "gpt-125m", "--gpus", "3"]) == 2
    assert "global_batch_size=256 does not split over 3 GPUs" in capsys.readouterr().err


def test_train_start_check_reads_the_card_and_refuses(monkeypatch):
    """check_fits_on_gpu (called by train/build.py on GPU workers) with the card faked: a 24 GiB A10G."""
    import torch

    from e2e_dist.plan.report import check_fits_on_gpu

    class Props:
        name, total_memory = "NVIDIA A10G", 24 * GiB

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Props())
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: Props.name)
    check_fits_on_gpu(load_run_config("gpt-125m", []), world=1, device=torch.device("cuda", 0))  # the preset fits
    too_big = load_run_config("gpt-350m", ["trainer.micro_batch_size=64"])
    with pytest.raises(ConfigError, match=r"ZeRO-2 with trainer.micro_batch_size=64 needs ~\d+\.\d GiB per GPU .* "
                                          r"of the 24 GiB card is usable: try --set trainer.micro_batch_size="):
        check_fits_on_gpu(too_big, world=1, device=torch.device("cuda", 0))


def test_the_recommendation_follows_the_wire(capsys):
    """gpt-1.3b on 8 x A100 40 GB nodes: one node keeps ZeRO-2; across two nodes ZeRO-2's gradient
    all-reduce on every micro-step costs more than ZeRO-1's one per step over EFA, and over TCP the
    single all-reduce of ZeRO-0 wins (plan/comm.py; BENCHMARKS.md section 14)."""
    cfg = load_run_config("gpt-1.3b", [])
    best = {ic: plan_for(cfg, hardware(gpu="A100-SXM4-40GB", gpus_per_node=8, nodes=2, interconnect=ic)).best
            for ic in ("efa", "tcp")}
    one = plan_for(cfg, hardware(gpu="A100-SXM4-40GB", gpus_per_node=8)).best
    assert (one.layout.zero_stage, best["efa"].layout.zero_stage, best["tcp"].layout.zero_stage) == (2, 1, 0)
    assert best["tcp"].time.inter > 3 * best["efa"].time.inter and one.time.inter == 0
    assert main(["plan", "gpt-1.3b", "--gpu", "A100-SXM4-40GB", "--gpus", "8", "--nodes", "2", "--interconnect", "tcp"]) == 0
    out = capsys.readouterr().out
    assert "across nodes tcp 5 GB/s per node" in out and "recommended: ZeRO-0" in out and "collectives 0.55" in out
    with pytest.raises(SystemExit):
        main(["plan", "gpt-1.3b", "--interconnect", "carrier-pigeon"])
    assert "--interconnect: invalid choice: 'carrier-pigeon'" in capsys.readouterr().err
