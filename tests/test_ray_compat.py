"""The Ray internals e2e-dist relies on (e2e_dist/ray_compat.py) are where we expect them.

These fail loudly on a Ray upgrade that moved one, instead of a silently lost guarantee.
"""

from __future__ import annotations

import ast
import logging
from pathlib import Path

import pytest

from e2e_dist import ray_compat

PACKAGE = Path(ray_compat.__file__).parent


def test_every_internal_resolves():
    checked = ray_compat.check_all()
    assert len(checked) == 16
    assert ray_compat.function_trainable_class(lambda config: None).__name__
    assert hasattr(ray_compat.train_context_callback_base(), "on_report")
    assert hasattr(ray_compat.train_controller_callback_base(), "before_controller_execute_failure_decision")
    prepare, validate = ray_compat.autoscaler_config_checks()
    assert callable(prepare) and callable(validate)


def test_a_moved_internal_is_a_loud_error_that_says_what_it_was_for():
    with pytest.raises(ray_compat.RayCompatError, match=r"ray\.train\.nowhere\.thing .*to do the thing.*ray 2\.60"):
        ray_compat._internal("ray.train.nowhere", "thing", "do the thing")


def test_attempt_id_outside_ray_train_is_none():
    assert ray_compat.train_attempt_id() is None


def test_lost_commit_fencing_is_a_warning_not_silence(monkeypatch, caplog):
    from e2e_dist.checkpoint import commit

    def moved():
        raise ray_compat.RayCompatError("Ray Train's worker context changed shape")

    monkeypatch.setattr(ray_compat, "train_attempt_id", moved)
    monkeypatch.setattr(commit, "_FENCING_WARNED", [])
    with caplog.at_level(logging.WARNING, logger=commit.__name__):
        assert commit._ray_attempt_id() is None
    assert "NOT fenced" in caplog.text and "changed shape" in caplog.text


def test_nothing_else_imports_ray_internals():
    """The compat module is the one door: no `ray.*._internal` / `ray.*._private` import and no
    `_`-prefixed attribute read on a Ray object anywhere else in the package."""
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "ray_compat.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                root = node.value
                while isinstance(root, ast.Attribute):
                    root = root.value
                if isinstance(root, ast.Name) and root.id == "ray":
                    names = [f"ray...{node.attr}"]
            for name in names:
                if name.startswith("ray") and any(part.startswith("_") for part in name.split(".")[1:]):
                    offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {name}")
    assert offenders == []
