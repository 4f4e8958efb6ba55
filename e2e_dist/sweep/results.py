"""The results table a sweep writes, read back for scaling fits.

File: `<storage>/<sweep name>/results.jsonl`
One JSON object per line, one line per finished trial (the Tuner appends them):

    {"trial": "scaling-grid-t003-1a2b3c",          # the trial's run name
     "status": "completed",                        # completed | stopped (scheduler) | error
     "params": {"model.d_model": 64, ...},         # the swept values (flat dotted keys)
     "metrics": {"val_loss": 1.93,                 # final value of the target metric
                 "n_params_non_embedding": 98944,  # N
                 "tokens_seen": 505856,            # D: training tokens consumed (text) ...
                 "samples_seen": 3952,             # ... or samples (vision, speech)
                 "train_tokens": 4000000,          # optional: tokens in the training subset
                 "train_samples": 31250,           # optional: samples in the training subset
                 "val_loss_best_step": 900,        # optional: when the best evaluation was seen
                 "stop_reason": "val_loss_plateau",  # optional: early-stopped (or "max_steps")
                 "step": 1040}}                    # optional: the trial's last step

Extra keys are allowed and ignored. Only `completed` trials enter the fit (a trial stopped early
by ASHA reports a loss of an unfinished schedule).
"""

from __future__ import annotations

from typing import Any, get_origin

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from e2e_dist import storage
from e2e_dist.config import redact
from e2e_dist.sweep.scaling import ScalingError

RESULTS_FILE = "results.jsonl"
SPEC_FILE = "sweep.json"
"""The sweep's spec and base run config, written next to its results when it starts."""
STATUSES = ("completed", "stopped", "error")
D_KEYS = ("tokens_seen", "samples_seen", "train_tokens", "train_samples")


def _read_text(uri: str, storage_cfg: Any = None) -> str:
    if not storage.exists(uri, storage_cfg):
        raise ScalingError(f"results not found: {redact(uri)} (has the sweep finished a trial?)")
    return storage.read_text(uri, storage_cfg)


def results_file(results_uri: str) -> str:
    """`<sweep dir>/results.jsonl` for a sweep folder; a `.jsonl` URI is taken as it is."""
    return results_uri if results_uri.endswith(".jsonl") else storage.join(results_uri, RESULTS_FILE)


class ResultRow(BaseModel):
    """One line of results.jsonl (the schema in this module's docstring); extra keys are kept."""

    # strict: a row whose status is not a string or whose params are not an object was not written by
    # a sweep, and converting it would hide that.
    model_config = ConfigDict(strict=True, extra="allow")

    trial: str
    status: str
    params: dict[str, Any]
    metrics: dict[str, Any]

    @model_validator(mode="after")
    def _known_status(self) -> ResultRow:
        # After the type checks, so a row missing fields reports those first.
        if self.status not in STATUSES:
            raise ValueError(f"status {self.status!r} is not one of {', '.join(STATUSES)}")
        return self


def _row_problem(err: ValidationError) -> str:
    """The first problem of a bad row, as one line that names the field."""
    first = err.errors(include_url=False)[0]
    loc, kind = first["loc"], first["type"]
    if kind == "json_invalid":
        return f"not valid JSON ({first['ctx']['error']})"
    if kind == "value_error":
        return str(first["ctx"]["error"])  # _known_status words its own message
    if not loc:
        return f"expected an object, got {type(first['input']).__name__}"
    wanted = ResultRow.model_fields[str(loc[0])].annotation
    return f"{loc[0]} missing or not a {(get_origin(wanted) or wanted).__name__}"


def load_results(results_uri: str, storage_cfg: Any = None) -> list[dict[str, Any]]:
    """Read a sweep's results table (a sweep folder or its results.jsonl; local or s3://), checked
    against the schema in this module's docstring; a bad line is one ScalingError naming it."""
    uri = results_file(results_uri)
    rows: list[dict[str, Any]] = []
    for i, line in enumerate(_read_text(uri, storage_cfg).splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(ResultRow.model_validate_json(line).model_dump())
        except ValidationError as e:
            raise ScalingError(f"{redact(uri)} line {i}: {_row_problem(e)}") from None
    return rows


def fit_points(rows: list[dict[str, Any]], metric: str = "val_loss", d_key: str = "auto"):
    """(trial names, N, D, loss, d_key used) of the completed trials. `d_key` auto takes the training
    subset's size (train_tokens, train_samples) when it varies: that is a data ablation, whose trials
    may also stop at different steps (early stopping) and so vary tokens_seen; otherwise the first of
    D_KEYS that every trial reports and that varies; if none varies, the first reported."""
    done = [r for r in rows if r["status"] == "completed"]
    if not done:
        raise ScalingError(f"no completed trials among {len(rows)} in the results")
    keys = [k for k in D_KEYS if all(k in r["metrics"] for r in done)] if d_key == "auto" else [d_key]
    if not keys:
        raise ScalingError(f"trials report none of {', '.join(D_KEYS)} in metrics: no data size D")
    varying = [k for k in keys if len({r["metrics"].get(k) for r in done}) > 1]
    subset = [k for k in varying if k in ("train_tokens", "train_samples")]
    d_key = (subset or varying or keys)[0]
    cols = []
    for key in ("n_params_non_embedding", d_key, metric):
        col = []
        for r in done:
            v = r["metrics"].get(key)
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                raise ScalingError(f"trial {r['trial']}: metrics.{key} missing or not a number (got {v!r})")
            col.append(float(v))
        cols.append(np.array(col))
    return [r["trial"] for r in done], cols[0], cols[1], cols[2], d_key


LATE_BEST_FRACTION = 0.8
"""A trial whose best evaluation came after this fraction of its steps was still learning when it
ended: early stopping had nothing to stop, and its loss is what its steps allowed."""


def still_learning(rows: list[dict[str, Any]], names: list[str]) -> dict[str, str]:
    """Trial name -> why, for the named trials whose best val loss came in the last fifth of their
    steps (rows without `val_loss_best_step` and `step` are not judged)."""
    by_name = {r["trial"]: r["metrics"] for r in rows}
    out = {}
    for name in names:
        m = by_name[name]
        if m.get("stop_reason") == "val_loss_plateau":
            continue  # early-stopped: its val loss had stopped improving, whenever its best came
        best, last = m.get("val_loss_best_step"), m.get("step")
        if isinstance(best, int) and isinstance(last, int) and last > 0 and best > LATE_BEST_FRACTION * last:
            out[name] = f"best evaluation at step {best} of {last}"
    return out
