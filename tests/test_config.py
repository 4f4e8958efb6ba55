"""Config loading: every kind of bad input is one line naming the field/file; presets, includes, --set."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from e2e_dist.config import RunConfig, absolute_path, load_run_config, preset_names, redact, set_dotted
from e2e_dist.errors import ConfigError


def test_presets_load():
    assert "tiny-text" in preset_names()
    cfg = load_run_config("tiny-text")
    assert cfg.model.kind == "gpt" and cfg.deepspeed.zero_stage == 2


def test_overrides_are_typed():
    cfg = load_run_config("tiny-text", ["trainer.max_steps=7", "trainer.lr=3e-4", "deepspeed.zero_stage=3",
                                        "data.paths=[a.txt, b.txt]", "trainer.use_gpu=false"])
    assert cfg.trainer.max_steps == 7 and cfg.trainer.lr == 3e-4 and cfg.deepspeed.zero_stage == 3
    assert cfg.data.paths == ["a.txt", "b.txt"] and cfg.trainer.use_gpu is False


def test_include_and_override_order(tmp_path):
    (tmp_path / "base.yaml").write_text("include: tiny-text\ntrainer: {max_steps: 11, lr: 0.01}\n")
    (tmp_path / "run.yaml").write_text("include: [base.yaml]\nname: child\ntrainer: {max_steps: 12}\n")
    cfg = load_run_config(str(tmp_path / "run.yaml"))
    assert (cfg.name, cfg.trainer.max_steps, cfg.trainer.lr) == ("child", 12, 0.01)
    assert cfg.model.d_model == 128  # from the preset at the bottom


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["trainer.max_step=5"], "tiny-text: trainer.max_step: unknown field"),
        (["trainer.lr=abc"], "tiny-text: trainer.lr: Input should be a valid number"),
        (["trainer.max_steps=0"], "tiny-text: trainer.max_steps: Input should be greater than or equal to 1"),
        (["model.kind=transformer"], "tiny-text: model.kind: unknown kind 'transformer' (known: ctc-speech, gpt, resnet; or a module:attr import path)"),
        (["model.n_head=3"], "tiny-text: model: n_head=3 does not divide d_model=128"),
        (["deepspeed.zero_stage=4"], "tiny-text: deepspeed.zero_stage: Input should be less than or equal to 3"),
        (["deepspeed.offload_params=true"], "tiny-text: deepspeed: offload_params needs zero_stage=3"),
        (["storage.path=gs://bucket/x"], "tiny-text: storage.path: unsupported scheme in 'gs://bucket/x'"),
        (["name=has space"], "tiny-text: name: 'has space' must be letters"),
        (["data.seq_len=256"], "tiny-text: model.max_seq_len=128 < data.seq_len=256"),
        (["trainer"], "--set 'trainer': expected key.sub=value"),
        (["trainer.max_steps.x=1"], "--set 'trainer.max_steps.x=1': max_steps is not a section"),
        (["trainer.precision=fp8"], "tiny-text: trainer.precision: Input should be"),
        (["trainer.eval_batches=4"], "tiny-text: trainer: eval_batches is now eval_samples"),
        (["data.shuffle_buffer_batches=8"], "tiny-text: data: shuffle_buffer_batches is gone"),
        (["data.shuffle_blocks=0"], "tiny-text: data.shuffle_blocks: Input should be greater than or equal to 1"),
    ],
)
def test_bad_input_is_one_line(overrides, expected):
    with pytest.raises(ConfigError) as info:
        load_run_config("tiny-text", overrides)
    msg = str(info.value)
    assert "\n" not in msg
    assert expected in msg, msg


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match=r"config file not found: nope\.yaml"):
        load_run_config("nope.yaml")
    with pytest.raises(ConfigError, match=r"presets: .*tiny-text"):
        load_run_config("tiny-txt")
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: line \d+ is not valid YAML"):
        load_run_config(str(bad))
    cyc = tmp_path / "cyc.yaml"
    cyc.write_text("include: cyc.yaml\n")
    with pytest.raises(ConfigError, match="include cycle"):
        load_run_config(str(cyc))
    # a missing include names the file that includes it, and where it looked
    (tmp_path / "run.yaml").write_text("include: [tiny-text, base.yaml]\n")
    with pytest.raises(ConfigError) as e:
        load_run_config(str(tmp_path / "run.yaml"))
    assert str(e.value) == f"{tmp_path / 'run.yaml'}: include: file not found: base.yaml (looked for {tmp_path / 'base.yaml'})"


def test_secrets_redacted():
    cfg = RunConfig(storage={"path": "s3://bucket/runs", "endpoint_url": "http://user:pw@127.0.0.1:9000"},
                    deepspeed={"overrides": {"aws_secret_access_key": "SECRETVALUE"}})
    public = cfg.to_public_dict()
    text = repr(public)
    assert "SECRETVALUE" not in text and ":pw@" not in text
    assert redact({"WANDB_API_KEY": "k", "nested": [{"token": "t"}]}) == {"WANDB_API_KEY": "***", "nested": [{"token": "***"}]}


def test_cli_exit_code_2_and_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "e2e_dist.cli", "train", "tiny-text", "--set", "trainer.bogus=1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "e2e-dist: error: tiny-text: trainer.bogus: unknown field"


def test_cli_help_lists_every_verb():
    proc = subprocess.run([sys.executable, "-m", "e2e_dist.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    for verb in ("train", "sweep", "scaling", "export", "generate", "predict", "checkpoints", "cluster", "submit", "jobs"):
        assert f"  {verb}" in proc.stdout


def test_local_storage_path_is_absolute_from_where_the_config_is_loaded(tmp_path, monkeypatch):
    # Ray Train runs workers in a directory of its own: a relative path there is another place.
    monkeypatch.chdir(tmp_path)
    assert RunConfig.model_validate({}).storage.path == str(tmp_path / "runs")
    assert RunConfig.model_validate({"storage": {"path": "file://out/x"}}).storage.path == str(tmp_path / "out" / "x")
    assert RunConfig.model_validate({"storage": {"path": "s3://bucket/p"}}).storage.path == "s3://bucket/p"
    assert absolute_path("~/x") == os.path.expanduser("~/x") and absolute_path("file://a") == str(tmp_path / "a")


def test_set_dotted_copies_and_merges_only_when_asked():
    data = {"model": {"n_layer": 2, "d_model": 64}, "trainer": None}
    assert set_dotted(data, "model", {"n_layer": 4}) == {"model": {"n_layer": 4}, "trainer": None}
    merged = set_dotted(data, "model", {"n_layer": 4}, merge=True)
    assert merged["model"] == {"n_layer": 4, "d_model": 64}
    assert set_dotted(data, "trainer.max_steps", 3)["trainer"] == {"max_steps": 3}  # null: a new section
    assert data == {"model": {"n_layer": 2, "d_model": 64}, "trainer": None}  # the input is left as it was
    with pytest.raises(ValueError, match="n_layer is not a section"):
        set_dotted(data, "model.n_layer.x", 1)


def test_global_batch_fixes_the_optimization_across_world_sizes():
    cfg = load_run_config("tiny-text", ["trainer.num_workers=[1, 4]", "trainer.micro_batch_size=2",
                                        "trainer.global_batch_size=8"])
    assert cfg.trainer.elastic and cfg.trainer.worker_range == (1, 4)
    assert [cfg.trainer.grad_accum_at(w) for w in (1, 2, 4)] == [4, 2, 1]
    with pytest.raises(ConfigError, match=r"trainer.global_batch_size=8 cannot be split over 3 workers"):
        cfg.trainer.grad_accum_at(3)
    fixed = load_run_config("tiny-text", ["trainer.grad_accum=3"])
    assert not fixed.trainer.elastic and fixed.trainer.grad_accum_at(5) == 3


@pytest.mark.parametrize("overrides, expected", [
    (["trainer.num_workers=[3, 4]", "trainer.micro_batch_size=2", "trainer.global_batch_size=10"],
     "trainer: global_batch_size=10 is not micro_batch_size=2 x a whole number of micro-batches for any world size in [3, 4]"),
    (["trainer.global_batch_size=16", "trainer.grad_accum=2"], "trainer: set global_batch_size or grad_accum, not both"),
    (["trainer.num_workers=[4, 2]"], "trainer.num_workers: need 1 <= min <= max workers, got (4, 2)"),
    (["trainer.num_workers=[0, 2]"], "trainer.num_workers: need 1 <= min <= max workers, got (0, 2)"),
])
def test_bad_worker_range_or_global_batch_is_one_line(overrides, expected):
    with pytest.raises(ConfigError) as e:
        load_run_config("tiny-text", overrides)
    assert expected in str(e.value) and "\n" not in str(e.value)
