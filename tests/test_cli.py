"""The CLI's verbs hand their work to the library: what they print comes from there."""

from __future__ import annotations

from e2e_dist import cli


def test_generate_prints_the_prompt_then_what_export_generates(monkeypatch, capsys):
    import e2e_dist.export as export

    calls = []

    def fake_generate(path, prompt, **kwargs):
        calls.append((path, prompt, kwargs))
        return "pass"

    monkeypatch.setattr(export, "generate_from_export", fake_generate)
    assert cli.main(["generate", "m.safetensors", "--prompt", "def f(): ", "--seed", "3"]) == 0
    assert capsys.readouterr().out == "def f(): pass\n"
    assert calls == [("m.safetensors", "def f(): ", {"max_new_bytes": 200, "temperature": 0.8, "top_k": 40,
                                                      "top_p": 1.0, "seed": 3})]


def test_generate_options_are_checked_and_their_defaults_shown(capsys):
    import pytest

    for args, what in [(["--temperature", "-1"], "--temperature: '-1' is not a number >= 0"),
                       (["--max-bytes", "0"], "--max-bytes: '0' is not a positive integer"),
                       (["--top-k", "x"], "--top-k: 'x' is not an integer >= 0"),
                       (["--top-p", "1.5"], "--top-p: '1.5' is not a number in (0, 1]")]:
        with pytest.raises(SystemExit) as e:
            cli.main(["generate", "m.safetensors", *args])
        err = capsys.readouterr().err
        assert e.value.code == 2 and what in err and "Traceback" not in err, err
    with pytest.raises(SystemExit):
        cli.main(["generate", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    for default in ("(default: 0.8)", "(default: 40)", "(default: 1.0)", "(default: 200)", "(default: def )"):
        assert default in shown, shown


def test_every_verb_group_is_registered():
    verbs = cli.build_parser()._subparsers._group_actions[0].choices
    for verb in ("train", "sweep", "plan", "scaling", "export", "generate", "predict", "checkpoints", "data", "presets"):
        assert verb in verbs


def test_usage_errors_are_one_line_naming_where_help_is(capsys):
    """argparse's own errors, for every verb: our one line (no usage block), exit 2."""
    import pytest

    for argv, what in [(["plan", "gpt-1.3b", "--gpus", "8", "--gpu-mem", "-5"], "argument --gpu-mem: '-5' is not GiB > 0"),
                       (["train"], "the following arguments are required: config"),
                       (["checkpoints"], "the following arguments are required: run_uri"),
                       (["nonsense"], "argument VERB: invalid choice: 'nonsense'")]:
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        err = capsys.readouterr().err.splitlines()
        assert e.value.code == 2 and len(err) == 1 and err[0].startswith("e2e-dist: error: " + what), err
        assert "--help`)" in err[0] and "usage:" not in err[0]


def test_checkpoints_of_a_run_that_is_not_there_is_an_error(tmp_path, capsys, s3_server, s3_bucket):
    for uri, extra in ((str(tmp_path / "nope"), []), (f"{s3_bucket}/runs/nope", ["--endpoint-url", s3_server.url])):
        assert cli.main(["checkpoints", uri, *extra]) == 2
        assert capsys.readouterr().err.splitlines() == [f"e2e-dist: error: no run at {uri} (no such directory or prefix)"]
    (tmp_path / "empty").mkdir()
    assert cli.main(["checkpoints", str(tmp_path / "empty")]) == 0
    assert capsys.readouterr().out.splitlines() == [f"no checkpoints under {tmp_path / 'empty'} (no step_NNNNNNNN/ folder)"]


def test_cluster_local_says_where_the_token_of_its_home_is(tmp_path):
    from e2e_dist.cluster.commands import token_hint

    line = token_hint(tmp_path / "h")
    assert f"$(cat {tmp_path / 'h' / '.ray' / 'auth_token'})" in line and "~" not in line
