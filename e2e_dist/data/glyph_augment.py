"""Seeded augmentation of one glyph: what people's digit images differ by, drawn at random.

A glyph arrives as white ink on black on a CANVAS x CANVAS float canvas (values 0..1). `augment`
draws, from a generator seeded by the row (so a resumed run renders exactly the same images):
scale and placement in the frame (filling it or small and off-centre), rotation, slant and
stretch, a non-square frame brought back to square (stretched or letterboxed), low resolution,
blur, ink and paper grey levels in either polarity, light that is not flat (a gradient, a shadow
with a hard or soft edge, vignetting: `light_field`), noise and JPEG artefacts. The ranges cover
the input contract README states (8-256 px, either polarity, letterboxed, JPEG, shadowed photos);
see GlyphAugment for each one.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

CANVAS = 64
"""Side of the canvas glyphs are rendered and augmented on, before the final resize."""


@dataclass(frozen=True, kw_only=True)
class GlyphAugment:
    fill: tuple[float, float] = (0.35, 0.95)
    """The ink's longer side as a share of the frame (small digits in a big image to filling it)."""
    offset: float = 0.5
    """How far off-centre the ink may sit, as a share of the free space around it."""
    rotate_deg: float = 12.0
    """Rotation, uniform in +-this (a photo held slightly tilted)."""
    shear: float = 0.25
    """Horizontal slant, uniform in +-this (italic-like)."""
    stretch: tuple[float, float] = (0.7, 1.35)
    """Width / height scale of the glyph."""
    p_frame: float = 0.3
    """Chance the glyph sits in a non-square frame (aspect 1:2 to 2:1) brought back to square."""
    p_low_res: float = 0.3
    """Chance of a round trip through a small image (8-20 px): tiny inputs are blurry once resized."""
    p_blur: float = 0.3
    """Chance of a Gaussian blur of 0.3-1.5 canvas pixels."""
    p_invert: float = 0.5
    """Chance of dark ink on light paper (the glyph is rendered light on dark)."""
    min_contrast: float = 0.3
    """Least difference between ink and paper grey levels."""
    p_light: float = 0.5
    """Chance of uneven light: the picture (ink and paper) multiplied by a `light_field`."""
    max_darkening: float = 0.5
    """The darkest point of that light field is this much darker than the brightest, at most
    (uniform from 0.1; held-out photos are judged up to 0.4: a margin)."""
    p_noise: float = 0.4
    """Chance of Gaussian pixel noise (sigma 0.01-0.08)."""
    p_jpeg: float = 0.3
    """Chance of a JPEG round trip at quality 15-85."""


def crop_to_ink(pixels: np.ndarray, threshold: float) -> np.ndarray | None:
    """The bounding box of the pixels above `threshold`; None when there are none."""
    rows, cols = np.nonzero(pixels > threshold)
    if rows.size == 0:
        return None
    return pixels[rows.min():rows.max() + 1, cols.min():cols.max() + 1]


def place(glyph: np.ndarray, rng: np.random.Generator, aug: GlyphAugment) -> np.ndarray:
    """Crop the ink, transform it (stretch, slant, rotate), and place it scaled and shifted on a new canvas."""
    from PIL import Image

    cropped = crop_to_ink(glyph, 0.05)
    if cropped is None:
        return glyph
    ink = Image.fromarray(np.uint8(np.clip(cropped, 0, 1) * 255))
    w, h = ink.size
    sx = rng.uniform(*aug.stretch)
    ink = ink.resize((max(1, round(w * sx * 2)), h * 2), Image.Resampling.BILINEAR)  # 2x: room for the transforms
    shear = rng.uniform(-aug.shear, aug.shear)
    w, h = ink.size
    pad = int(abs(shear) * h) + 1
    ink = ink.transform((w + 2 * pad, h), Image.Transform.AFFINE, (1, shear, -pad - shear * h / 2, 0, 1, 0),
                        resample=Image.Resampling.BILINEAR)
    ink = ink.rotate(rng.uniform(-aug.rotate_deg, aug.rotate_deg), resample=Image.Resampling.BILINEAR, expand=True)
    arr = crop_to_ink(np.asarray(ink, np.float32) / 255.0, 0.05)
    side = rng.uniform(*aug.fill) * CANVAS
    scale = side / max(arr.shape)
    nh, nw = max(1, round(arr.shape[0] * scale)), max(1, round(arr.shape[1] * scale))
    small = np.asarray(Image.fromarray(np.uint8(arr * 255)).resize((nw, nh), Image.Resampling.LANCZOS), np.float32) / 255
    canvas = np.zeros((CANVAS, CANVAS), np.float32)
    y = int(round((CANVAS - nh) / 2 * (1 + rng.uniform(-aug.offset, aug.offset))))
    x = int(round((CANVAS - nw) / 2 * (1 + rng.uniform(-aug.offset, aug.offset))))
    canvas[y:y + nh, x:x + nw] = small
    return canvas


