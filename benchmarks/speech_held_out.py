"""Speech models judged on voices, synthesizers and rooms they never heard (BENCHMARKS.md section 12).

Synthesizes spoken digits, then transcribes every clip through `predict`'s own code path (load
once, `predict_one` per file) and prints character and word error rates, models side by side:

- eSpeak NG's held-out voice variants (`e2e-dist data make-speech --voices held-out`) at each
  speed, and the training variants for comparison;
- Festival's voices (diphone kal and ked, HTS slt): a synthesis program, two methods and three
  speakers that `data.synthesizers: [espeak-ng, flite]` never trains on; Flite's voices too (awb
  and rms are trained on, kal and slt are not: their speakers are Festival's);
- the held-out eSpeak and Festival clips in rooms: image-source impulse responses of random
  rectangular rooms (data/rooms.py `shoebox_rir`, a generator training never uses, seeded apart)
  at each RT60, and over a telephone line (300-3400 Hz band + 8-bit mu-law) and through Opus (a
  codec training never uses).

    python benchmarks/speech_held_out.py new=speech.safetensors [old=...] [--speeds 120 160 200] [-n 100]

--held-out / --split-seed must be the run's data.held_out / data.seed (the preset's defaults).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOM_SEED = 7_000
"""Seeds of the evaluation rooms: apart from anything training draws (row seeds hash the run seed)."""


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


def transformed(corpus: Path, out: Path, condition: str) -> Path:
    """A copy of `corpus` (same manifest) with every clip through `condition`: `room RT60` (an
    image-source room, one of 8 per RT60 and sample rate), `phone` (telephone band + mu-law), `opus`."""
    import soundfile as sf

    from e2e_dist.data.rooms import reverberate, shoebox_rir
    from e2e_dist.data.speech_augment import band_limit, codec_round_trip

    (out / "wavs").mkdir(parents=True)
    rooms: dict[int, list[np.ndarray]] = {}
    lines = (corpus / "manifest.jsonl").read_text().splitlines()
    for i, line in enumerate(lines):
        name = json.loads(line)["audio"]
        x, sr = sf.read(corpus / name, dtype="float32")
        if condition.startswith("room"):
            rt60 = float(condition.split()[1])
            if sr not in rooms:
                rooms[sr] = [shoebox_rir(np.random.default_rng((ROOM_SEED, int(rt60 * 1000), k)), sr, rt60)
                             for k in range(8)]
            # Same length as the dry clip (the echo of the last word is cut where the clip ends):
            # the rows measure the room, not how `predict` windows a clip longer than training's.
            y = reverberate(x, rooms[sr][i % 8])
        elif condition == "phone":
            y = codec_round_trip(band_limit(x, sr), sr, ("WAV", "ULAW"))
        elif condition == "opus":
            y = codec_round_trip(x, sr, ("OGG", "OPUS")) if sr in (8000, 16000, 48000) else _opus_at_16k(x, sr)
        else:
            raise ValueError(condition)
        sf.write(out / name, np.clip(y, -1, 1), sr, subtype="PCM_16")
    (out / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return out


def _opus_at_16k(x: np.ndarray, sr: int) -> np.ndarray:
    """Opus takes 8/12/16/24/48 kHz: through it at 16 kHz and back to the clip's own rate."""
    from scipy.signal import resample_poly

    from e2e_dist.data.speech_augment import codec_round_trip

    y = codec_round_trip(resample_poly(x, 16000, sr).astype(np.float32), 16000, ("OGG", "OPUS"))
    return resample_poly(y, sr, 16000).astype(np.float32)[: len(x)]


def main(argv: list[str] | None = None) -> int:
    from e2e_dist.data.synth_speech import SPEEDS, make_speech_corpus, split_variants
    from e2e_dist.data.synthesizers import FESTIVAL, FLITE

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+", metavar="NAME=EXPORTED")
    p.add_argument("--speeds", type=int, nargs="+", default=[120, 160, 200], help="words per minute")
    p.add_argument("-n", type=int, default=100, help="clips per row")
    p.add_argument("--rt60", type=float, nargs="+", default=[0.3, 0.6, 1.0], help="room reverberation times (s)")
    p.add_argument("--held-out", type=float, default=0.25)
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--only", nargs="+", choices=["espeak", "engines", "rooms"], default=["espeak", "engines", "rooms"])
    args = p.parse_args(argv)
    models = dict(m.split("=", 1) for m in args.models)
    train, held = split_variants(args.held_out, args.split_seed)
    print(f"voice variants: {len(held)} held out ({' '.join(held)}), {len(train)} for training; 8 accents")
    print("\n| voices | condition | " + " | ".join(f"{m} CER | {m} WER | {m} exact" for m in models) + " |")
    print("|---|---|" + "---|---|---|" * len(models))

    def row(label: str, condition: str, corpus: Path) -> None:
        cells = []
        for path in models.values():
            cer, wer, exact = score(path, corpus)
            cells += [f"{cer:.3f}", f"{wer:.3f}", f"{exact:.0%}"]
        print(f"| {label} | {condition} | " + " | ".join(cells) + " |", flush=True)

    with tempfile.TemporaryDirectory(prefix="speech-held-out-") as tmp:
        base = Path(tmp)
        if "espeak" in args.only:
            for label, variants in (("eSpeak held out", held), ("eSpeak training", train)):
                for i, speed in enumerate(args.speeds):
                    # seeds 1000+: not the training corpus's seed 0, so even "training" voices say new clips
                    corpus = make_speech_corpus(base / f"{label[7:11]}-{speed}", args.n, seed=1000 + i,
                                                variants=variants, speeds=(speed, speed)).parent
                    row(label, f"{speed} wpm", corpus)
        # Speeds across the training range (130-190 wpm), seeds 2000+.
        sets = {"Festival (held out)": (2000, FESTIVAL),
                "Flite awb, rms (trained)": (2001, FLITE[:2]), "Flite slt, kal (held out)": (2002, FLITE[2:])}
        corpora = {}
        if "engines" in args.only or "rooms" in args.only:
            for label, (seed, voices) in sets.items():
                if label.startswith("Flite") and "engines" not in args.only:
                    continue
                corpora[label] = make_speech_corpus(base / f"set-{seed}", args.n, seed=seed, variants=(),
                                                    voices=voices, speeds=SPEEDS, workers=2).parent
                if "engines" in args.only:
                    row(label, "dry", corpora[label])
        if "rooms" in args.only:
            corpora["eSpeak held out"] = make_speech_corpus(base / "held-mixed", args.n, seed=3000, variants=held,
                                                            speeds=SPEEDS).parent
            row("eSpeak held out", "dry, 130-190 wpm", corpora["eSpeak held out"])
            for label in ("eSpeak held out", "Festival (held out)"):
                for cond in [f"room {rt:g}" for rt in args.rt60] + ["phone", "opus"]:
                    out = base / f"{label[:6]}-{cond.replace(' ', '')}"
                    name = f"room RT60 {cond.split()[1]} s" if cond.startswith("room") else {
                        "phone": "telephone 300-3400 Hz + mu-law", "opus": "Opus"}[cond]
                    row(label, name, transformed(corpora[label], out, cond))
    return 0


if __name__ == "__main__":
    sys.exit(main())
