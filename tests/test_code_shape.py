"""The house rules for the package's shape (docs/architecture.md, the brief): no module over 400
lines, no function over 60. Read from the source, so a change that breaks one is named here."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "e2e_dist"


def test_modules_and_functions_stay_small():
    too_long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        rel = path.relative_to(PACKAGE.parent)
        if len(text.splitlines()) > 400:
            too_long.append(f"{rel}: {len(text.splitlines())} lines (module limit 400)")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > 60:
                    too_long.append(f"{rel}:{node.lineno} {node.name}: {lines} lines (function limit 60)")
    assert too_long == []
