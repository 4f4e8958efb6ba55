"""Data-source registry: `data.source` in the config -> builder of Ray Datasets.

A builder runs on the driver and returns a `DataBundle`: train and val as `SampleSet`s (data/samples.py:
indexable samples in blocks, read by Ray Data tasks in the model's input form, e.g. packed byte
windows), a `collate` that turns a numpy batch of rows into the model's tensor dict, and what the
subset contains (`stats`), so runs can report how much data they really used.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from e2e_dist.data.samples import SampleSet
from e2e_dist.registry import Registry

SOURCES: Registry = Registry("data.source", "e2e_dist.data_sources", ["e2e_dist.data.text", "e2e_dist.data.images", "e2e_dist.data.image_records",
                                             "e2e_dist.data.glyphs", "e2e_dist.data.speech"])


@dataclass(kw_only=True)
class DataBundle:
    train: SampleSet
    """The training split (each rank reads only the samples of its micro-batches: train/batches.py)."""
    val: SampleSet
    """The validation split (evaluation reads a fixed selection of it: train/evaluate.py)."""
    collate: Callable[[dict], dict]
    """numpy batch dict (rows of a reader, `valid` ones only) -> dict of torch tensors."""
    stats: dict[str, float] = field(default_factory=dict)
    """What the training subset holds: train_rows, val_rows, train_bytes / train_tokens / ..."""


register_source = SOURCES.register


def check_data(data_cfg, storage_cfg=None) -> None:
    """What can be checked on the driver before Ray starts (seconds) or anything is written: the
    source exists, and a source that reads `data.paths` finds files there (its builder's
    `check_paths`, which raises a one-line DataError naming the path)."""
    check = getattr(SOURCES.get(data_cfg.source), "check_paths", None)
    if check is not None:
        check(data_cfg, storage_cfg)


def build_data(data_cfg, model_cfg=None, storage_cfg=None) -> DataBundle:
    """Build the train/val datasets for `data_cfg` (config.DataConfig)."""
    return SOURCES.get(data_cfg.source)(data_cfg, model_cfg=model_cfg, storage_cfg=storage_cfg)
