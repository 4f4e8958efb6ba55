"""A small spoken-digits corpus synthesized offline: speech data that is never downloaded.

Each utterance is 1-3 digit words ("three one four") spoken by one of eSpeak NG's voices and voice
variants, or (with `voices`, a `voice_share` of the clips) by a voice of another synthesizer
(data/synthesizers.py: Flite, Festival), at a random speed and pitch, then given a random lead-in
silence, loudness and white noise at a random SNR. Files: `<out>/wavs/utt-00000.wav` (16-bit PCM
at the engine's native rate: 22,050 Hz for eSpeak, 8-32 kHz for the others, so loaders exercise
resampling) and `<out>/manifest.jsonl` with one `{"audio": "wavs/utt-00000.wav", "text": "three
one four", "voice": ..., "engine": ..., ...}` line per file.

Needs the `espeak-ng` program and the other engines used (Debian/Ubuntu packages: the project's
`.ci/install-speech-deps.sh` installs them). Everything random is drawn up front from one seeded
generator, so the same (n_utterances, seed) gives the same corpus whatever the thread timing; with
no other voices, the same corpus as before they existed.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from e2e_dist.data.synthesizers import SynthesisError, Voice, find_engine, speak_samples, voice_from_label

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Accents shipped with espeak-ng's own data (no mbrola voices: those need extra packages).
VOICES = ("en-us", "en-gb", "en-gb-scotland", "en-029", "en-gb-x-rp", "en-us-nyc", "en-gb-x-gbclan",
          "en-gb-x-gbcwmd")
VARIANTS = tuple(f"+{v}" for v in (
    "m1 m2 m3 m4 m5 m6 m7 m8 f1 f2 f3 f4 f5 klatt klatt2 klatt3 klatt4 klatt5 klatt6 croak adam Alex Alicia "
    "Andrea Andy Annie antonio aunty belinda benjamin boris caleb david Denis Diogo ed edward edward2 Gene Gene2 "
    "gustave Henrique Hugo iven iven2 iven3 iven4 Jacky john kaukovalta Lee linda marcelo Marco Mario max Michael "
    "michel miguel Mike Nguyen pablo paul pedro quincy rob robert steph steph2 steph3 Storm Tweaky zac anika "
    "AnxiousAndy grandpa grandma norbert sandro shelby travis victor").split())
"""eSpeak NG's voice variants (timbre, pitch range, breathiness), by file name: all that ship with it
except the robotic and effect ones (robosoft*, UniRobot, announcer, Demonic, RicishayMax*) and the
whispers (no voicing at all). A voice is an accent + a variant."""
SPEEDS = (130, 190)
"""Words per minute, inclusive range."""
MAX_SPEED = 450
"""eSpeak NG's fastest speed (words per minute)."""
PITCHES = (25, 75)
"""eSpeak pitch (0-99), inclusive range."""
SNR_DB = (12.0, 30.0)
"""Signal-to-noise ratio of the added white noise, in dB."""
MANIFEST = "manifest.jsonl"


@dataclass(frozen=True)
class UtterancePlan:
    audio: str
    text: str
    voice: str
    speed: int
    pitch: int
    snr_db: float
    gain: float
    lead_s: float
    noise_seed: int


def find_espeak() -> str:
    """Path of the espeak-ng executable, or SynthesisError saying how to install it."""
    return find_engine("espeak-ng")


