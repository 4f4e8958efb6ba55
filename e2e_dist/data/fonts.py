"""The fonts digit glyphs are rendered from, and which of them training may see.

Fonts are the ones installed on the machine: the Debian packages `make system-deps` adds
(.ci/install-font-deps.sh: Liberation, FreeFont, URW base35, TeX Gyre, Roboto, ...) plus the
DejaVu/STIX/Computer Modern files matplotlib ships, so a machine without root still has a few.

A font file is used only if its digits are digits: rendered "0".."9" must be ten different glyphs
and at least MIN_RECOGNIZED of them must look most like the same digit of the reference fonts
(DejaVu, which matplotlib always ships). That drops symbol and dingbat fonts and fonts without
digits (whose .notdef boxes all look alike).

Held-out fonts are chosen per *design*, not per file: a bold or italic file is the same design as
its regular, and metric clones of one design (Liberation Sans, Arimo, Nimbus Sans, FreeSans, TeX
Gyre Heros are all Helvetica) count as one, so an evaluation on held-out fonts never meets a
near-copy of a training font.
"""

from __future__ import annotations

import glob
import hashlib
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

FONT_DIRS = ("/usr/share/fonts", "/usr/local/share/fonts", "~/.local/share/fonts", "~/.fonts")
FONT_SUFFIXES = (".ttf", ".otf", ".TTF", ".OTF")
MIN_RECOGNIZED = 8
"""Of the ten digits, how many must match the reference fonts' same digit for a font to count."""
REFERENCE_FILES = ("DejaVuSans.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf", "DejaVuSans-Bold.ttf")

DESIGNS = {
    # Metric clones and derivatives: one design each (families not listed: their first word).
    "helvetica": ("Liberation Sans", "Arimo", "Nimbus Sans", "FreeSans", "TeX Gyre Heros"),
    "times": ("Liberation Serif", "Tinos", "Nimbus Roman", "FreeSerif", "TeX Gyre Termes", "STIXGeneral"),
    "courier": ("Liberation Mono", "Cousine", "Nimbus Mono", "FreeMono", "TeX Gyre Cursor"),
    "palatino": ("P052", "TeX Gyre Pagella"),
    "century-schoolbook": ("C059", "TeX Gyre Schola"),
    "bookman": ("URW Bookman", "TeX Gyre Bonum"),
    "avant-garde": ("URW Gothic", "TeX Gyre Adventor"),
    "zapf-chancery": ("Z003", "TeX Gyre Chorus"),
    "computer-modern": ("cm",),
    "dejavu": ("DejaVu", "Hack"),  # Hack is DejaVu Sans Mono reworked
    "libertine": ("Linux Libertine", "Linux Biolinum"),
    "calibri": ("Carlito",),
}


@dataclass(frozen=True)
class Font:
    path: str
    family: str
    style: str

    @property
    def design(self) -> str:
        return design_of(self.family)

    @property
    def key(self) -> str:
        """Stable across machines: the file's name (paths differ between distributions)."""
        return os.path.basename(self.path)


def design_of(family: str) -> str:
    """Families of one design (a clone, a weight, a width) -> one name; else the family's first word."""
    for design, prefixes in DESIGNS.items():
        if any(family == p or family.startswith(p) for p in prefixes):
            return design
    return family.split()[0].lower()


def candidate_files() -> list[str]:
    """Every TrueType/OpenType file in the font folders and matplotlib's, sorted, by file name once."""
    import matplotlib

    dirs = [Path(d).expanduser() for d in FONT_DIRS] + [Path(matplotlib.__file__).parent / "mpl-data" / "fonts" / "ttf"]
    seen: dict[str, str] = {}
    for d in dirs:
        for path in sorted(glob.glob(str(d / "**" / "*"), recursive=True)):
            if path.endswith(FONT_SUFFIXES) and os.path.basename(path) not in seen:
                seen[os.path.basename(path)] = path
    return sorted(seen.values(), key=os.path.basename)


