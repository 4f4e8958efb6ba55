"""`image-parquet`: labelled images in Parquet shards (local or s3://), decoded in Ray Data tasks.

The layout datasets are shipped in (Hugging Face's `Image` feature, webdataset-to-Parquet dumps):
one row per image, `data.image_column` holding the encoded bytes (binary, or a struct with a
`bytes` field), `data.label_column` an integer class or a class name.

On the driver nothing is decoded: an index pass in Ray Data tasks reads each shard's footer and
label column (projection: labels only) and checks both columns, so a shard with a missing or
mistyped column stops the run before training, named. Units are row groups: split by each row
group's key hash (`common.split_by_hash`, key = shard key + row group), ordered by `seeded_order`,
`fraction` / `max_files` take a nested prefix of the train groups' rows (few, large groups: the split
is made inside each group instead, `split_groups`). Class names, when labels are strings, are the
sorted set over all shards, as image-folder's class folders are. The index is kept with the runs
(data/index_store.py): a later run or sweep trial, on any node, reads it instead of the shards.

A sample is a row; a row group is a block (data/order.py). A read task fetches each row group it
touches once (image and label column chunks) and decodes only the rows it was asked for with
`images.decode_image` (the same resize / normalization as image folders); undecodable images are
skipped with a warning, or stop the run when `data.strict`.
"""

from __future__ import annotations

import logging
from typing import Any, Iterator, Sequence

import numpy as np

from e2e_dist.console import FILE_ONLY
from e2e_dist.data.common import (
    DataError, FileItem, list_files, note_bad_item, seeded_order, split_by_hash,
)
from e2e_dist.data.images import collate, decode_image
from e2e_dist.data.registry import DataBundle, register_source
from e2e_dist.data.samples import VALID, SampleSet, Shared, gather
from e2e_dist.errors import ConfigError
from e2e_dist.storage import open_input_file

log = logging.getLogger("e2e_dist.data")
ROWS_PER_TASK = 128
"""Images per read task."""


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


class RowGroupReader:
    """Samples = rows of row groups: group g (a {uri, row_group, first, count} of `groups`) holds samples
    cum[g]..cum[g+1]-1, rows first..first+count-1 of its row group. A read fetches each row group it
    touches once (its image and label column chunks) and decodes only the rows asked for."""

    def __init__(self, groups: list[dict], fn_kwargs: dict):
        self.groups = Shared.put([(g["uri"], g["row_group"], g["first"]) for g in groups])
        self.cum = np.concatenate([[0], np.cumsum([g["count"] for g in groups])]).astype(np.int64)
        self.fn_kwargs = fn_kwargs

    def read(self, ids: np.ndarray) -> tuple[dict[str, np.ndarray], int]:
        return next(self.read_chunks(ids, max(1, len(ids))))

    def read_chunks(self, ids: np.ndarray, chunk: int) -> Iterator[tuple[dict[str, np.ndarray], int]]:
        """Every row group the ids touch is fetched first, once (its image and label column
        chunks: the bytes read come with the first chunk), then rows are decoded chunk by chunk."""
        groups, which = self.groups.get(), np.searchsorted(self.cum, ids, side="right") - 1
        tables, nbytes = {}, 0
        for g in np.unique(which):
            uri, rg, _ = groups[g]
            tables[g], read = fetch_row_group(uri, rg, self.fn_kwargs)
            nbytes += read
        for i in range(0, max(len(ids), 1), chunk):
            part, part_groups = ids[i:i + chunk], which[i:i + chunk]
            parts = []
            for g in np.unique(part_groups):
                where = np.nonzero(part_groups == g)[0]
                uri, rg, first = groups[g]
                parts.append((where, decode_rows(tables[g], uri, rg, first + part[where] - self.cum[g], **self.fn_kwargs)))
            yield gather(parts, len(part)), nbytes if i == 0 else 0


def fetch_row_group(uri: str, rg: int, fn_kwargs: dict) -> tuple[Any, int]:
    """Row group rg of uri, image and label columns (a pyarrow table), and the bytes of their chunks."""
    import pyarrow.parquet as pq

    cols = (fn_kwargs["image_col"], fn_kwargs["label_col"])
    with open_input_file(str(uri), fn_kwargs["storage"]) as f:
        pf = pq.ParquetFile(f)
        table = pf.read_row_group(int(rg), columns=list(cols))
        meta = pf.metadata.row_group(int(rg))
        nbytes = sum(meta.column(i).total_compressed_size for i in range(meta.num_columns)
                     if meta.column(i).path_in_schema.split(".")[0] in cols)
    return table, nbytes