def split_variants(share: float, seed: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(training variants, held-out variants): round(share * n) variants, by a seeded hash of their
    names, never heard in training; a held-out voice is one of them in any accent."""
    import hashlib

    ranked = sorted(VARIANTS, key=lambda v: hashlib.sha256(f"{seed}:{v}".encode()).hexdigest())
    held = set(ranked[: min(len(VARIANTS) - 1, round(share * len(VARIANTS)))])
    return tuple(v for v in VARIANTS if v not in held), tuple(v for v in VARIANTS if v in held)


def corpus_voices(which: str, held_out: float, split_seed: int,
                  synthesizers: Sequence[str]) -> tuple[tuple[str, ...], tuple[Voice, ...]]:
    """(eSpeak variants, other voices) of `data make-speech --voices WHICH` for a run with these
    data.held_out, data.seed and data.synthesizers: `training` (what it trains on), `held-out` (the
    eSpeak variants it never hears) or `held-out-synthesizers` (the engines it never hears)."""
    from e2e_dist.data.synthesizers import ENGINES, engine_voices, training_voices

    train, held = split_variants(held_out, split_seed)
    others = tuple(e for e in ENGINES if e not in synthesizers)
    if which == "held-out-synthesizers":
        if not others:
            raise SynthesisError("--voices held-out-synthesizers: the run trains on every synthesizer")
        return (), tuple(v for e in others for v in engine_voices(e))
    if which == "held-out":
        if not held:
            raise SynthesisError(f"--voices held-out: --held-out {held_out} holds out no voice variant")
        return held, ()
    return (train if "espeak-ng" in synthesizers else ()), training_voices(tuple(synthesizers), others)


def plan_corpus(n_utterances: int, seed: int, min_words: int = 1, max_words: int = 3, *,
                variants: tuple[str, ...] = VARIANTS, speeds: tuple[int, int] = SPEEDS,
                voices: tuple[Voice, ...] = (), voice_share: float = 0.0) -> list[UtterancePlan]:
    """What every utterance will be (text, voice, prosody, noise), drawn from one seeded generator:
    eSpeak voices from `variants` (in every accent), or with chance `voice_share` (always, with no
    variants) one of `voices`; speeds (words per minute) from the inclusive range."""
    if n_utterances < 1 or not 1 <= min_words <= max_words or not (variants or voices):
        raise ValueError(f"need n_utterances >= 1, 1 <= min_words <= max_words and some voices (got "
                         f"{n_utterances}, {min_words}, {max_words}, {len(variants)} + {len(voices)})")
    rng = np.random.default_rng(seed)
    plans = []
    for i in range(n_utterances):
        words = rng.choice(DIGIT_WORDS, size=int(rng.integers(min_words, max_words + 1)))
        # Drawn only when there are other voices: an eSpeak-only corpus stays what it always was.
        other = bool(voices) and (not variants or rng.random() < voice_share)
        voice = (voices[int(rng.integers(len(voices)))].label if other
                 else str(rng.choice(VOICES)) + str(rng.choice(variants)))
        plans.append(UtterancePlan(
            audio=f"wavs/utt-{i:05d}.wav",
            text=" ".join(words),
            voice=voice,
            speed=int(rng.integers(speeds[0], speeds[1] + 1)),
            pitch=int(rng.integers(PITCHES[0], PITCHES[1] + 1)),
            snr_db=round(float(rng.uniform(*SNR_DB)), 2),
            gain=round(float(rng.uniform(0.3, 0.9)), 3),
            lead_s=round(float(rng.uniform(0.0, 0.2)), 3),
            noise_seed=int(rng.integers(2**31)),
        ))
    return plans


def _speak(plan: UtterancePlan, target: Path) -> tuple[np.ndarray, int]:
    """The plan's voice's mono samples for its text, speed and pitch."""
    return speak_samples(voice_from_label(plan.voice), plan.text, plan.speed, plan.pitch, target.with_suffix(".raw.wav"))


def synthesize(plan: UtterancePlan, out_dir: Path, noise: bool = True,
               max_seconds: float | None = None) -> UtterancePlan:
    """Speak one planned utterance, add silence/gain/noise, write it as 16-bit WAV.
    max_seconds: a clip that would be longer (lead silence included) is spoken faster until it fits
    (what a model trained on clips of that length hears whole). Returns the plan as spoken."""
    import soundfile as sf

    target = out_dir / plan.audio
    speech, sr = _speak(plan, target)
    lead = int(plan.lead_s * sr)
    for _ in range(4):
        if max_seconds is None or lead + len(speech) <= max_seconds * sr or plan.speed >= MAX_SPEED:
            break
        faster = math.ceil(plan.speed * (lead + len(speech)) / (max_seconds * sr) * 1.05)
        plan = replace(plan, speed=min(MAX_SPEED, faster))
        speech, sr = _speak(plan, target)
    x = np.concatenate([np.zeros(lead, np.float32), speech])
    x = x * (plan.gain / max(float(np.abs(x).max()), 1e-6))
    if noise:
        # White noise at the planned SNR relative to the speech's RMS power.
        rms = float(np.sqrt(np.mean(speech ** 2))) * plan.gain / max(float(np.abs(speech).max()), 1e-6)
        x = x + np.random.default_rng(plan.noise_seed).normal(0.0, rms / 10 ** (plan.snr_db / 20), x.shape)
    sf.write(target, np.clip(x, -1.0, 1.0).astype(np.float32), sr, subtype="PCM_16")
    return plan


def make_speech_corpus(out_dir: str | os.PathLike, n_utterances: int = 600, seed: int = 0, *,
                       min_words: int = 1, max_words: int = 3, noise: bool = True, overwrite: bool = False,
                       workers: int = 4, variants: tuple[str, ...] = VARIANTS,
                       speeds: tuple[int, int] = SPEEDS, max_seconds: float | None = None,
                       voices: tuple[Voice, ...] = (), voice_share: float = 0.0) -> Path:
    """Synthesize `n_utterances` spoken digit sequences into `out_dir`; returns the manifest's path.
    max_seconds: no clip longer (those that would be are spoken faster: `synthesize`).

    The corpus is built in a sibling temporary directory and moved into place at the end, so a
    crash or a concurrent caller never leaves a half-written corpus behind. `out_dir` must not
    exist yet, be empty, or (with overwrite) hold a previous corpus that gets replaced.
    """
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise SynthesisError(f"{out} already exists and is not empty (choose a new directory or overwrite it)")
    plans = plan_corpus(n_utterances, seed, min_words, max_words, variants=variants, speeds=speeds, voices=voices,
                        voice_share=voice_share)
    for engine in sorted({voice_from_label(p.voice).engine for p in plans}):
        find_engine(engine)  # a missing program is one line before any work
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        (tmp / "wavs").mkdir()
        # The synthesizers are subprocesses: threads overlap their runs without fighting over the GIL.
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            plans = list(pool.map(lambda p: synthesize(p, tmp, noise, max_seconds), plans))
        with open(tmp / MANIFEST, "w") as f:
            for p in plans:
                row = {k: v for k, v in asdict(p).items() if k not in ("gain", "lead_s", "noise_seed")}
                voice = voice_from_label(p.voice)
                row.update(engine=voice.engine, method=voice.method)
                f.write(json.dumps(row) + "\n")
        if out.exists() and overwrite:
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        # Atomic on one filesystem; fails (OSError) if another process filled `out` meanwhile.
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out / MANIFEST


def ensure_speech_corpus(out_dir: str | os.PathLike, n_utterances: int = 600, seed: int = 0, *,
                         variants: tuple[str, ...] = VARIANTS, max_seconds: float | None = None,
                         voices: tuple[Voice, ...] = (), voice_share: float = 0.0) -> Path:
    """The manifest of the corpus in `out_dir`, generating it first if it is not there yet.

    Safe when several processes race (sweep trials): the loser of the final rename discards its copy.
    """
    out = Path(out_dir).expanduser().resolve()
    if (out / MANIFEST).is_file():
        return out / MANIFEST
    try:
        return make_speech_corpus(out, n_utterances, seed, variants=variants, max_seconds=max_seconds, voices=voices,
                                  voice_share=voice_share)
    except SynthesisError:
        if (out / MANIFEST).is_file():  # another process finished first
            return out / MANIFEST
        raise
    except OSError:
        if (out / MANIFEST).is_file():  # os.replace onto a directory another process just filled
            return out / MANIFEST
        raise
