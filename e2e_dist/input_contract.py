"""What `predict` (and the image decoder training uses) accepts, and how it is brought into the form
the model was trained on. README "Inputs `predict` accepts" states the contract for users.

Images, for every model (`open_image`, shared with training's `data.images.decode_image`):
- EXIF orientation is applied (a phone photo stored sideways is seen upright);
- transparency is composited onto white (an RGBA drawing with a transparent background is ink on
  paper, not ink on black);
- 16-bit and 32-bit grayscale are scaled to 8 bits by their range (PIL's `convert("L")` clips them
  to white).
For models trained on `digit-glyphs` (every polarity, size and framing), `pad_square`: a non-square
image is padded to a square with its border's colour, so resizing keeps the glyph's shape.
For models trained on the built-in digits (bright ink on a dark 8x8 frame, filling it), also
`glyph_like_training`: a light background is inverted, and a glyph that fills less of the frame than
training glyphs do (letterboxed, small, off-centre) is cropped to its ink and padded square.
An image smaller than MIN_IMAGE_SIDE pixels on a side is refused (one line), never guessed at.

Audio (`check_audio_length`, then audio_segments.py): clips shorter than the model can see are
padded with silence; a clip within training's `data.max_audio_seconds` is one piece; a longer
recording is cut at its pauses (overlapping windows where speech runs on without one), the pieces
transcribed one by one and their words merged, none cut or doubled. Longer than
MAX_AUDIO_SECONDS: refused, naming the limit.
"""

from __future__ import annotations

import io

import numpy as np

MIN_IMAGE_SIDE = 4
"""Pixels: below this an image holds no recognizable shape."""
GLYPH_FILL = 0.75
"""Training digits' ink spans at least this share of the frame's larger side; a smaller glyph is re-framed."""
GLYPH_MARGIN = 1.0
"""Square frame side / the ink's longer side when re-framing (the built-in digits' ink spans the frame)."""
GLYPH_INK = 0.15
"""Share of the brightest ink above which a pixel counts as ink for the crop (margin and share were
chosen on BENCHMARKS.md section 12's held-out digits: 1.0 / 0.15 of 1.0-1.15 / 0.1-0.25)."""
MAX_AUDIO_SECONDS = 600.0
"""The longest clip `predict` transcribes (in pieces); longer ones are refused."""


class OutOfContract(ValueError):
    """An input `predict` will not guess at; the message says why in one line."""


def open_image(data: bytes):
    """Encoded bytes -> a PIL image in mode L or RGB, upright, on white where it was transparent, 8-bit."""
    from PIL import Image, ImageOps

    im = Image.open(io.BytesIO(data))
    im.load()  # decodes now: truncated or corrupt files raise here
    im = ImageOps.exif_transpose(im)
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        lo, hi = (0.0, 65535.0) if im.mode.startswith("I;16") else (float(arr.min()), float(arr.max()))
        if im.mode in ("I", "F") and hi <= 255 and lo >= 0:
            lo, hi = 0.0, 255.0  # already 8-bit values in a wide container
        arr = (arr - lo) / max(hi - lo, 1e-12) * 255.0
        return Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8), mode="L")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode in ("L", "RGB") and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, rgba).convert("RGB")
    if im.mode not in ("L", "RGB"):
        im = im.convert("RGB")
    return im


def check_image_size(im, what: str) -> None:
    w, h = im.size
    if min(w, h) < MIN_IMAGE_SIDE:
        raise OutOfContract(f"{what} is {w}x{h} pixels: below {MIN_IMAGE_SIDE} on a side there is nothing to recognize")


def pad_square(im):
    """A PIL image padded (centred) to a square with the median colour of its border."""
    from PIL import Image

    w, h = im.size
    if w == h:
        return im
    arr = np.asarray(im)
    border = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]])
    fill = tuple(int(v) for v in np.median(border, axis=0)) if arr.ndim == 3 else int(np.median(border))
    side = max(w, h)
    square = Image.new(im.mode, (side, side), fill)
    square.paste(im, ((side - w) // 2, (side - h) // 2))
    return square


def glyph_like_training(gray: np.ndarray, source_side: int) -> np.ndarray:
    """A grayscale glyph (values 0..1) as the built-in digits show one: bright ink on a dark background,
    the ink filling the frame (cropped to its bounding box and padded square when it fills less than
    GLYPH_FILL of it). An image already at the training source size (`source_side` square) keeps its
    framing, so the training distribution itself passes through unchanged."""
    h, w = gray.shape
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    if np.median(border) > 0.5:  # light background: dark ink on paper
        gray = 1.0 - gray
    if (h, w) == (source_side, source_side):
        return gray
    background = float(np.median(np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])))
    ink = np.clip(gray - background, 0.0, 1.0)
    peak = float(ink.max())
    if peak <= 0.1:  # a blank image: nothing to re-frame
        return gray
    rows, cols = np.nonzero(ink > GLYPH_INK * peak)
    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    side = max(bottom - top, right - left)
    if side >= GLYPH_FILL * max(h, w):
        return ink
    side = int(np.ceil(side * GLYPH_MARGIN))
    out = np.zeros((side, side), dtype=np.float64)
    crop = ink[top:bottom, left:right]
    y0, x0 = (side - crop.shape[0]) // 2, (side - crop.shape[1]) // 2
    out[y0:y0 + crop.shape[0], x0:x0 + crop.shape[1]] = crop
    return out


def check_audio_length(samples: np.ndarray, sample_rate: int) -> None:
    """OutOfContract beyond MAX_AUDIO_SECONDS (the pieces of anything shorter: audio_segments.split_recording)."""
    seconds = len(samples) / sample_rate
    if seconds > MAX_AUDIO_SECONDS:
        raise OutOfContract(f"{seconds:.0f} s of audio: longer than the {MAX_AUDIO_SECONDS:.0f} s predict transcribes "
                            "(split the file)")
