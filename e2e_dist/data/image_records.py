"""`image-parquet`: labelled images in Parquet shards (local or s3://), decoded in Ray Data tasks.

The layout datasets are shipped in (Hugging Face's `Image` feature, webdataset-to-Parquet dumps):
one row per image, `data.image_column` holding the encoded bytes (binary, or a struct with a
`bytes` field), `data.label_column` an integer class or a class name.

On the driver nothing is decoded: an index pass in Ray Data tasks reads each shard's footer and
label column (projection: labels only) and checks both columns, so a shard with a missing or
mistyped column stops the run before training, named. Units are row groups: split by each row
group's key hash (`common.split_by_hash`, key = shard key + row group), ordered by `seeded_order`,
`fraction` / `max_files` take a nested prefix of the train groups' rows. Class names, when labels
are strings, are the sorted set over all shards, as image-folder's class folders are.

Each Ray Data task reads one row group's image and label columns and decodes with
`images.decode_image` (the same resize / normalization as image folders); undecodable images are
skipped with a warning, or stop the run when `data.strict`.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np

from e2e_dist.console import FILE_ONLY
from e2e_dist.data.common import (
    DataError, FileItem, list_files, note_bad_item, per_shard_in_tasks, seeded_order, split_by_hash,
)
from e2e_dist.data.images import collate, decode_image
from e2e_dist.data.registry import DataBundle, register_source
from e2e_dist.errors import ConfigError
from e2e_dist.storage import open_input_file

log = logging.getLogger("e2e_dist.data")


def _columns(pf, uri: str, image_col: str, label_col: str) -> str:
    """Check both columns; the label kind: 'int' or 'str'."""
    import pyarrow as pa

    schema = pf.schema_arrow
    for col, field in ((image_col, "data.image_column"), (label_col, "data.label_column")):
        if col not in schema.names:
            raise DataError(f"{field}: no column {col!r} in {uri} (columns: {', '.join(schema.names)})")
    kind = schema.field(image_col).type
    if not (pa.types.is_binary(kind) or pa.types.is_large_binary(kind)
            or (pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0)):
        raise DataError(f"data.image_column: column {image_col!r} of {uri} is {kind}, not image bytes "
                        "(binary, or a struct with a 'bytes' field)")
    label = schema.field(label_col).type
    if pa.types.is_integer(label):
        return "int"
    if pa.types.is_string(label) or pa.types.is_large_string(label):
        return "str"
    raise DataError(f"data.label_column: column {label_col!r} of {uri} is {label}, not an integer or a class name")


def index_shard(uri: str, image_col: str, label_col: str, storage_cfg: Any) -> dict:
    """{uri, rows: rows per row group, label_kind, labels: sorted distinct labels} from footer + label column."""
    import pyarrow.parquet as pq

    with open_input_file(uri, storage_cfg) as f:
        pf = pq.ParquetFile(f)
        kind = _columns(pf, uri, image_col, label_col)
        labels = pf.read(columns=[label_col]).column(0)
    if labels.null_count:
        raise DataError(f"data.label_column: {labels.null_count} row(s) of {uri} have no {label_col!r}")
    rows = [pf.metadata.row_group(i).num_rows for i in range(pf.metadata.num_row_groups)]
    values = sorted(set(labels.to_pylist()))
    return {"uri": uri, "rows": rows, "label_kind": kind, "labels": values}


def decode_row_groups(batch: dict, *, size: int, channels: int, image_col: str, label_col: str, classes: list | None,
                      storage: Any, strict: bool) -> dict:
    """Ray Data map_batches fn: {uri, row_group, first, count} -> {pixels, label} of those rows."""
    import pyarrow.parquet as pq

    index = {name: i for i, name in enumerate(classes)} if classes else None
    pixels, labels, bad = [], [], []
    for uri, rg, first, count in zip(batch["uri"], batch["row_group"], batch["first"], batch["count"]):
        with open_input_file(str(uri), storage) as f:
            table = pq.ParquetFile(f).read_row_group(int(rg), columns=[image_col, label_col])
        images = table.column(image_col).to_pylist()[int(first): int(first) + int(count)]
        ys = table.column(label_col).to_pylist()[int(first): int(first) + int(count)]
        for j, (img, y) in enumerate(zip(images, ys)):
            data = img["bytes"] if isinstance(img, dict) else img
            try:
                if data is None:
                    raise ValueError("no image bytes")
                pixels.append(decode_image(data, size, channels))
                labels.append(index[y] if index is not None else int(y))
            except Exception as e:
                note_bad_item(bad, "image", f"{uri} row group {rg} row {int(first) + j}", e, strict=strict, scan=False)
    return {"pixels": np.stack(pixels) if pixels else np.zeros((0, channels, size, size), np.float32),
            "label": np.array(labels, dtype=np.int64)}


def _index(files: Sequence[FileItem], data_cfg: Any, storage_cfg: Any) -> list[dict]:
    return per_shard_in_tasks(files, index_shard, image_col=data_cfg.image_column,
                              label_col=data_cfg.label_column, storage_cfg=storage_cfg)


def _groups(files: Sequence[FileItem], index: list[dict]) -> list[dict]:
    by_uri = {e["uri"]: e for e in index}
    return [{"uri": f.uri, "key": f"{f.key}#{rg}", "row_group": rg, "first": 0, "count": n}
            for f in files for rg, n in enumerate(by_uri[f.uri]["rows"]) if n]


def _take_rows(groups: list[dict], n: int) -> list[dict]:
    """The first n rows of groups in order (the last group cut): nested in n."""
    out = []
    for g in groups:
        if n <= 0:
            break
        out.append({**g, "count": min(g["count"], n)})
        n -= out[-1]["count"]
    return out


@register_source("image-parquet")
def build_image_parquet(data_cfg, *, model_cfg=None, storage_cfg=None) -> DataBundle:
    """Labelled images in Parquet shards: data.paths (files, directories, globs, s3:// prefixes)."""
    from e2e_dist.data.common import decoded_dataset

    files = _shards(data_cfg, storage_cfg)
    index = _index(files, data_cfg, storage_cfg)
    kinds = {e["label_kind"] for e in index}
    if len(kinds) > 1:
        raise DataError(f"data.label_column: {data_cfg.label_column!r} is an integer in some shards and a "
                        "class name in others")
    classes = sorted({v for e in index for v in e["labels"]}) if kinds == {"str"} else None
    n_classes = len(classes) if classes else max(v for e in index for v in e["labels"]) + 1
    num_classes = getattr(model_cfg, "num_classes", None)
    if num_classes is not None and n_classes > num_classes:
        raise ConfigError(f"model.num_classes={num_classes} but the shards hold {n_classes} classes")
    groups = seeded_order(_groups(files, index), seed=data_cfg.seed, key=lambda g: g["key"])
    train_all, val = split_by_hash(groups, val_fraction=data_cfg.val_fraction, seed=data_cfg.seed,
                                   key=lambda g: g["key"])
    total = sum(g["count"] for g in train_all)
    budget = max(1, int(total * data_cfg.fraction + 0.5))
    if data_cfg.max_files:
        budget = min(budget, data_cfg.max_files)  # for images, max_files caps the images read
    train = _take_rows(train_all, budget)
    if not train or not val:
        raise DataError(f"data: {', '.join(data_cfg.paths)} has too few row groups ({len(groups)}) for a train and a "
                        "val split (write smaller row groups or more shards)")
    channels = getattr(model_cfg, "in_channels", None) or 3
    fn_kwargs = {"size": data_cfg.image_size, "channels": channels, "image_col": data_cfg.image_column,
                 "label_col": data_cfg.label_column, "classes": classes, "storage": storage_cfg,
                 "strict": data_cfg.strict}
    n_train, n_val = sum(g["count"] for g in train), sum(g["count"] for g in val)
    stats = {"train_rows": n_train, "val_rows": n_val, "train_samples": n_train, "num_classes": n_classes,
             "train_shards": len({g["uri"] for g in train})}
    log.info("image data %s: %s", ", ".join(data_cfg.paths), stats, extra=FILE_ONLY)

    def dataset(rows: list[dict], name: str):
        return decoded_dataset(rows, decode_row_groups, name=name, rows_per_block=1, fn_kwargs=fn_kwargs)

    return DataBundle(train=dataset(train, "train"), val=dataset(val, "val"), collate=collate, stats=stats,
                      train_decoded_bytes=n_train * (channels * data_cfg.image_size ** 2 * 4 + 8))


def _shards(data_cfg: Any, storage_cfg: Any) -> list[FileItem]:
    if not data_cfg.paths:
        raise ConfigError("data.paths: source 'image-parquet' needs Parquet shards (files, folders, globs or s3://)")
    return list_files(data_cfg.paths, storage_cfg, suffixes=(".parquet",), strict=data_cfg.strict)


build_image_parquet.check_paths = _shards  # see registry.check_data
