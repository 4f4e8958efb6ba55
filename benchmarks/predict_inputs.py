"""Held-out digits re-encoded the ways users' files come, through `predict` (BENCHMARKS.md section 11).

Takes an exported tiny-vision model (trained on the built-in digits) and the run's data settings,
finds its validation digits (the same hash split training used), re-encodes each one per style
(inverted, ink in alpha, 16-bit, EXIF-rotated JPEG, letterboxed on white, small in a large RGB
JPEG) and reports accuracy per style two ways, side by side: the input contract of
e2e_dist/input_contract.py (what `predict` does now) and the plain decode it replaced
(`convert("L")` + resize). Usage:

    python benchmarks/predict_inputs.py EXPORTED.safetensors
"""

from __future__ import annotations

import argparse
import io
import sys

import numpy as np


def styles(g: np.ndarray) -> dict[str, bytes]:
    """One 8x8 digit (uint8, bright ink on black) in each style, encoded."""
    from PIL import Image

    def enc(im, fmt="PNG", **kw) -> bytes:
        buf = io.BytesIO()
        im.save(buf, format=fmt, **kw)
        return buf.getvalue()

    big = np.kron(g, np.ones((12, 12), np.uint8))  # 96 x 96
    out = {"original 8x8": enc(Image.fromarray(g, mode="L")),
           "inverted (dark on light)": enc(Image.fromarray(255 - g, mode="L"))}
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 3] = g
    out["ink in alpha (RGBA)"] = enc(Image.fromarray(rgba, mode="RGBA"))
    out["16-bit PNG"] = enc(Image.fromarray(g.astype(np.uint16) * 257))
    exif = Image.Exif()
    exif[0x0112] = 6
    out["EXIF-rotated JPEG"] = enc(Image.fromarray(np.rot90(big, 1).copy(), mode="L"), "JPEG", exif=exif, quality=95)
    canvas = np.full((120, 300), 255, np.uint8)
    canvas[12:108, 180:276] = 255 - big
    out["letterboxed, dark on white"] = enc(Image.fromarray(canvas, mode="L"))
    rgb = np.full((150, 200, 3), 240, np.uint8)
    small = np.kron(g, np.ones((4, 4), np.uint8))  # 32 x 32 in a 200 x 150 photo
    rgb[40:72, 60:92] = (240 - (small.astype(np.int32) * 200 // 255))[..., None].astype(np.uint8)
    out["small, RGB JPEG 200x150"] = enc(Image.fromarray(rgb, mode="RGB"), "JPEG", quality=90)
    return out


def plain_decode(data: bytes, size: int) -> np.ndarray:
    """The decode before the input contract: convert("L"), stretch to size, normalize."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        arr = np.asarray(im.convert("L").resize((size, size), Image.Resampling.BILINEAR), np.float32) / 255.0
    return ((arr - 0.5) / 0.5)[None]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("exported")
    args = ap.parse_args(argv)
    import tempfile
    from pathlib import Path

    import torch
    from PIL import Image

    from e2e_dist.data.common import split_by_hash
    from e2e_dist.data.images import cache_root, class_of, list_files, write_digits_folder
    from e2e_dist.predict import load_predictor, predict_details

    model, cfg = load_predictor(args.exported)
    root = write_digits_folder(cache_root() / "digits")
    files = list_files([str(root)], None, suffixes=(".png",))
    _, val = split_by_hash(files, val_fraction=cfg.data.val_fraction, seed=cfg.data.seed)
    counts: dict[str, list[int]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for item in val:
            label = class_of(item)
            g = np.asarray(Image.open(item.uri).convert("L"))
            for style, data in styles(g).items():
                path = Path(tmp) / "x.img"
                path.write_bytes(data)
                ours = predict_details(model, cfg, str(path)).answer == label
                with torch.no_grad():
                    plain = int(model.logits(torch.from_numpy(plain_decode(data, cfg.data.image_size))[None]).argmax()) == int(label)
                c = counts.setdefault(style, [0, 0, 0])
                c[0] += ours
                c[1] += plain
                c[2] += 1
    print(f"{len(val)} held-out digits (the run's val split), model {args.exported}")
    print("| style | predict now | plain decode (before) |")
    print("|---|---|---|")
    for style, (ours, plain, n) in counts.items():
        print(f"| {style} | {ours}/{n} ({ours / n:.0%}) | {plain}/{n} ({plain / n:.0%}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
