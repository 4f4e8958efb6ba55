"""`e2e-dist data make-digits DIR`: digit image files in the styles people bring, for judging a
vision model through `predict` (and usable as an `image-folder`: DIR/<style>/<digit>/<file>).

Each style is a file format / framing / polarity someone might hand the model: dark ink on white
and the reverse, 8 to 256 px, grey, colour, transparent, 16-bit, EXIF-rotated, letterboxed; and
light that is not flat, as in photos: a shadow across the digit or a lamp off to one side, 20-40%
darker at the darkest point. These lights are drawn here, not with the training augmentation's
own (glyph_augment.light_field: half-plane shadows, linear gradients, vignettes), so a score on
them is one on shadow shapes and falloffs training never saw either. The
digits are plain renders (no augmentation beyond the style) from the held-out font designs of a
config (`--held-out`, the default: fonts training never saw) or from its training fonts.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np

STYLES = ("dark-on-white-28", "light-on-black-64", "tiny-8", "colour-256", "letterboxed-jpeg-200x150",
          "portrait-60x120", "transparent-rgba", "grey-16bit", "exif-rotated-jpeg", "shadowed-photo-96",
          "uneven-light-64")
LIGHT_DARKENING = (0.2, 0.4)
"""How much darker the darkest point of the lit styles is than the brightest (uniform in this range)."""


def _glyph(font_path: str, digit: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """The digit as ink coverage 0..1, cropped to its ink, `height` px tall (a plain render)."""
    from PIL import Image, ImageFont

    from e2e_dist.data.fonts import render_centered
    from e2e_dist.data.glyph_augment import crop_to_ink

    ink = crop_to_ink(render_centered(ImageFont.truetype(font_path, 96), str(digit), 160).astype(np.float32) / 255.0,
                      0.05)
    width = max(1, round(ink.shape[1] * height / ink.shape[0]))
    return np.asarray(Image.fromarray(np.uint8(ink * 255)).resize((width, height), Image.Resampling.LANCZOS),
                      np.float32) / 255.0


def _on_canvas(ink: np.ndarray, w: int, h: int, rng: np.random.Generator) -> np.ndarray:
    """Ink placed near the centre of a w x h canvas (0..1 coverage); scaled down if it does not fit."""
    from PIL import Image

    if ink.shape[0] > h or ink.shape[1] > w:
        s = min(h / ink.shape[0], w / ink.shape[1])
        ink = np.asarray(Image.fromarray(np.uint8(ink * 255)).resize(
            (max(1, int(ink.shape[1] * s)), max(1, int(ink.shape[0] * s))), Image.Resampling.LANCZOS), np.float32) / 255
    canvas = np.zeros((h, w), np.float32)
    free_y, free_x = h - ink.shape[0], w - ink.shape[1]
    y = free_y // 2 + int(rng.integers(-(free_y // 6), free_y // 6 + 1))  # a little off-centre
    x = free_x // 2 + int(rng.integers(-(free_x // 6), free_x // 6 + 1))
    canvas[y:y + ink.shape[0], x:x + ink.shape[1]] = ink
    return canvas


def _mix(cov: np.ndarray, ink, paper) -> np.ndarray:
    """Coverage -> pixels: paper where 0, ink where 1 (grey levels or RGB triples)."""
    ink, paper = np.asarray(ink, np.float32), np.asarray(paper, np.float32)
    cov = cov[..., None] if ink.ndim else cov
    return paper + (ink - paper) * cov


def cast_shadow(side: int, rng: np.random.Generator, darkening: float) -> np.ndarray:
    """A (side, side) light factor: 1, and 1 - darkening in the shadow of an object: a rotated
    ellipse (a curved edge) over 15-85% of the picture, across the digit or over a corner, its edge
    sharp or blurred (up to 6% of the side)."""
    from PIL import Image, ImageFilter

    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) / side
    for _ in range(100):  # redraw until the shadow covers neither too little nor nearly all of it
        cy, cx = rng.uniform(-0.3, 1.3, 2)
        ry, rx = rng.uniform(0.3, 1.2, 2)
        angle = rng.uniform(0, np.pi)
        u = (xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)
        v = (yy - cy) * np.cos(angle) - (xx - cx) * np.sin(angle)
        inside = (u / rx) ** 2 + (v / ry) ** 2 < 1
        if 0.15 <= inside.mean() <= 0.85:
            break
    mask = Image.fromarray(np.uint8(inside * 255))
    if rng.random() < 0.6:
        mask = mask.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.005, 0.06) * side)))
    return 1.0 - darkening * np.asarray(mask, np.float32) / 255.0


def lamp_light(side: int, rng: np.random.Generator, darkening: float) -> np.ndarray:
    """A (side, side) light factor from a lamp beside the picture: falling off with the squared
    distance from a point just outside it, scaled so the darkest pixel is `darkening` below the brightest."""
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) / side
    angle = rng.uniform(0, 2 * np.pi)
    lamp = 0.5 + rng.uniform(0.6, 1.2) * np.array([np.cos(angle), np.sin(angle)])
    light = 1.0 / (1.0 + ((xx - lamp[0]) ** 2 + (yy - lamp[1]) ** 2) / rng.uniform(0.05, 0.5))
    light = (light - light.min()) / (light.max() - light.min())
    return 1.0 - darkening + darkening * light


def _shadowed_photo(canvas: Callable[[int, int], np.ndarray], side: int, rng: np.random.Generator) -> np.ndarray:
    """A printed digit (`canvas(w, h)`: its coverage 0..1) photographed with a shadow across it:
    uint8 RGB, dark ink on off-white slightly tinted paper, a cast shadow, sensor noise."""
    paper = rng.uniform(200, 250) * rng.uniform(0.93, 1.0, 3)
    rgb = _mix(canvas(side, side), rng.uniform(10, 60, 3), paper)
    rgb = rgb * cast_shadow(side, rng, rng.uniform(*LIGHT_DARKENING))[..., None]
    rgb = rgb + rng.normal(0, 3, rgb.shape)
    return np.uint8(np.clip(np.round(rgb), 0, 255))


def write_style(style: str, font_path: str, digit: int, out: Path, rng: np.random.Generator) -> Path:
    """One image of `digit` in `font_path`, in `style`, under out/<style>/<digit>/; returns its path."""
    from PIL import Image

    stem = f"{Path(font_path).stem}-{digit}"
    folder = out / style / str(digit)
    folder.mkdir(parents=True, exist_ok=True)
    fill = rng.uniform(0.55, 0.85)

    def canvas(w: int, h: int) -> np.ndarray:
        return _on_canvas(_glyph(font_path, digit, max(4, round(min(w, h) * fill)), rng), w, h, rng)

    if style == "dark-on-white-28":
        im = Image.fromarray(np.uint8(_mix(canvas(28, 28), 0, 255)), "L")
    elif style == "light-on-black-64":
        im = Image.fromarray(np.uint8(_mix(canvas(64, 64), 255, 0)), "L")
    elif style == "tiny-8":
        im = Image.fromarray(np.uint8(_mix(canvas(8, 8), 20, 235)), "L")
    elif style == "colour-256":
        ink, paper = rng.integers(0, 110, 3), rng.integers(150, 256, 3)
        if rng.random() < 0.5:
            ink, paper = paper, ink
        im = Image.fromarray(np.uint8(_mix(canvas(256, 256), ink, paper)), "RGB")
    elif style == "letterboxed-jpeg-200x150":
        cov = np.zeros((150, 200), np.float32)
        cov[:, 25:175] = canvas(150, 150)  # a square picture, letterboxed into 4:3
        im = Image.fromarray(np.uint8(_mix(cov, (30, 30, 90), (250, 245, 235))), "RGB")
    elif style == "portrait-60x120":
        im = Image.fromarray(np.uint8(_mix(canvas(60, 120), 0, 255)), "L")
    elif style == "transparent-rgba":
        cov = canvas(64, 64)
        rgba = np.zeros((64, 64, 4), np.uint8)
        rgba[..., :3] = 0
        rgba[..., 3] = np.uint8(np.round(cov * 255))  # the ink is the alpha channel
        im = Image.fromarray(rgba, "RGBA")
    elif style == "grey-16bit":
        arr = np.round(_mix(canvas(48, 48), 2000, 60000)).astype(np.uint16)
        im = Image.fromarray(arr)  # mode I;16
    elif style == "shadowed-photo-96":
        path = folder / f"{stem}.jpg"
        Image.fromarray(_shadowed_photo(canvas, 96, rng), "RGB").save(path, format="JPEG", quality=85)
        return path
    elif style == "uneven-light-64":  # a lamp beside the picture, either polarity
        ink, paper = (20, 235) if rng.random() < 0.5 else (235, 20)
        light = lamp_light(64, rng, rng.uniform(*LIGHT_DARKENING))
        im = Image.fromarray(np.uint8(np.round(_mix(canvas(64, 64), ink, paper) * light)), "L")
    elif style == "exif-rotated-jpeg":
        upright = Image.fromarray(np.uint8(_mix(canvas(96, 96), 0, 255)), "L")
        im = upright.transpose(Image.Transpose.ROTATE_90)  # stored sideways; EXIF 6 turns it back
        exif = Image.Exif()
        exif[0x0112] = 6
        path = folder / f"{stem}.jpg"
        im.save(path, format="JPEG", quality=90, exif=exif.tobytes())
        return path
    else:
        raise ValueError(f"unknown style {style!r} (styles: {', '.join(STYLES)})")
    ext = "jpg" if style.endswith("jpeg-200x150") else "png"
    path = folder / f"{stem}.{ext}"
    im.save(path, **({"quality": 90} if ext == "jpg" else {}))
    return path


def make_digit_styles(out: str | os.PathLike, fonts: list, *, styles=STYLES, seed: int = 0,
                      on_file: Callable[[Path], None] | None = None) -> list[tuple[Path, int, str]]:
    """Every style x font x digit under `out`; returns (path, digit, style) for each file."""
    out = Path(out)
    written = []
    for si, style in enumerate(styles):
        for fi, font in enumerate(fonts):
            for d in range(10):
                rng = np.random.default_rng([seed, si, fi, d])
                path = write_style(style, font.path, d, out, rng)
                written.append((path, d, style))
                if on_file:
                    on_file(path)
    return written
