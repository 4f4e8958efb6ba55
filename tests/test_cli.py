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