def render_centered(font, char: str, side: int) -> np.ndarray:
    """`char` in `font`, white on black, centred on a side x side canvas (uint8)."""
    from PIL import Image, ImageDraw

    im = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(im)
    left, top, right, bottom = draw.textbbox((0, 0), char, font=font)
    draw.text(((side - (right - left)) / 2 - left, (side - (bottom - top)) / 2 - top), char, font=font, fill=255)
    return np.asarray(im)


def glyph_signature(pixels: np.ndarray) -> np.ndarray | None:
    """Ink cropped, padded square, 16x16, blurred, zero-mean unit vector; None for a blank glyph."""
    from PIL import Image, ImageFilter

    from e2e_dist.data.glyph_augment import crop_to_ink

    crop = crop_to_ink(pixels, 60)
    if crop is None:
        return None
    side = max(crop.shape)
    square = np.zeros((side, side), np.uint8)
    y, x = (side - crop.shape[0]) // 2, (side - crop.shape[1]) // 2
    square[y:y + crop.shape[0], x:x + crop.shape[1]] = crop
    small = Image.fromarray(square).resize((16, 16), Image.Resampling.BILINEAR).filter(ImageFilter.GaussianBlur(1))
    v = np.asarray(small, np.float32).ravel()
    v -= v.mean()
    norm = float(np.linalg.norm(v))
    return v / norm if norm > 0 else None


def _digit_signatures(path: str) -> list[np.ndarray | None]:
    from PIL import ImageFont

    font = ImageFont.truetype(path, 48)
    return [glyph_signature(render_centered(font, str(d), 64)) for d in range(10)]


def digits_look_like_digits(path: str, references: list[tuple[int, np.ndarray]]) -> bool:
    sigs = _digit_signatures(path)
    if any(s is None for s in sigs) or len({s.tobytes() for s in sigs}) < 10:
        return False
    ref_digits = np.array([d for d, _ in references])
    ref = np.stack([s for _, s in references])
    nearest = [int(ref_digits[int(np.argmax(ref @ s))]) for s in sigs]
    return sum(n == d for d, n in enumerate(nearest)) >= MIN_RECOGNIZED


@lru_cache(maxsize=4)
def _digit_fonts(files: tuple[str, ...]) -> tuple[Font, ...]:
    from PIL import ImageFont

    by_name = {os.path.basename(p): p for p in files}
    references = [(d, s) for name in REFERENCE_FILES if name in by_name
                  for d, s in enumerate(_digit_signatures(by_name[name])) if s is not None]
    fonts = []
    for path in files:
        try:
            family, style = ImageFont.truetype(path, 12).getname()
            ok = digits_look_like_digits(path, references) if references else True
        except OSError:  # unreadable font file: not ours to fix
            continue
        if ok and family:
            fonts.append(Font(path=path, family=family, style=style or ""))
    return tuple(fonts)


def digit_fonts() -> list[Font]:
    """The installed fonts whose digits are digits (about a second for ~200 files; cached per process)."""
    return list(_digit_fonts(tuple(candidate_files())))


def held_out_designs(designs: list[str], share: float, seed: int) -> set[str]:
    """round(share * n) designs (at least one when share > 0 and there are two), chosen by a seeded
    hash of the design's name: the same on every machine that has the same designs."""
    designs = sorted(set(designs))
    k = min(len(designs) - 1, max(1 if share > 0 and len(designs) > 1 else 0, round(share * len(designs))))
    ranked = sorted(designs, key=lambda d: hashlib.sha256(f"{seed}:{d}".encode()).hexdigest())
    return set(ranked[:k])


def split_fonts(fonts: list[Font], share: float, seed: int) -> tuple[list[Font], list[Font]]:
    """(training fonts, held-out fonts): whole designs held out."""
    held = held_out_designs([f.design for f in fonts], share, seed)
    return [f for f in fonts if f.design not in held], [f for f in fonts if f.design in held]
