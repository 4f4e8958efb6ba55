"""Source `digit-glyphs`: digits rendered from the installed fonts, plus scikit-learn's handwritten
digits, augmented in Ray Data into what people photograph, scan and draw.

On the driver: the fonts whose digits are digits (data/fonts.py), minus `data.held_out` of the
font designs (kept for evaluation: `e2e-dist data make-digits DIR --held-out`); the base items
(font x digit, and the 1,797 handwritten digits) split into train/val by hash as every source does;
`data.variants` rows per base item, each with its own seed. In read tasks (`render_rows`): the
glyph rendered white on black (font digits at a random size, handwritten ones upsampled from 8x8),
augmented (data/glyph_augment.py, seeded by the row: a resume sees the same images), resized to
`data.image_size` and normalized as every image source is.

Rows name fonts by file name, not path: a worker on another node finds the same file in its own
font folders (and a missing one stops the run, naming the font and the node).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from e2e_dist.console import FILE_ONLY
from e2e_dist.data.common import DataError, row_seed, seeded_order, split_by_hash, take_fraction
from e2e_dist.data.images import PIXEL_MEAN, PIXEL_STD, collate
from e2e_dist.data.registry import DataBundle, register_source
from e2e_dist.data.samples import row_samples
from e2e_dist.errors import ConfigError

log = logging.getLogger("e2e_dist.data")
ROWS_PER_BLOCK = 256
"""Rows per read task: an augmented glyph takes ~1.5 ms, so a task is a fraction of a second."""


# ------------------------------------------------------------------------------ worker side
@lru_cache(maxsize=1)
def _font_paths() -> dict[str, str]:
    from e2e_dist.data.fonts import candidate_files

    return {os.path.basename(p): p for p in candidate_files()}


@lru_cache(maxsize=512)
def _font(name: str, size: int):
    from PIL import ImageFont

    path = _font_paths().get(name)
    if path is None:
        import socket

        raise DataError(f"data: font {name} is not installed on {socket.gethostname()} (every node needs the "
                        "same fonts: make system-deps)")
    return ImageFont.truetype(path, size)


@lru_cache(maxsize=1)
def _handwritten() -> tuple[np.ndarray, list[int]]:
    """scikit-learn's digits: (images 0..1, labels), loaded once per process."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images.astype(np.float32) / 16.0, [int(y) for y in digits.target]


def glyph_canvas(kind: str, ref: str, label: int, rng: np.random.Generator) -> np.ndarray:
    """The plain glyph, white on black, on the augmentation canvas (0..1)."""
    from PIL import Image

    from e2e_dist.data.fonts import render_centered
    from e2e_dist.data.glyph_augment import CANVAS

    if kind == "font":
        return render_centered(_font(ref, int(rng.integers(32, 57))), str(label), CANVAS).astype(np.float32) / 255.0
    side = int(rng.integers(24, 57))
    small = Image.fromarray(np.uint8(_handwritten()[0][int(ref)] * 255)).resize((side, side), Image.Resampling.BILINEAR)
    canvas = np.zeros((CANVAS, CANVAS), np.float32)
    at = (CANVAS - side) // 2
    canvas[at:at + side, at:at + side] = np.asarray(small, np.float32) / 255.0
    return canvas


def render_image(kind: str, ref: str, label: int, seed: int, *, size: int, augment: bool) -> np.ndarray:
    """One row's image: size x size uint8 grey (what a PNG of it holds; `predict` on that PNG sees
    exactly the pixels training saw)."""
    from PIL import Image

    from e2e_dist.data.glyph_augment import augment as augment_glyph

    rng = np.random.default_rng(seed)
    x = glyph_canvas(kind, ref, label, rng)
    if augment:
        x = augment_glyph(x, rng)
    return np.asarray(Image.fromarray(np.uint8(np.round(x * 255))).resize((size, size), Image.Resampling.BILINEAR))


def render_rows(batch: dict, *, size: int, channels: int, augment: bool) -> dict:
    """Ray Data map_batches fn: rows {kind, ref, label, seed} -> {pixels (N, C, S, S), label}."""
    pixels = []
    for kind, ref, label, seed in zip(batch["kind"], batch["ref"], batch["label"], batch["seed"]):
        x = render_image(str(kind), str(ref), int(label), int(seed), size=size, augment=augment)
        x = (x.astype(np.float32) / 255.0 - PIXEL_MEAN) / PIXEL_STD
        pixels.append(np.repeat(x[None], channels, axis=0))
    return {"pixels": np.stack(pixels) if pixels else np.zeros((0, channels, size, size), np.float32),
            "label": np.asarray(batch["label"], dtype=np.int64)}


