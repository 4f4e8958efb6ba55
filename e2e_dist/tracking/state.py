"""Our own per-run state file next to W&B's (`<wandb dir>/e2e-dist-tracking-<run_id>.json`): sessions,
restarts, the last step handed to W&B, the re-done rows."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

STATE_PREFIX = "e2e-dist-tracking-"  # + <run_id>.json in the W&B dir


def read_state(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:  # torn by a crash: W&B's own files still say what it holds
        log.warning("ignoring unreadable W&B state file %s (%s)", path, e)
        return {}


def write_state(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, path)  # atomic: a crash leaves the old or the new state, never half of one
