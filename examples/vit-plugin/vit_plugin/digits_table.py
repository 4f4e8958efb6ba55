"""`python -m vit_plugin.digits_table OUT [--max N]`: a table to try `image-table` on.

Writes scikit-learn's 1,797 handwritten 8x8 digits as PNGs under OUT/digits/<digit>/ (with
e2e-dist's own `write_digits_folder`) and OUT/labels.csv listing them (path relative to OUT, label),
the first N in a seeded order when --max is given.
"""

from __future__ import annotations

import argparse
import csv
import random
from pathlib import Path


def write_digits_table(out: str | Path, max_rows: int | None = None, seed: int = 0) -> tuple[Path, int]:
    """OUT/labels.csv over OUT/digits (written once); returns the table's path and its rows."""
    from e2e_dist.data.images import write_digits_folder

    out = Path(out).expanduser().resolve()
    root = write_digits_folder(out / "digits")
    files = sorted(root.glob("*/*.png"))
    random.Random(seed).shuffle(files)  # a --max subset holds every digit
    table = out / "labels.csv"
    with open(table, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        w.writerows((p.relative_to(out).as_posix(), p.parent.name) for p in files[:max_rows])
    return table, len(files[:max_rows])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vit_plugin.digits_table", description=__doc__.splitlines()[0])
    p.add_argument("out", help="folder to write digits/ and labels.csv into")
    p.add_argument("--max", type=int, default=None, help="list only this many images (default: all 1,797)")
    args = p.parse_args(argv)
    table, rows = write_digits_table(args.out, args.max)
    print(f"wrote {table} ({rows} images)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
