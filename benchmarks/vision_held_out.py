"""Digit models judged on fonts training never saw, in every input style (BENCHMARKS.md section 12).

Writes the `e2e-dist data make-digits` images of the held-out font designs (and, for comparison, of
the training fonts) once, then runs each exported model over them through `predict`'s own code
path (load once, `predict_one` per file) and prints accuracy per style, models side by side:

    python benchmarks/vision_held_out.py glyphs=glyphs.safetensors digits=digits.safetensors \\
        [--held-out 0.25] [--seed 0] [--training-fonts]

--held-out / --seed must be the glyph run's data.held_out / data.seed (the preset's defaults).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import defaultdict


def score(exported: str, files: list) -> tuple[dict[str, tuple[int, int]], float]:
    """style -> (right, total) for one model; and seconds per file."""
    from e2e_dist.predict import load_predictor, predict_one

    model, cfg = load_predictor(exported)
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    t0 = time.perf_counter()
    for path, digit, style in files:
        counts[style][0] += predict_one(model, cfg, str(path)) == str(digit)
        counts[style][1] += 1
    return {s: (r, n) for s, (r, n) in counts.items()}, (time.perf_counter() - t0) / max(len(files), 1)


def main(argv: list[str] | None = None) -> int:
    from e2e_dist.data.fonts import digit_fonts, split_fonts
    from e2e_dist.data.glyph_eval import STYLES, make_digit_styles

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+", metavar="NAME=EXPORTED")
    p.add_argument("--held-out", type=float, default=0.25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--training-fonts", action="store_true", help="also score the training fonts' images")
    args = p.parse_args(argv)
    models = dict(m.split("=", 1) for m in args.models)
    train, held = split_fonts(digit_fonts(), args.held_out, args.seed)
    sets = {"held-out fonts": held} | ({"training fonts": train} if args.training_fonts else {})
    print(f"fonts: {len(held)} held out ({', '.join(sorted({f.design for f in held}))}), {len(train)} for training")
    with tempfile.TemporaryDirectory(prefix="vision-held-out-") as tmp:
        for label, fonts in sets.items():
            files = make_digit_styles(f"{tmp}/{label.split()[0]}", fonts, seed=args.seed)
            results = {name: score(path, files) for name, path in models.items()}
            print(f"\n{label}: {len(fonts)} fonts x 10 digits per style\n")
            print("| style | " + " | ".join(models) + " |")
            print("|---|" + "---|" * len(models))
            for style in STYLES:
                cells = [f"{r}/{n} ({r / n:.0%})" for r, n in (results[m][0][style] for m in models)]
                print(f"| {style} | " + " | ".join(cells) + " |")
            totals = [(sum(r for r, _ in res.values()), sum(n for _, n in res.values())) for res, _ in results.values()]
            print("| **all styles** | " + " | ".join(f"**{r}/{n} ({r / n:.1%})**" for r, n in totals) + " |")
            print("| ms per file | " + " | ".join(f"{s * 1000:.1f}" for _, s in results.values()) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
