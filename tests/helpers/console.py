"""The console's allow-list: every line e2e-dist itself prints, as patterns. A line that matches
none came from a library (Ray, DeepSpeed, torch, W&B, ...) and belongs in the run's log file."""

from __future__ import annotations

import re

OUR_LINES = [re.compile(p) for p in (
    r"\[[\w.-]+\] step \d+/\d+( \w+=[\d.,e+-]+)*",                      # plain progress (train/progress.py)
    r"log file: /\S+\.log",
    r"committed \S+ \(\d+ files, \d+ bytes\)",
    (r"resumed from the committed checkpoint of step \d+( on \d+ workers \(was \d+\))?; fetched [\d.,]+ MB on "
     r"this node, [\d.,]+ MB on \d+ node\(s\) \(checkpoint [\d.,]+ MB(, universal form [\d.,]+ MB)?\)"),
    r"fetched \d+ W&B file\(s\) of this run from \S+",
    r"trial \S+: stopped by the scheduler; its workers were released [\d.]+ s after the decision",
    r"(warning|error): .+",
    r"e2e-dist: (warning|error): .+",
    # the end-of-run summary (train/report.py)
    r"run {12}\S+ +\(\d+ s\)",
    r"steps {10}\d+ +world size \d+ +ZeRO \d +\w*",
    r"(train loss|val loss|bits per byte|val accuracy|val CER|val WER) +[\d.-]+",
    r"(tokens|samples)/s +[\d,-]+ +step [\d.-]+ s +[\d.-]+ TFLOP/s per worker( +MFU [\d.]+%)?",
    r"(tokens|samples) seen +[\d,-]+ +params [\d,-]+",
    r"checkpoint {5}\S+",
    r"W&B (run|files) +\S+",
    r" {15}upload it: .+",
    r"log file {7}/\S+\.log",
    r"data read {6}.+",
    r"start-up {7}first step at [\d.]+ s( \(.+ s\))?",
    r"restored {7}[\d.,]+ MB fetched by all nodes, [\d.,]+ MB by the busiest",
    r"data: .+",                                                         # what the data plan did (data/)
    # submit / jobs (cluster/jobs.py)
    r"submitted \S+: .+",
    r"  env vars forwarded \(values hidden\): .*",
    r"job \S+ (SUCCEEDED|FAILED|STOPPED).*",
    # sweeps (sweep/runner.py, sweep/table.py): header, one line per trial event, the final table
    r"sweep \S+: \d+ trial\(s\), results in \S+( \(resumed\))?",
    r"\[[\w.-]+\] [\w.-]+ .+",
    r" *sweep \S+: .*",                                                  # the table's title (centered)
    r" *\(sorted by \S+, (min|max)\)",                                  # ... wrapped
    r"[┏┃┡│└├╭╰━─┗┣┠╇╈┳┻┼╷╵].*",                                          # the table's rows and rules
    r"results: \S+",
    r"plot: \S+",
    r"summary: \S+, \S+",
    r"W&B: .+",
    r"\d+ trial\(s\) failed: .+",
    # Ray's job supervisor writes these two into every job's log before the entrypoint runs (not
    # the driver's output: nothing the job does can remove them)
    r"[\d-]+ [\d:,]+\tINFO job_manager.py:\d+ -- Runtime env is setting up.",
    r"Running entrypoint for job \S+: .+",
)]


def without_sample(text: str) -> list[str]:
    """The console's lines minus the generated text sample (between two dashed rules after `sample:`)."""
    out, inside = [], False
    for line in text.splitlines():
        if line == "sample:":
            inside = None  # the next rule opens it
            continue
        if line.startswith("-" * 20):
            inside = inside is None
            continue
        if not inside:
            out.append(line)
    return out


def foreign_lines(text: str) -> list[str]:
    """Lines that are not ours (empty lines are fine)."""
    return [ln for ln in without_sample(text) if ln.strip() and not any(p.fullmatch(ln) for p in OUR_LINES)]
