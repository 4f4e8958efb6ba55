"""Image sources: `image-folder` (one subfolder per class, PNG/JPEG, local or `s3://`) and `digits`.

`digits` is scikit-learn's 1,797 handwritten 8x8 digits (shipped inside the package), written
once as PNGs into a cache folder and then read through exactly the `image-folder` path.

On the driver, from the listing alone (no image is opened there): classes = sorted names of the
first-level subfolders; `max_files` keeps a seeded prefix; the split is by each file's key hash
(`common.split_by_hash`); `fraction` takes a nested prefix of the seeded train order. Rows are
then read and decoded where each rank's samples are read (`decode_images`, data/samples.py): bytes -> grayscale/RGB -> resized to
`image_size` -> normalized to [-1, 1], as `{"pixels": (C, S, S) float32, "label": int64}`.

Bad items: a file that cannot be read or decoded is skipped with a warning naming it (its row
stays, marked invalid, and leaves its micro-batch one sample short), or raises `DataError` when `data.strict`; with strict the
whole set is first scanned on the driver, so a bad file stops the run before training starts.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from e2e_dist.data.common import (
    DataError, FileItem, decoded_dataset, list_files, note_bad_item, raise_first_bad, read_many, scan_batch,
    seeded_order, split_by_hash, take_fraction,
)
from e2e_dist.console import FILE_ONLY
from e2e_dist.data.registry import DataBundle, register_source
from e2e_dist.data.samples import VALID, row_samples
from e2e_dist.errors import ConfigError

log = logging.getLogger("e2e_dist.data")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
PIXEL_MEAN, PIXEL_STD = 0.5, 0.5
"""Pixels in [0, 1] become (x - mean) / std, i.e. [-1, 1]."""
ROWS_PER_BLOCK = 128
"""Images per Ray block/task: small images decode in microseconds, so amortize the task overhead."""


# ------------------------------------------------------------------------------ worker side
def decode_image(data: bytes, size: int, channels: int) -> np.ndarray:
    """Encoded image bytes -> (channels, size, size) float32 normalized pixels. Raises on bad bytes.

    Decoding follows input_contract.open_image (EXIF orientation, transparency on white, 16-bit
    scaled), the same for training and `predict`."""
    from e2e_dist.input_contract import open_image

    return image_pixels(open_image(data), size, channels)


def image_pixels(im, size: int, channels: int) -> np.ndarray:
    """A decoded PIL image -> (channels, size, size) float32 pixels normalized as in training."""
    from PIL import Image

    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    im = im.convert("L" if channels == 1 else "RGB")
    im = im.resize((size, size), Image.Resampling.BILINEAR)
    arr = np.asarray(im, dtype=np.float32) / 255.0
    arr = arr[None] if channels == 1 else arr.transpose(2, 0, 1)
    return (arr - PIXEL_MEAN) / PIXEL_STD


def decode_images(batch: dict, *, size: int, channels: int, storage: Any, strict: bool, scan: bool = False) -> dict:
    """Ray Data map_batches fn / row decoder: rows {uri, size, label} -> {pixels, label, valid}; a bad
    file keeps its row (zeros, valid False), or raises when strict.

    With scan=True it returns only the bad files ({uri, reason}): the strict pre-check.
    """
    pixels, labels, valid, bad = [], [], [], []
    for uri, data, label in zip(batch["uri"], read_many(batch["uri"], batch["size"], storage), batch["label"]):
        try:
            if isinstance(data, Exception):
                raise data
            pixels.append(decode_image(data, size, channels))
            valid.append(True)
        except Exception as e:  # any decoder failure (OSError, ValueError, SyntaxError, ...) = a bad item
            note_bad_item(bad, "image", uri, e, strict=strict, scan=scan)
            pixels.append(np.zeros((channels, size, size), np.float32))
            valid.append(False)
        labels.append(int(label))
    if scan:
        return scan_batch(bad)
    return {"pixels": np.stack(pixels) if pixels else np.zeros((0, channels, size, size), np.float32),
            "label": np.array(labels, dtype=np.int64), VALID: np.array(valid, dtype=bool)}


def collate(batch: dict) -> dict:
    """numpy batch -> {"pixels": float (B, C, S, S), "labels": long (B,)}."""
    import torch

    # A copy: Ray hands out read-only arrays, which torch.from_numpy would only warn about.
    return {"pixels": torch.from_numpy(np.array(batch["pixels"], dtype=np.float32)),
            "labels": torch.from_numpy(np.array(batch["label"], dtype=np.int64))}


# ------------------------------------------------------------------------------ driver side
def class_of(item: FileItem) -> str | None:
    """The class of a listed file: its first-level folder under the listed root (None at the top level)."""
    parts = item.key.split("/")
    return parts[0] if len(parts) > 1 else None


def _rows(items: Sequence[FileItem], classes: dict[str, int]) -> list[dict]:
    return [{"uri": it.uri, "size": it.size, "label": classes[class_of(it)]} for it in items]


def _strict_scan(rows: list[dict], fn_kwargs: dict) -> None:
    """Decode everything once on the driver's Ray (before training); DataError naming the first bad file."""
    raise_first_bad(decoded_dataset(rows, decode_images, name="scan", rows_per_block=ROWS_PER_BLOCK,
                                    fn_kwargs={**fn_kwargs, "strict": False, "scan": True}).take_all(), "image")