# ------------------------------------------------------------------------------ driver side
class _Item:
    """A base glyph before augmentation: a font's digit or a handwritten digit."""

    __slots__ = ("kind", "ref", "label", "key")

    def __init__(self, kind: str, ref: str, label: int) -> None:
        self.kind, self.ref, self.label, self.key = kind, ref, label, f"{kind}/{ref}/{label}"


def _rows(items: list[_Item], variants: int, seed: int) -> list[dict]:
    return [{"kind": it.kind, "ref": it.ref, "label": it.label, "seed": row_seed(seed, it.key, k)}
            for it in items for k in range(variants)]


def glyph_fonts(data_cfg: Any):
    """(training fonts, held-out fonts) for this config; DataError when no font renders digits."""
    from e2e_dist.data.fonts import digit_fonts, split_fonts

    fonts = digit_fonts()
    if not fonts:
        raise DataError("data: source 'digit-glyphs' found no font with digits (install fonts: make system-deps)")
    return split_fonts(fonts, data_cfg.held_out, data_cfg.seed)


@dataclass(kw_only=True)
class GlyphPlan:
    train_rows: list[dict]
    """{kind, ref, label, seed}: `data.variants` rows per training glyph."""
    val_rows: list[dict]
    """One row per validation glyph (augmented as training is: an in-distribution score)."""
    train_glyphs: int
    train_fonts: list
    held_out_fonts: list


def plan_glyphs(data_cfg: Any) -> GlyphPlan:
    """Fonts, held-out designs, the train/val split and every row, on the driver (no image drawn)."""
    train_fonts, held_out = glyph_fonts(data_cfg)
    items = [_Item("font", os.path.basename(f.path), d) for f in train_fonts for d in range(10)]
    items += [_Item("hand", str(i), int(y)) for i, y in enumerate(_handwritten()[1])]
    items = seeded_order(items, seed=data_cfg.seed)[: data_cfg.max_files or None]
    train_all, val = split_by_hash(items, val_fraction=data_cfg.val_fraction, seed=data_cfg.seed)
    train = take_fraction(train_all, data_cfg.fraction)
    if not train or not val:
        raise DataError(f"data: too few glyphs ({len(items)}) for a train and a val split")
    return GlyphPlan(train_rows=_rows(train, data_cfg.variants, data_cfg.seed), val_rows=_rows(val, 1, data_cfg.seed + 1),
                     train_glyphs=len(train), train_fonts=train_fonts, held_out_fonts=held_out)


@register_source("digit-glyphs")
def build_digit_glyphs(data_cfg, *, model_cfg=None, storage_cfg=None) -> DataBundle:
    """Built-in: installed fonts' digits (held-out designs excluded) + handwritten digits, augmented."""
    if data_cfg.paths:
        raise ConfigError("data.paths: source 'digit-glyphs' renders its data (it reads no files); "
                          "for your own images use source 'image-folder'")
    num_classes = getattr(model_cfg, "num_classes", None)
    if num_classes is not None and num_classes != 10:
        raise ConfigError(f"model.num_classes={num_classes}: source 'digit-glyphs' has 10 classes (the digits)")
    plan = plan_glyphs(data_cfg)
    channels = getattr(model_cfg, "in_channels", None) or 1
    fn_kwargs = {"size": data_cfg.image_size, "channels": channels, "augment": data_cfg.augment}
    stats = {"train_rows": len(plan.train_rows), "val_rows": len(plan.val_rows), "train_samples": len(plan.train_rows),
             "train_glyphs": plan.train_glyphs, "train_fonts": len(plan.train_fonts),
             "held_out_fonts": len(plan.held_out_fonts), "num_classes": 10}
    log.info("digit glyphs: %s; fonts held out (designs %s): %s", stats,
             ", ".join(sorted({f.design for f in plan.held_out_fonts})) or "none",
             ", ".join(os.path.basename(f.path) for f in plan.held_out_fonts) or "none", extra=FILE_ONLY)

    def samples(rows: list[dict], name: str):
        return row_samples(name, rows, render_rows, fn_kwargs, rows_per_task=ROWS_PER_BLOCK,
                           sample_bytes=channels * data_cfg.image_size ** 2 * 4 + 9)

    return DataBundle(train=samples(plan.train_rows, "train"), val=samples(plan.val_rows, "val"), collate=collate,
                      stats=stats)
