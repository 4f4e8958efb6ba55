"""`data.source: image-table`: images listed in a CSV file, one row per image: its path and label.

    path,label
    digits/3/digit-0003.png,3

Paths relative to the table's folder, or absolute (local files). Labels are integers (class
indices), or names (sorted, then numbered: `cat, dog` -> 0, 1). The split and subset follow
e2e-dist's own sources: an image's fate depends on its path as written in the table and
`data.seed` only (hash split by `data.val_fraction`, seeded prefix for `data.max_files`, nested
`data.fraction`), so the same table gives the same samples in the same order on every call.
Decoding is e2e-dist's image decode (`decode_images`: resized to `data.image_size`, normalized
to [-1, 1]), the same that `e2e-dist predict` applies to a file.
"""

from __future__ import annotations

import csv
import logging
import os
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator

from e2e_dist import plugins
from e2e_dist.config import absolute_path
from e2e_dist.data.common import DataError, seeded_order, split_by_hash, take_fraction
from e2e_dist.data.images import ROWS_PER_BLOCK, collate, decode_images
from e2e_dist.data.registry import DataBundle
from e2e_dist.data.samples import row_samples
from e2e_dist.errors import ConfigError

log = logging.getLogger("vit_plugin.data")


class TableOptions(BaseModel):
    """`data.options` of an `image-table` source."""

    model_config = {"extra": "forbid"}

    table: str = Field(min_length=1)
    """The CSV file (local). Relative: to the directory the run starts from (made absolute when
    the config loads, as Ray runs workers elsewhere)."""
    path_column: str = "path"
    """Column of image paths (relative to the table's folder, or absolute)."""
    label_column: str = "label"
    """Column of labels: integer classes, or class names."""
    channels: Literal[1, 3] | None = None
    """1: grayscale, 3: RGB. None: the model's `in_channels` (model.options.in_channels), else 3."""

    @field_validator("table")
    @classmethod
    def _absolute(cls, v: str) -> str:
        return absolute_path(v)


def check_table(data_cfg: Any, storage_cfg: Any = None) -> None:
    """Before Ray starts (e2e-dist calls `check_paths`): the table is there, or one line naming it."""
    table = data_cfg.options.table
    if not os.path.isfile(table):
        raise DataError(f"data.options.table: no such file: {table}")


def read_table(opts: TableOptions) -> list[tuple[str, str]]:
    """(path as written, label as written) per row, in file order; DataError naming what is wrong."""
    with open(opts.table, newline="", encoding="utf-8-sig") as f:  # -sig: a spreadsheet's byte-order mark
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        for column in (opts.path_column, opts.label_column):
            if column not in columns:
                raise DataError(f"data.options: {opts.table} has no column {column!r} (columns: {', '.join(columns)})")
        rows = [((r[opts.path_column] or "").strip(), (r[opts.label_column] or "").strip()) for r in reader]
    empty = next((i for i, (p, y) in enumerate(rows) if not p or not y), None)
    if empty is not None:
        raise DataError(f"data.options.table: {opts.table} line {empty + 2}: empty path or label")
    return rows


def label_indices(labels: list[str]) -> dict[str, int]:
    """Integer labels stay themselves; names are numbered in sorted order."""
    if all(y.isdigit() for y in labels):
        return {y: int(y) for y in labels}
    return {name: i for i, name in enumerate(sorted(set(labels)))}


def _rows(entries: list[tuple[str, str]], classes: dict[str, int], root: str, strict: bool) -> list[dict]:
    """What e2e-dist's image decode reads: {uri, size, label}. A missing file is one line when
    data.strict, else skipped with a warning (a file that is there but does not decode is the
    decode's business: skipped in its micro-batch, or a stop when strict)."""
    rows = []
    for path, label in entries:
        uri = path if os.path.isabs(path) else os.path.join(root, path)
        try:
            size = os.path.getsize(uri)
        except OSError as e:
            if strict:
                raise DataError(f"data.options.table: {path}: {e.strerror}") from None
            log.warning("image-table: skipping %s (%s)", path, e.strerror)
            continue
        rows.append({"uri": uri, "size": size, "label": classes[label]})
    return rows


def _channels(opts: TableOptions, model_cfg: Any) -> int:
    model_opts = getattr(model_cfg, "options", None)
    return (opts.channels or getattr(model_cfg, "in_channels", None) or getattr(model_opts, "in_channels", None)
            or 3)


@plugins.options(TableOptions)
def build_image_table(data_cfg, *, model_cfg=None, storage_cfg=None) -> DataBundle:
    """Split and subset the table on the driver (no image is opened there); images are decoded in
    Ray Data tasks where each rank's samples are read."""
    opts: TableOptions = data_cfg.options
    entries = read_table(opts)
    classes = label_indices([y for _, y in entries])
    num_classes = getattr(getattr(model_cfg, "options", None), "num_classes", None)
    if num_classes is not None and max(classes.values(), default=0) >= num_classes:
        raise ConfigError(f"model.options.num_classes={num_classes} but {opts.table} has label "
                          f"{max(classes.values())} (labels must be 0 .. num_classes-1)")
    # Keys are the paths as written: the split does not depend on where the table lies.
    ordered = seeded_order(entries, seed=data_cfg.seed, key=lambda e: e[0])[: data_cfg.max_files or None]
    train_all, val = split_by_hash(ordered, val_fraction=data_cfg.val_fraction, seed=data_cfg.seed, key=lambda e: e[0])
    train = take_fraction(train_all, data_cfg.fraction)
    root = os.path.dirname(opts.table)
    train_rows, val_rows = (_rows(part, classes, root, data_cfg.strict) for part in (train, val))
    if not train_rows or not val_rows:
        raise DataError(f"data.options.table: {opts.table} has too few images ({len(ordered)}) for a train and a "
                        "val split")
    channels = _channels(opts, model_cfg)
    fn_kwargs = {"size": data_cfg.image_size, "channels": channels, "storage": storage_cfg, "strict": data_cfg.strict}
    sample_bytes = channels * data_cfg.image_size ** 2 * 4 + 9  # float32 pixels + label + valid

    def samples(rows: list[dict], name: str):
        return row_samples(name, rows, decode_images, fn_kwargs, sample_bytes=sample_bytes,
                           rows_per_task=ROWS_PER_BLOCK, size_column="size")

    stats = {"train_rows": len(train_rows), "val_rows": len(val_rows), "train_samples": len(train_rows),
             "train_bytes": sum(r["size"] for r in train_rows), "num_classes": len(classes)}
    return DataBundle(train=samples(train_rows, "train"), val=samples(val_rows, "val"), collate=collate, stats=stats)


build_image_table.check_paths = check_table
