"""Speech models judged on voices they never heard, at three speeds (BENCHMARKS.md section 12).

Synthesizes spoken digits with the held-out eSpeak NG voice variants (`e2e-dist data make-speech
--voices held-out`) at each speed, and the same with the training variants for comparison, then
transcribes every clip through `predict`'s own code path (load once, `predict_one` per file) and
prints the character and word error rates, models side by side:

    python benchmarks/speech_held_out.py mel=speech.safetensors [--speeds 120 160 200] [-n 100]

--held-out / --split-seed must be the run's data.held_out / data.seed (the preset's defaults).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path


def score(exported: str, corpus: Path) -> tuple[float, float, float]:
    """(CER, WER, exact-match share) of one model on one corpus."""
    from e2e_dist.data.speech import normalize_transcript
    from e2e_dist.models.ctc_speech import edit_distance
    from e2e_dist.predict import load_predictor, predict_one

    model, cfg = load_predictor(exported)
    rows = [json.loads(line) for line in (corpus / "manifest.jsonl").read_text().splitlines()]
    chars = char_edits = words = word_edits = exact = 0
    for row in rows:
        ref = normalize_transcript(row["text"], model.alphabet)[0]
        hyp = predict_one(model, cfg, str(corpus / row["audio"]))
        chars, char_edits = chars + len(ref), char_edits + edit_distance(hyp, ref)
        words, word_edits = words + len(ref.split()), word_edits + edit_distance(hyp.split(), ref.split())
        exact += hyp == ref
    return char_edits / chars, word_edits / words, exact / len(rows)


def main(argv: list[str] | None = None) -> int:
    from e2e_dist.data.synth_speech import make_speech_corpus, split_variants

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+", metavar="NAME=EXPORTED")
    p.add_argument("--speeds", type=int, nargs="+", default=[120, 160, 200], help="words per minute")
    p.add_argument("-n", type=int, default=100, help="clips per speed and voice set")
    p.add_argument("--held-out", type=float, default=0.25)
    p.add_argument("--split-seed", type=int, default=0)
    args = p.parse_args(argv)
    models = dict(m.split("=", 1) for m in args.models)
    train, held = split_variants(args.held_out, args.split_seed)
    print(f"voice variants: {len(held)} held out ({' '.join(held)}), {len(train)} for training; 8 accents")
    print("\n| voices | speed (wpm) | " + " | ".join(f"{m} CER | {m} WER | {m} exact" for m in models) + " |")
    print("|---|---|" + "---|---|---|" * len(models))
    with tempfile.TemporaryDirectory(prefix="speech-held-out-") as tmp:
        for label, variants in (("held out", held), ("training", train)):
            for i, speed in enumerate(args.speeds):
                # seeds 1000+: not the training corpus's seed 0, so even "training" voices say new clips
                corpus = make_speech_corpus(Path(tmp) / f"{label[:4]}-{speed}", args.n, seed=1000 + i,
                                            variants=variants, speeds=(speed, speed)).parent
                cells = []
                for path in models.values():
                    cer, wer, exact = score(path, corpus)
                    cells += [f"{cer:.3f}", f"{wer:.3f}", f"{exact:.0%}"]
                print(f"| {label} | {speed} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
