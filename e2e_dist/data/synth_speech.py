"""A small spoken-digits corpus synthesized offline with eSpeak NG: speech data that is never downloaded.

Each utterance is 1-3 digit words ("three one four") spoken by one of several eSpeak NG voices
and voice variants at a random speed and pitch, then given a random lead-in silence, loudness and
white noise at a random SNR. Files: `<out>/wavs/utt-00000.wav` (16-bit PCM at eSpeak's native
22,050 Hz, so loaders exercise resampling) and `<out>/manifest.jsonl` with one
`{"audio": "wavs/utt-00000.wav", "text": "three one four", ...}` line per file.

Needs the `espeak-ng` program (Debian/Ubuntu: `apt-get install espeak-ng`; the project's
`.ci/install-speech-deps.sh` does that). Everything random is drawn up front from one seeded
generator, so the same (n_utterances, seed) gives the same corpus whatever the thread timing.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from e2e_dist.errors import UserError

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


class SynthesisError(UserError):
    """eSpeak NG is missing or failed; the message says what to install or which call broke."""


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
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise SynthesisError(
            "espeak-ng not found on PATH: install it (Debian/Ubuntu: apt-get install espeak-ng, or run "
            ".ci/install-speech-deps.sh) to generate the spoken-digits corpus"
        )
    return exe


def split_variants(share: float, seed: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(training variants, held-out variants): round(share * n) variants, by a seeded hash of their
    names, never heard in training; a held-out voice is one of them in any accent."""
    import hashlib

    ranked = sorted(VARIANTS, key=lambda v: hashlib.sha256(f"{seed}:{v}".encode()).hexdigest())
    held = set(ranked[: min(len(VARIANTS) - 1, round(share * len(VARIANTS)))])
    return tuple(v for v in VARIANTS if v not in held), tuple(v for v in VARIANTS if v in held)


def plan_corpus(n_utterances: int, seed: int, min_words: int = 1, max_words: int = 3, *,
                variants: tuple[str, ...] = VARIANTS, speeds: tuple[int, int] = SPEEDS) -> list[UtterancePlan]:
    """What every utterance will be (text, voice, prosody, noise), drawn from one seeded generator:
    voices from `variants` (in every accent), speeds (words per minute) from the inclusive range."""
    if n_utterances < 1 or not 1 <= min_words <= max_words or not variants:
        raise ValueError(f"need n_utterances >= 1, 1 <= min_words <= max_words and some variants (got "
                         f"{n_utterances}, {min_words}, {max_words}, {len(variants)})")
    rng = np.random.default_rng(seed)
    plans = []
    for i in range(n_utterances):
        words = rng.choice(DIGIT_WORDS, size=int(rng.integers(min_words, max_words + 1)))
        plans.append(UtterancePlan(
            audio=f"wavs/utt-{i:05d}.wav",
            text=" ".join(words),
            voice=str(rng.choice(VOICES)) + str(rng.choice(variants)),
            speed=int(rng.integers(speeds[0], speeds[1] + 1)),
            pitch=int(rng.integers(PITCHES[0], PITCHES[1] + 1)),
            snr_db=round(float(rng.uniform(*SNR_DB)), 2),
            gain=round(float(rng.uniform(0.3, 0.9)), 3),
            lead_s=round(float(rng.uniform(0.0, 0.2)), 3),
            noise_seed=int(rng.integers(2**31)),
        ))
    return plans


def _speak(plan: UtterancePlan, target: Path, espeak: str) -> tuple[np.ndarray, int]:
    """eSpeak NG's mono samples for the plan's text, voice, speed and pitch."""
    import soundfile as sf

    raw = target.with_suffix(".raw.wav")
    cmd = [espeak, "-w", str(raw), "-v", plan.voice, "-s", str(plan.speed), "-p", str(plan.pitch), plan.text]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if proc.returncode != 0 or not raw.exists():
        msg = (proc.stderr or proc.stdout).strip().splitlines()
        why = msg[-1] if msg else f"exit {proc.returncode}"
        raise SynthesisError(f"espeak-ng failed for voice {plan.voice!r}: {why}")
    speech, sr = sf.read(raw, dtype="float32", always_2d=True)
    raw.unlink()
    speech = speech.mean(axis=1)
    if not speech.size:
        raise SynthesisError(f"espeak-ng produced no audio for {plan.text!r} (voice {plan.voice!r})")
    return speech, sr


def synthesize(plan: UtterancePlan, out_dir: Path, espeak: str, noise: bool = True,
               max_seconds: float | None = None) -> UtterancePlan:
    """Speak one planned utterance with eSpeak NG, add silence/gain/noise, write it as 16-bit WAV.
    max_seconds: a clip that would be longer (lead silence included) is spoken faster until it fits
    (what a model trained on clips of that length hears whole). Returns the plan as spoken."""
    import soundfile as sf

    target = out_dir / plan.audio
    speech, sr = _speak(plan, target, espeak)
    lead = int(plan.lead_s * sr)
    for _ in range(4):
        if max_seconds is None or lead + len(speech) <= max_seconds * sr or plan.speed >= MAX_SPEED:
            break
        faster = math.ceil(plan.speed * (lead + len(speech)) / (max_seconds * sr) * 1.05)
        plan = replace(plan, speed=min(MAX_SPEED, faster))
        speech, sr = _speak(plan, target, espeak)
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
                       speeds: tuple[int, int] = SPEEDS, max_seconds: float | None = None) -> Path:
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
    espeak = find_espeak()
    plans = plan_corpus(n_utterances, seed, min_words, max_words, variants=variants, speeds=speeds)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        (tmp / "wavs").mkdir()
        # espeak-ng is a subprocess: threads overlap its runs without fighting over the GIL.
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            plans = list(pool.map(lambda p: synthesize(p, tmp, espeak, noise, max_seconds), plans))
        with open(tmp / MANIFEST, "w") as f:
            for p in plans:
                row = {k: v for k, v in asdict(p).items() if k not in ("gain", "lead_s", "noise_seed")}
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
                         variants: tuple[str, ...] = VARIANTS, max_seconds: float | None = None) -> Path:
    """The manifest of the corpus in `out_dir`, generating it first if it is not there yet.

    Safe when several processes race (sweep trials): the loser of the final rename discards its copy.
    """
    out = Path(out_dir).expanduser().resolve()
    if (out / MANIFEST).is_file():
        return out / MANIFEST
    try:
        return make_speech_corpus(out, n_utterances, seed, variants=variants, max_seconds=max_seconds)
    except SynthesisError:
        if (out / MANIFEST).is_file():  # another process finished first
            return out / MANIFEST
        raise
    except OSError:
        if (out / MANIFEST).is_file():  # os.replace onto a directory another process just filled
            return out / MANIFEST
        raise