def build_image_bundle(data_cfg: Any, model_cfg: Any, storage_cfg: Any, *, default_channels: int = 3) -> DataBundle:
    """List, split and subset an image folder on the driver; lazily decoded Ray Datasets + stats."""
    if not data_cfg.paths:
        raise ConfigError("data.paths: source 'image-folder' needs a folder (local or s3://) "
                          "with one subfolder per class")
    label = ", ".join(data_cfg.paths)
    files = _image_files(data_cfg, storage_cfg)
    loose = [it for it in files if class_of(it) is None]
    if loose:
        msg = f"data.paths: {loose[0].uri} is not inside a class subfolder of {label}"
        if data_cfg.strict:
            raise DataError(msg)
        log.warning("%s; skipping %d such file(s)", msg, len(loose))
        files = [it for it in files if class_of(it) is not None]
    classes = {name: i for i, name in enumerate(sorted({class_of(it) for it in files}))}
    if len(classes) < 2:
        raise DataError(f"data.paths: {label} has {len(classes)} class folder(s); image-folder needs at least 2")
    num_classes = getattr(model_cfg, "num_classes", None)
    if num_classes is not None and len(classes) > num_classes:
        raise ConfigError(f"model.num_classes={num_classes} but {label} has {len(classes)} classes "
                          f"({', '.join(list(classes)[:12])}{', ...' if len(classes) > 12 else ''})")
    files = seeded_order(files, seed=data_cfg.seed)[: data_cfg.max_files or None]
    train_all, val = split_by_hash(files, val_fraction=data_cfg.val_fraction, seed=data_cfg.seed)
    train = take_fraction(train_all, data_cfg.fraction)
    if not train or not val:
        raise DataError(f"data: {label} has too few images ({len(files)}) for a train and a val split")
    channels = getattr(model_cfg, "in_channels", None) or default_channels
    fn_kwargs = {"size": data_cfg.image_size, "channels": channels, "storage": storage_cfg, "strict": data_cfg.strict}
    train_rows, val_rows = _rows(train, classes), _rows(val, classes)
    if data_cfg.strict:
        _strict_scan(train_rows + val_rows, fn_kwargs)
    stats = {"train_rows": len(train_rows), "val_rows": len(val_rows), "train_samples": len(train_rows),
             "train_bytes": sum(it.size for it in train), "num_classes": len(classes)}
    log.info("image data %s: %s", label, stats, extra=FILE_ONLY)
    sample_bytes = channels * data_cfg.image_size ** 2 * 4 + 9

    def samples(rows: list[dict], name: str):
        return row_samples(name, rows, decode_images, fn_kwargs, sample_bytes=sample_bytes, rows_per_task=ROWS_PER_BLOCK,
                           size_column="size")

    return DataBundle(train=samples(train_rows, "train"), val=samples(val_rows, "val"), collate=collate, stats=stats)


@register_source("image-folder")
def build_image_folder(data_cfg, *, model_cfg=None, storage_cfg=None) -> DataBundle:
    """User images: data.paths = folder(s) (local or s3://) holding one subfolder per class."""
    return build_image_bundle(data_cfg, model_cfg, storage_cfg)


def _image_files(data_cfg: Any, storage_cfg: Any) -> list:
    return list_files(data_cfg.paths, storage_cfg, suffixes=IMAGE_SUFFIXES, strict=data_cfg.strict)


build_image_folder.check_paths = _image_files  # see registry.check_data


# ------------------------------------------------------------------------------ built-in digits
def cache_root() -> Path:
    """Where built-in corpora are written once: $E2E_DIST_CACHE, else ~/.cache/e2e_dist (absolute,
    so sweep trials that change directory share one copy)."""
    return Path(os.environ.get("E2E_DIST_CACHE") or Path.home() / ".cache" / "e2e_dist").expanduser().resolve()


DIGITS_MARKER = ".complete"


def write_digits_folder(root: str | os.PathLike) -> Path:
    """scikit-learn's 8x8 digits as `<root>/<digit>/digit-NNNN.png` (8-bit gray), written once.

    Written to a sibling temporary folder and renamed into place, so concurrent runs and crashes
    never leave a half-written folder; the hidden marker file says the folder is complete.
    """
    import shutil
    import tempfile

    from PIL import Image
    from sklearn.datasets import load_digits

    root = Path(root).expanduser().resolve()
    if (root / DIGITS_MARKER).is_file():
        return root
    if root.exists() and any(root.iterdir()):
        raise DataError(f"data.paths: {root} exists but is not a digits folder written by e2e-dist "
                        "(pick an empty path)")
    digits = load_digits()
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        for i, (img, y) in enumerate(zip(digits.images, digits.target)):
            (tmp / str(y)).mkdir(exist_ok=True)
            # Values are 0..16 ink counts: stretch to the full 8-bit range.
            pixels = np.round(img * (255 / 16)).astype(np.uint8)
            Image.fromarray(pixels, mode="L").save(tmp / str(y) / f"digit-{i:04d}.png")
        (tmp / DIGITS_MARKER).write_text("sklearn.datasets.load_digits\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        os.replace(tmp, root)  # atomic; fails if another process filled `root` meanwhile
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if (root / DIGITS_MARKER).is_file():  # that process won: its copy is identical
            return root
        raise
    return root


@register_source("digits")
def build_digits(data_cfg, *, model_cfg=None, storage_cfg=None) -> DataBundle:
    """Built-in: the scikit-learn digits as an image folder (data.paths[0] = where to write it, optional)."""
    if len(data_cfg.paths) > 1:
        raise ConfigError("data.paths: source 'digits' takes at most one path (the folder to write the digits to)")
    if data_cfg.paths and "://" in data_cfg.paths[0]:
        raise ConfigError(f"data.paths: source 'digits' writes to a local folder, not {data_cfg.paths[0]!r}")
    root = write_digits_folder(data_cfg.paths[0] if data_cfg.paths else cache_root() / "digits")
    return build_image_bundle(data_cfg.model_copy(update={"paths": [str(root)]}), model_cfg, storage_cfg,
                              default_channels=1)
