"""Digit models judged on fonts training never saw, in every input style (BENCHMARKS.md section 12).

Writes the `e2e-dist data make-digits` images of the held-out font designs (and, for comparison, of
the training fonts) once, then runs each exported model over them through `predict`'s own code
path (load once, `predict_details` per file) and prints accuracy per style, models side by side
(the lit styles, shadowed-photo-96 and uneven-light-64, also as a row of their own), and how well
each model's confidence is calibrated on the held-out fonts: expected calibration error (ECE, 10
equal-width confidence bins) with the stored temperature and with none (1: the raw softmax), and
per bin the accuracy at that confidence:

    python benchmarks/vision_held_out.py glyphs=glyphs.safetensors digits=digits.safetensors \\
        [--held-out 0.25] [--seed 0] [--training-fonts] [--styles S ...]

--held-out / --seed must be the glyph run's data.held_out / data.seed (the preset's defaults).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import defaultdict

LIT_STYLES = ("shadowed-photo-96", "uneven-light-64")
BINS = 10


def score(model, cfg, files: list) -> tuple[dict[str, tuple[int, int]], list[tuple[float, bool]], float]:
    """style -> (right, total); (confidence, right) per file; and seconds per file."""
    from e2e_dist.predict import predict_details

    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    confident: list[tuple[float, bool]] = []
    t0 = time.perf_counter()
    for path, digit, style in files:
        pred = predict_details(model, cfg, str(path))
        right = pred.answer == str(digit)
        counts[style][0] += right
        counts[style][1] += 1
        confident.append((float(pred.confidence), right))
    return {s: (r, n) for s, (r, n) in counts.items()}, confident, (time.perf_counter() - t0) / max(len(files), 1)


def reliability(confident: list[tuple[float, bool]], bins: int = BINS) -> tuple[float, list[tuple[int, float, float]]]:
    """(ECE, [(count, mean confidence, accuracy) per confidence bin]): ECE is the count-weighted mean
    gap between a bin's confidence and its accuracy."""
    groups: list[list[tuple[float, bool]]] = [[] for _ in range(bins)]
    for p, right in confident:
        groups[min(int(p * bins), bins - 1)].append((p, right))
    rows = [(len(g), sum(p for p, _ in g) / len(g), sum(r for _, r in g) / len(g)) if g else (0, 0.0, 0.0)
            for g in groups]
    n = max(len(confident), 1)
    return sum(c * abs(conf - acc) for c, conf, acc in rows) / n, rows


def main(argv: list[str] | None = None) -> int:
    from e2e_dist.data.fonts import digit_fonts, split_fonts
    from e2e_dist.data.glyph_eval import STYLES, make_digit_styles
    from e2e_dist.predict import load_predictor

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+", metavar="NAME=EXPORTED")
    p.add_argument("--held-out", type=float, default=0.25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--training-fonts", action="store_true", help="also score the training fonts' images")
    p.add_argument("--styles", nargs="+", choices=STYLES, default=list(STYLES), metavar="STYLE")
    args = p.parse_args(argv)
    models = {name: load_predictor(path) for name, path in (m.split("=", 1) for m in args.models)}
    train, held = split_fonts(digit_fonts(), args.held_out, args.seed)
    sets = {"held-out fonts": held} | ({"training fonts": train} if args.training_fonts else {})
    print(f"fonts: {len(held)} held out ({', '.join(sorted({f.design for f in held}))}), {len(train)} for training")
    with tempfile.TemporaryDirectory(prefix="vision-held-out-") as tmp:
        for label, fonts in sets.items():
            files = make_digit_styles(f"{tmp}/{label.split()[0]}", fonts, styles=args.styles, seed=args.seed)
            results = {name: score(model, cfg, files) for name, (model, cfg) in models.items()}
            print(f"\n{label}: {len(fonts)} fonts x 10 digits per style\n")
            print("| style | " + " | ".join(models) + " |")
            print("|---|" + "---|" * len(models))

            def row(name: str, styles, bold: bool = False) -> None:
                cells = []
                for res, _, _ in results.values():
                    r, n = (sum(res[s][i] for s in styles) for i in (0, 1))
                    cells.append(f"**{r}/{n} ({r / n:.1%})**" if bold else f"{r}/{n} ({r / n:.0%})")
                print(f"| {name} | " + " | ".join(cells) + " |")

            for style in args.styles:
                row(style, [style])
            flat = [s for s in args.styles if s not in LIT_STYLES]
            lit = [s for s in args.styles if s in LIT_STYLES]
            if flat and lit:
                row(f"**{len(flat)} styles with flat light**", flat, bold=True)
                row(f"**{len(lit)} lit styles**", lit, bold=True)
            row("**all styles**", args.styles, bold=True)
            print("| ms per file | " + " | ".join(f"{s * 1000:.1f}" for _, _, s in results.values()) + " |")
            if label == "held-out fonts":
                calibration(models, files, results)
    return 0


def calibration(models: dict, files: list, results: dict) -> None:
    """ECE and reliability per model: its stored temperature (as `predict` reports) and none."""
    print(f"\ncalibration on the held-out fonts ({len(files)} images; ECE over {BINS} confidence bins)\n")
    for name, (model, cfg) in models.items():
        t = float(getattr(model, "temperature", 1.0))
        raw_conf = results[name][1]
        if t != 1.0:
            model.temperature.fill_(1.0)
            raw_conf = score(model, cfg, files)[1]
            model.temperature.fill_(t)
        for what, conf in ((f"{name}, temperature 1 (raw softmax)", raw_conf),
                           (f"{name}, temperature {t:.3f} (stored)", results[name][1])):
            ece, rows = reliability(conf)
            wrong = [p for p, r in conf if not r]
            print(f"{what}: ECE {ece:.3f}; mean confidence {sum(p for p, _ in conf) / len(conf):.3f}, "
                  f"accuracy {sum(r for _, r in conf) / len(conf):.3f}; on wrong answers mean confidence "
                  f"{sum(wrong) / max(len(wrong), 1):.2f}")
            print("  " + "; ".join(f"{b / BINS:.1f}-{(b + 1) / BINS:.1f}: {acc:.2f} of {c}"
                                   for b, (c, _, acc) in enumerate(rows) if c))


if __name__ == "__main__":
    sys.exit(main())
