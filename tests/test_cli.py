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
    assert calls == [("m.safetensors", "def f(): ", {"max_new_bytes": 200, "temperature": 0.8, "seed": 3})]


def test_every_verb_group_is_registered():
    verbs = cli.build_parser()._subparsers._group_actions[0].choices
    for verb in ("train", "sweep", "scaling", "export", "generate", "predict", "checkpoints", "data", "presets"):
        assert verb in verbs
