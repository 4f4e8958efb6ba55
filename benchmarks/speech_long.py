"""Long recordings through `predict`, and whether its confidence warns (BENCHMARKS.md section 12, issue 33).

Synthesizes spoken-digit clips with voices training never heard (`e2e-dist data make-speech
--voices held-out`, speeds 120-200 words per minute), transcribes each alone through `predict`'s
code path, then joins them into recordings of up to --minutes each with pauses of four kinds and
transcribes those through the same path:

- natural: 0.3-1.5 s of the clips' own noise between clips;
- short: 0.1-0.25 s, each clip trimmed to its speech first;
- none: 0-0.05 s, trimmed (words of two clips run into each other);
- mixed: each pause one of the three.

Prints the CER of the recordings next to the same clips alone (and next to the fixed windows predict
cut before), then the clips alone by confidence decile: CER, exact transcripts and each decile's
share of all character errors, for predict's confidence and for the one it printed before (the
greedy path's geometric-mean frame probability):

    python benchmarks/speech_long.py speech.safetensors [-n 300] [--minutes 5]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PAUSES = {"natural": (0.3, 1.5), "short": (0.1, 0.25), "none": (0.0, 0.05)}


def trimmed(x: np.ndarray, hop: int = 80) -> np.ndarray:
    """The clip without its leading and trailing background: from 50 ms before its first to 50 ms after
    its last 10 ms frame louder than twice the noise (6 dB up: a fricative's onset stays)."""
    n = len(x) // hop
    rms = np.sqrt((x[: n * hop].reshape(n, hop) ** 2).mean(axis=1)) if n else np.zeros(0)
    loud = np.flatnonzero(rms > 2 * noise_level(x, hop))
    if not len(loud):
        return x
    return x[max(0, loud[0] * hop - 5 * hop): (loud[-1] + 1) * hop + 5 * hop]


def noise_level(x: np.ndarray, hop: int = 80) -> float:
    """The clip's background noise: the 5th percentile of its 10 ms frames' RMS."""
    n = len(x) // hop
    return float(np.percentile(np.sqrt((x[: n * hop].reshape(n, hop) ** 2).mean(axis=1)), 5)) if n else 0.0


def recordings(clips: list[np.ndarray], refs: list[str], kind: str, rate: int, minutes: float,
               rng: np.random.Generator) -> list[tuple[np.ndarray, str]]:
    """The clips in order, joined with `kind` pauses into recordings of at most `minutes`. One
    recording has one background: each clip is scaled so its noise is at the clips' median noise
    level (its own signal-to-noise ratio kept: speakers nearer and farther in one room), and the
    pauses are that noise."""
    floor = float(np.median([noise_level(x) for x in clips]))
    out, parts, texts, seconds = [], [], [], 0.0
    for x, ref in zip(clips, refs):
        style = rng.choice(list(PAUSES)) if kind == "mixed" else kind
        x = x * (floor / max(noise_level(x), 1e-9))
        x = x if style == "natural" else trimmed(x)
        gap = rng.normal(0.0, floor, int(rng.uniform(*PAUSES[style]) * rate)).astype(np.float32)
        if seconds + (len(x) + len(gap)) / rate > minutes * 60 and parts:
            out.append((np.concatenate(parts), " ".join(texts)))
            parts, texts, seconds = [], [], 0.0
        parts += [x, gap]
        texts.append(ref)
        seconds += (len(x) + len(gap)) / rate
    out.append((np.concatenate(parts), " ".join(texts)))
    return out


def fixed_windows(model, samples: np.ndarray, rate: int, window_s: float) -> str:
    """What predict did before issue 33: windows of window_s cut at the quietest 20 ms in each one's
    last third, transcribed one by one, the texts joined with spaces."""
    import torch

    from e2e_dist.models.ctc_speech import greedy_decode

    window, frame, texts, start = int(window_s * rate), rate // 50, [], 0
    pieces = []
    while len(samples) - start > window:
        seg = samples[start + (2 * window) // 3: start + window]
        n = len(seg) // frame
        cut = start + (2 * window) // 3 + int(np.argmin((seg[: n * frame].reshape(n, frame) ** 2).mean(1))) * frame
        pieces.append(samples[start:cut + frame // 2])
        start = cut + frame // 2
    pieces.append(samples[start:])
    with torch.no_grad():
        for w in pieces:
            lp, frames = model.log_probs(torch.from_numpy(w)[None], torch.tensor([len(w)]))
            texts.append(greedy_decode(lp.argmax(-1), frames, model.alphabet)[0])
    return " ".join(t for t in texts if t)


def old_confidence(model, samples: np.ndarray) -> float:
    """predict's confidence before issue 33: exp(mean over all frames of the best class's log-probability)."""
    import torch

    with torch.no_grad():
        lp, frames = model.log_probs(torch.from_numpy(samples)[None], torch.tensor([len(samples)]))
    return float(lp[0, : int(frames[0])].max(-1).values.mean().exp())


def deciles(conf: list[float], edits: list[int], chars: list[int], exact: list[bool]) -> list[str]:
    """Markdown rows: the clips by confidence, lowest tenth first."""
    order = np.argsort(conf, kind="stable")
    total = max(sum(edits), 1)
    rows = []
    for k, idx in enumerate(np.array_split(order, 10), 1):
        e, c = sum(edits[i] for i in idx), sum(chars[i] for i in idx)
        rows.append(f"| {k} | {conf[idx[0]]:.2f}-{conf[idx[-1]]:.2f} | {np.mean([conf[i] for i in idx]):.2f} | "
                    f"{np.mean([exact[i] for i in idx]):.0%} | {e / max(c, 1):.3f} | {e / total:.0%} |")
    return rows


def main(argv: list[str] | None = None) -> int:
    from e2e_dist.data.speech import decode_audio, normalize_transcript
    from e2e_dist.data.synth_speech import make_speech_corpus, split_variants
    from e2e_dist.models.ctc_speech import edit_distance
    from e2e_dist.predict import load_predictor, predict_details

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("exported")
    p.add_argument("-n", type=int, default=300, help="clips")
    p.add_argument("--minutes", type=float, default=5.0, help="longest recording")
    p.add_argument("--speeds", type=int, nargs=2, default=[120, 200], help="words per minute, inclusive range")
    p.add_argument("--voices", choices=["held-out", "training"], default="held-out")
    p.add_argument("--held-out", type=float, default=0.25)
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--seed", type=int, default=3000, help="corpus seed (training's corpus is seed 0)")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)  # timings comparable on a shared machine: one core
    model, cfg = load_predictor(args.exported)
    rate = cfg.data.sample_rate
    print(f"confidence temperature {float(getattr(model, 'confidence_temperature', 1.0)):.3f}")
    train, held = split_variants(args.held_out, args.split_seed)
    tmp = tempfile.TemporaryDirectory(prefix="speech-long-")
    corpus = make_speech_corpus(Path(tmp.name) / "clips", args.n, seed=args.seed, speeds=tuple(args.speeds),
                                variants=held if args.voices == "held-out" else train).parent
    rows = [json.loads(line) for line in (corpus / "manifest.jsonl").read_text().splitlines()]
    clips = [decode_audio((corpus / r["audio"]).read_bytes(), rate) for r in rows]
    refs = [normalize_transcript(r["text"], model.alphabet)[0] for r in rows]

    def transcribe(x: np.ndarray):
        import soundfile as sf

        path = Path(tmp.name) / "recording.wav"
        sf.write(path, x, rate, subtype="FLOAT")  # float WAV: what predict hears is what was joined
        return predict_details(model, cfg, str(path))

    alone = [transcribe(x) for x in clips]
    edits = [edit_distance(a.answer, r) for a, r in zip(alone, refs)]
    chars = [len(r) for r in refs]
    cer_alone = sum(edits) / sum(chars)
    seconds = sum(len(x) for x in clips) / rate
    print(f"\n{len(clips)} clips, {seconds:.0f} s, voices {args.voices}, {args.speeds[0]}-{args.speeds[1]} wpm: "
          f"CER alone {cer_alone:.4f}, exact {np.mean([a.answer == r for a, r in zip(alone, refs)]):.0%}")
    print("\n| pauses | recordings | minutes | pieces | CER | / alone | fixed windows (before) CER | / alone | s per min |")
    print("|---|---|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(args.seed)
    for kind in [*PAUSES, "mixed"]:
        recs = recordings(clips, refs, kind, rate, args.minutes, rng)
        e = eb = c = pieces = 0
        t0, total = time.perf_counter(), sum(len(x) for x, _ in recs) / rate
        for x, ref in recs:
            got = transcribe(x)
            pieces += int(got.details.split("pieces=")[1].split()[0]) if "pieces=" in got.details else 1
            e, c = e + edit_distance(got.answer, ref), c + len(ref)
        wall = time.perf_counter() - t0
        eb = sum(edit_distance(fixed_windows(model, x, rate, cfg.data.max_audio_seconds), ref) for x, ref in recs)
        print(f"| {kind} | {len(recs)} | {total / 60:.1f} | {pieces} | {e / c:.4f} | {e / c / cer_alone:.2f}x | "
              f"{eb / c:.4f} | {eb / c / cer_alone:.2f}x | {wall / (total / 60):.1f} |", flush=True)
    exact = [a.answer == r for a, r in zip(alone, refs)]
    for name, conf in (("predict's confidence", [a.confidence for a in alone]),
                       ("before (geometric mean over frames)", [old_confidence(model, x) for x in clips])):
        print(f"\n{name}, clips alone by decile (1 = least sure):\n\n"
              "| decile | confidence | mean | exact | CER | share of errors |\n|---|---|---|---|---|---|")
        print("\n".join(deciles(conf, edits, chars, exact)))
    worst = sorted(edits, reverse=True)[: len(edits) // 10]
    print(f"\nthe most a decile can hold: {sum(worst) / max(sum(edits), 1):.0%} of the errors (the tenth of clips with most)")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