def decode_rows(table: Any, uri: str, rg: int, rows: np.ndarray, *, size: int, channels: int, image_col: str,
                label_col: str, classes: list | None, storage: Any, strict: bool) -> dict[str, np.ndarray]:
    """Rows `rows` of a fetched row group -> {pixels, label, valid}; a bad image keeps its row."""
    index = {name: i for i, name in enumerate(classes)} if classes else None
    images, ys = table.column(image_col).take(rows).to_pylist(), table.column(label_col).take(rows).to_pylist()
    pixels, labels, valid, bad = [], [], [], []
    for row, img, y in zip(rows, images, ys):
        data = img["bytes"] if isinstance(img, dict) else img
        try:
            if data is None:
                raise ValueError("no image bytes")
            pixels.append(decode_image(data, size, channels))
            valid.append(True)
        except Exception as e:
            note_bad_item(bad, "image", f"{uri} row group {rg} row {int(row)}", e, strict=strict, scan=False)
            pixels.append(np.zeros((channels, size, size), np.float32))
            valid.append(False)
        labels.append(index[y] if index is not None else int(y))
    return {"pixels": np.stack(pixels) if pixels else np.zeros((0, channels, size, size), np.float32),
            "label": np.array(labels, dtype=np.int64), VALID: np.array(valid, dtype=bool)}


def _index(files: Sequence[FileItem], data_cfg: Any, storage_cfg: Any, stats: dict) -> list[dict]:
    from e2e_dist.data.index_store import cached_index, index_location

    return cached_index("image-parquet", files, index_shard, location=index_location(data_cfg, storage_cfg),
                        paths=data_cfg.paths, params={"image": data_cfg.image_column, "label": data_cfg.label_column},
                        storage_cfg=storage_cfg, stats=stats, image_col=data_cfg.image_column,
                        label_col=data_cfg.label_column)


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
    files = _shards(data_cfg, storage_cfg)
    index_stats: dict = {}
    index = _index(files, data_cfg, storage_cfg, index_stats)
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
    train_all, val = split_groups(groups, data_cfg.val_fraction, data_cfg.seed)
    total = sum(g["count"] for g in train_all)
    budget = max(1, int(total * data_cfg.fraction + 0.5))
    if data_cfg.max_files:
        budget = min(budget, data_cfg.max_files)  # for images, max_files caps the images read
    train = _take_rows(train_all, budget)
    if not train or not val:
        raise DataError(f"data: {', '.join(data_cfg.paths)} has too few rows ({sum(g['count'] for g in groups)}) "
                        "for a train and a val split")
    channels = getattr(model_cfg, "in_channels", None) or 3
    fn_kwargs = {"size": data_cfg.image_size, "channels": channels, "image_col": data_cfg.image_column,
                 "label_col": data_cfg.label_column, "classes": classes, "storage": storage_cfg,
                 "strict": data_cfg.strict}
    n_train, n_val = sum(g["count"] for g in train), sum(g["count"] for g in val)
    stats = {"train_rows": n_train, "val_rows": n_val, "train_samples": n_train, "num_classes": n_classes,
             "train_shards": len({g["uri"] for g in train}), **index_stats}
    log.info("image data %s: %s", ", ".join(data_cfg.paths), stats, extra=FILE_ONLY)

    def samples(part: list[dict], name: str) -> SampleSet:
        # One block per row group (slice): the unit one read fetches.
        starts = np.concatenate([[0], np.cumsum([g["count"] for g in part])]).astype(np.int64)
        return SampleSet(name=name, starts=starts, reader=RowGroupReader(part, fn_kwargs), rows_per_task=ROWS_PER_TASK,
                         sample_bytes=channels * data_cfg.image_size ** 2 * 4 + 9)

    return DataBundle(train=samples(train, "train"), val=samples(val, "val"), collate=collate, stats=stats)


def split_groups(groups: list[dict], val_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, val) row groups by key hash. When whole groups hold out more than twice or less than half
    of val_fraction of the rows: with few groups (fewer than 2 / val_fraction), the last val_fraction
    of each group's rows instead, said in one line; with many, a warning naming both shares."""
    from e2e_dist.data.common import share_note, split_inside, tail_sizes

    train, val = split_by_hash(groups, val_fraction=val_fraction, seed=seed, key=lambda g: g["key"])
    share = sum(g["count"] for g in val) / max(sum(g["count"] for g in groups), 1)
    if not split_inside("row groups", len(groups), share, val_fraction, "rows"):
        return train, val
    train, val = [], []
    for g, n_val in zip(groups, tail_sizes([g["count"] for g in groups], val_fraction)):
        if g["count"] - n_val:
            train.append({**g, "count": g["count"] - n_val})
        if n_val:
            val.append({**g, "key": g["key"] + "#val", "first": g["first"] + g["count"] - n_val, "count": n_val})
    share_note(f"{len(groups)} row group(s)", share, val_fraction, "the last rows of each row group")
    return train, val


def _shards(data_cfg: Any, storage_cfg: Any) -> list[FileItem]:
    if not data_cfg.paths:
        raise ConfigError("data.paths: source 'image-parquet' needs Parquet shards (files, folders, globs or s3://)")
    return list_files(data_cfg.paths, storage_cfg, suffixes=(".parquet",), strict=data_cfg.strict)


build_image_parquet.check_paths = _shards  # see registry.check_data