def reframe(canvas: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The glyph in a non-square frame, brought back to square: stretched, or letterboxed (padded)."""
    from PIL import Image

    aspect = float(np.exp(rng.uniform(np.log(0.5), np.log(2.0))))
    im = Image.fromarray(np.uint8(canvas * 255))
    if aspect >= 1:  # wider than tall: pad the sides
        frame = Image.new("L", (round(CANVAS * aspect), CANVAS), 0)
        frame.paste(im, (int(rng.integers(0, frame.size[0] - CANVAS + 1)), 0))
    else:
        frame = Image.new("L", (CANVAS, round(CANVAS / aspect)), 0)
        frame.paste(im, (0, int(rng.integers(0, frame.size[1] - CANVAS + 1))))
    if rng.random() < 0.5:
        out = frame.resize((CANVAS, CANVAS), Image.Resampling.BILINEAR)
    else:  # letterbox: the frame's longer side fits the canvas
        side = max(frame.size)
        square = Image.new("L", (side, side), 0)
        square.paste(frame, ((side - frame.size[0]) // 2, (side - frame.size[1]) // 2))
        out = square.resize((CANVAS, CANVAS), Image.Resampling.BILINEAR)
    return np.asarray(out, np.float32) / 255.0


LIGHTS = ("gradient", "shadow", "vignette")


def light_field(h: int, w: int, rng: np.random.Generator, darkening: float, kind: str | None = None) -> np.ndarray:
    """An (h, w) illumination factor in [1 - darkening, 1] that multiplies a picture (ink and paper alike,
    as light does): a linear gradient in any direction; a shadow, one side of a line through the
    middle 70% of the picture darker (across the glyph or a corner), the edge hard or soft (up to a third of the side wide);
    or vignetting, darker away from a centre near the middle. `kind` None: one of LIGHTS at random."""
    kind = kind or LIGHTS[int(rng.integers(len(LIGHTS)))]
    side = max(h, w)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    yy, xx = (yy - (h - 1) / 2) / side, (xx - (w - 1) / 2) / side  # centred, in picture sides
    if kind == "vignette":
        cy, cx = rng.uniform(-0.2, 0.2, 2)
        r2 = (yy - cy) ** 2 + (xx - cx) ** 2
        dark = r2 / r2.max()
    else:
        angle = rng.uniform(0, 2 * np.pi)
        along = np.cos(angle) * xx + np.sin(angle) * yy  # signed distance along the light's direction
        if kind == "gradient":
            dark = (along - along.min()) / max(float(along.max() - along.min()), 1e-6)
        elif kind == "shadow":
            cy, cx = rng.uniform(-0.35, 0.35, 2)
            edge = along - (np.cos(angle) * cx + np.sin(angle) * cy)
            soft = rng.uniform(0.0, 0.33) if rng.random() < 0.7 else 0.0
            dark = (edge > 0).astype(np.float32) if soft < 0.02 else 1 / (1 + np.exp(-edge / (soft / 4)))
        else:
            raise ValueError(f"unknown light {kind!r} ({', '.join(LIGHTS)})")
    return (1.0 - darkening * dark).astype(np.float32)


def augment(glyph: np.ndarray, rng: np.random.Generator, aug: GlyphAugment = GlyphAugment()) -> np.ndarray:
    """A white-on-black glyph canvas (0..1) -> one augmented grey image on the canvas (0..1)."""
    from PIL import Image, ImageFilter

    x = place(glyph, rng, aug)
    if rng.random() < aug.p_frame:
        x = reframe(x, rng)
    im = Image.fromarray(np.uint8(np.clip(x, 0, 1) * 255))
    if rng.random() < aug.p_low_res:
        r = int(rng.integers(8, 21))
        im = im.resize((r, r), Image.Resampling.BILINEAR).resize((CANVAS, CANVAS), Image.Resampling.BILINEAR)
    if rng.random() < aug.p_blur:
        im = im.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.5))))
    x = np.asarray(im, np.float32) / 255.0
    paper = rng.uniform(0.0, 1.0 - aug.min_contrast)
    ink = rng.uniform(paper + aug.min_contrast, 1.0)
    x = paper + (ink - paper) * x
    if rng.random() < aug.p_invert:
        x = 1.0 - x
    if rng.random() < aug.p_light:
        x = x * light_field(CANVAS, CANVAS, rng, rng.uniform(0.1, aug.max_darkening))
    if rng.random() < aug.p_noise:
        x = x + rng.normal(0.0, rng.uniform(0.01, 0.08), x.shape)
    x = np.clip(x, 0.0, 1.0)
    if rng.random() < aug.p_jpeg:
        buf = io.BytesIO()
        Image.fromarray(np.uint8(np.round(x * 255))).save(buf, format="JPEG", quality=int(rng.integers(15, 86)))
        x = np.asarray(Image.open(buf), np.float32) / 255.0
    return x
