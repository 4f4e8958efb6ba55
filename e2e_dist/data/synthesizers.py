"""Speech synthesizers the corpus can speak with, all offline programs from Debian packages.

Three engines, four synthesis methods, so a model can be judged on a METHOD it never heard:

    espeak-ng  formant synthesis (Klatt-style rules), 82 voice variants x 8 English accents
    flite      CMU Flite: clustergen statistical-parametric voices awb, rms, slt; diphone kal
    festival   Festival: residual-excited LPC diphone voices kal, ked; HTS voice slt (32 kHz)

A `Voice` names its engine, the engine's voice name, the method and the SPEAKER whose recordings
it was built from: Flite's kal is Festival's kal diphone database, Flite's slt and Festival's HTS
slt are one woman's recordings (CMU ARCTIC), so a held-out engine also holds its speakers out of
training (`training_voices`), or "held out" would mean the same person through a new vocoder.

Every engine takes a speed in words per minute (eSpeak's scale; the others speak about 190 wpm
natively, measured on digit strings, and are stretched to match) and a pitch 0-99 (eSpeak's
scale; 50 = the voice's own). Flite's rms and Festival's HTS voice keep their own pitch.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from e2e_dist.errors import UserError

NATIVE_WPM = 190
"""Flite's and Festival's default speaking rate on digit strings, in eSpeak words per minute
(5 digits: 1.2-1.3 s from each of their voices, 1.5 s from eSpeak NG at 160 wpm)."""
INSTALL = {"espeak-ng": "espeak-ng", "flite": "flite",
           "festival": "festival festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts"}
"""Debian packages each engine needs (.ci/install-speech-deps.sh installs them all)."""


class SynthesisError(UserError):
    """A synthesizer is missing or failed; the message says what to install or which call broke."""


@dataclass(frozen=True)
class Voice:
    engine: str
    """espeak-ng, flite or festival."""
    name: str
    """The engine's name for it: `en-us+m3`, `awb`, `kal_diphone`."""
    method: str
    """formant, clustergen, diphone or hts."""
    speaker: str
    """Whose recordings it was built from (eSpeak's rule voices: "espeak")."""

    @property
    def label(self) -> str:
        """How the manifest names it: eSpeak voices as before (`en-us+m3`), others `engine:name`."""
        return self.name if self.engine == "espeak-ng" else f"{self.engine}:{self.name}"


FLITE = (Voice("flite", "awb", "clustergen", "awb"), Voice("flite", "rms", "clustergen", "rms"),
         Voice("flite", "slt", "clustergen", "slt"), Voice("flite", "kal", "diphone", "kal"))
FESTIVAL = (Voice("festival", "kal_diphone", "diphone", "kal"), Voice("festival", "ked_diphone", "diphone", "ked"),
            Voice("festival", "cmu_us_slt_arctic_hts", "hts", "slt"))
ENGINES = ("espeak-ng", "flite", "festival")
# Rough fundamental of each voice at its own pitch (Hz), to map eSpeak's 0-99 pitch onto theirs.
_F0 = {"awb": 130.0, "slt": 170.0, "kal": 105.0, "kal_diphone": 110.0, "ked_diphone": 108.0}


def engine_voices(engine: str) -> tuple[Voice, ...]:
    """The non-eSpeak voices of an engine (eSpeak's are accent x variant: synth_speech.py)."""
    return {"flite": FLITE, "festival": FESTIVAL}.get(engine, ())


def training_voices(train_engines: tuple[str, ...], held_engines: tuple[str, ...]) -> tuple[Voice, ...]:
    """Voices of `train_engines` (other than eSpeak's) whose speaker no held-out engine speaks with."""
    held_speakers = {v.speaker for e in held_engines for v in engine_voices(e)}
    return tuple(v for e in train_engines if e not in held_engines for v in engine_voices(e)
                 if v.speaker not in held_speakers)


def voice_from_label(label: str) -> Voice:
    """The Voice a manifest's `voice` names (`en-us+m3`, `flite:awb`, `festival:kal_diphone`)."""
    engine, _, name = label.rpartition(":")
    for v in engine_voices(engine):
        if v.name == name:
            return v
    if engine in ("", "espeak-ng"):
        return Voice("espeak-ng", name, "formant", "espeak")
    raise SynthesisError(f"unknown voice {label!r}")


