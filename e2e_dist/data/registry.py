"""Data-source registry: `data.source` in the config -> builder of Ray Datasets.

A builder runs on the driver and returns a `DataBundle`: lazily-read Ray Datasets for train and
val (rows already in the model's input form, e.g. packed byte windows), a `collate` that turns a
numpy batch from `iter_batches` into the model's tensor dict, and what the subset contains
(`stats`), so runs can report how much data they really used.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from e2e_dist.registry import Registry

SOURCES: Registry = Registry("data.source", ["e2e_dist.data.text", "e2e_dist.data.images", "e2e_dist.data.image_records",
                                             "e2e_dist.data.glyphs", "e2e_dist.data.speech"])


@dataclass(kw_only=True)
class DataBundle:
    train: Any
    """ray.data.Dataset of training rows (deterministic order for a given seed)."""
    val: Any
    """ray.data.Dataset of validation rows."""
    collate: Callable[[dict], dict]
    """numpy batch dict (from `iter_batches(batch_format='numpy')`) -> dict of torch tensors."""
    stats: dict[str, float] = field(default_factory=dict)
    """What the training subset holds: train_rows, val_rows, train_bytes / train_tokens / ..."""
    train_decoded_bytes: int | None = None
    """Estimated size of the decoded train set in memory (rows in the model's input form); the
    launcher keeps a train set up to `data.cache_mb` in Ray's object store. None: unknown (streamed)."""


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