def find_engine(engine: str) -> str:
    """Path of the engine's program, or SynthesisError naming the packages to install."""
    exe = shutil.which(engine)
    voices_there = engine != "festival" or Path("/usr/share/festival/voices/english/kal_diphone").is_dir()
    if exe is None or not voices_there:
        raise SynthesisError(
            f"{engine} {'not found on PATH' if exe is None else 'has no kal_diphone voice'}: install it "
            f"(Debian/Ubuntu: apt-get install {INSTALL[engine]}, or run .ci/install-speech-deps.sh) to "
            f"synthesize speech with it")
    return exe


def _pitch_hz(voice: Voice, pitch: int) -> float | None:
    """eSpeak's 0-99 pitch (50 = the voice's own) as a target mean F0: the corpus's pitches 25-75
    span +-0.6 octave, a male voice up into a woman's range (the voice's formants stay its own)."""
    base = _F0.get(voice.name)
    return None if base is None else round(base * 2 ** ((pitch - 50) / 40), 1)


def _check(proc: subprocess.CompletedProcess, voice: Voice, wav: Path) -> None:
    if proc.returncode != 0 or not wav.exists() or wav.stat().st_size <= 44:
        msg = (proc.stderr or proc.stdout).strip().splitlines()
        why = msg[-1] if msg else f"exit {proc.returncode}"
        raise SynthesisError(f"{voice.engine} failed for voice {voice.name!r}: {why}")


def speak(voice: Voice, text: str, speed: int, pitch: int, wav: Path) -> None:
    """Write the engine's WAV of `text` to `wav`, at `speed` words per minute and `pitch` (0-99)."""
    exe = find_engine(voice.engine)
    if voice.engine == "espeak-ng":
        cmd = [exe, "-w", str(wav), "-v", voice.name, "-s", str(speed), "-p", str(pitch), text]
    elif voice.engine == "flite":
        cmd = [exe, "-voice", voice.name, "--setf", f"duration_stretch={NATIVE_WPM / speed:.3f}", "-t", text,
               "-o", str(wav)]
        hz = _pitch_hz(voice, pitch)
        if hz is not None:
            cmd[3:3] = ["--setf", f"int_f0_target_mean={hz}"]
    elif voice.engine == "festival":
        cmd = [exe, "--batch", festival_script(voice, text, speed, pitch, wav)]
    else:
        raise SynthesisError(f"unknown speech engine {voice.engine!r} (known: {', '.join(ENGINES)})")
    _check(subprocess.run(cmd, capture_output=True, text=True, timeout=120), voice, wav)


def festival_script(voice: Voice, text: str, speed: int, pitch: int, wav: Path) -> str:
    """One Scheme expression: select the voice, set its rate and pitch, save the WAV."""
    stretch = NATIVE_WPM / speed
    words = "".join(c for c in text if c.isalnum() or c == " ")  # nothing that could end the string
    if voice.method == "hts":  # HTS ignores Duration_Stretch: its engine's own rate flag (-r)
        rate = f"(set! hts_engine_params (append hts_engine_params (list (list \"-r\" {1 / stretch:.3f}))))"
    else:
        rate = f"(Parameter.set 'Duration_Stretch {stretch:.3f})"
    hz = _pitch_hz(voice, pitch)
    f0 = "" if hz is None or voice.method == "hts" else (
        f"(set! int_lr_params (append (list (list 'target_f0_mean {hz})) int_lr_params))")
    return (f"(begin (voice_{voice.name}) {rate} {f0} "
            f"(utt.save.wave (utt.synth (Utterance Text \"{words}\")) \"{wav}\" 'riff))")


def speak_samples(voice: Voice, text: str, speed: int, pitch: int, scratch: Path) -> tuple[np.ndarray, int]:
    """Mono float32 samples and their rate for `text` spoken by `voice` (scratch: a WAV path to use)."""
    import soundfile as sf

    speak(voice, text, speed, pitch, scratch)
    x, sr = sf.read(scratch, dtype="float32", always_2d=True)
    scratch.unlink()
    x = x.mean(axis=1)
    if not x.size or not np.abs(x).max() > 0:
        raise SynthesisError(f"{voice.engine} produced no audio for {text!r} (voice {voice.name!r})")
    return x, sr
