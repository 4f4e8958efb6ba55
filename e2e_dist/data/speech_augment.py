"""Seeded augmentation of one clip, in the decode task: what recordings of the same words differ by.

Drawn from a generator seeded by the row (a resumed run hears exactly the same clips): speed
(resampling, which moves tempo and pitch together, as Kaldi's speed perturbation), volume,
silence before and after (within the clip length training uses, so no word is cut), then the way
to a microphone: a room (a synthetic impulse response, RT60 from a dry booth to a hall:
data/rooms.py), white or brown noise at a random signal-to-noise ratio, and the channel: a
telephone band (300-3400 Hz) and/or a codec (8-bit mu-law, GSM 06.10, MP3; libsndfile's own,
so nothing to install). Each is drawn independently, so most copies get one or two of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, kw_only=True)
class ClipAugment:
    speed: tuple[float, float] = (0.85, 1.15)
    """Playback-rate factor range (1.15 = 15% faster and higher)."""
    gain: tuple[float, float] = (0.2, 1.0)
    """Peak level range after augmentation."""
    max_pad_s: float = 0.4
    """Most silence added in all (split at random between before and after), if the clip has room."""
    p_noise: float = 0.7
    """Chance of added white noise."""
    snr_db: tuple[float, float] = (8.0, 35.0)
    """Signal-to-noise ratio range of that noise, in dB."""
    p_brown: float = 0.3
    """Chance that the noise is brown (1/f^2: rumble, traffic, fans) instead of white."""
    p_room: float = 0.5
    """Chance of a room: the clip convolved with a statistical impulse response (data/rooms.py)."""
    rt60: tuple[float, float] = (0.1, 1.0)
    """Reverberation time range of that room, in seconds (log-uniform: as many dry rooms as halls)."""
    drr_db: tuple[float, float] = (-12.0, 10.0)
    """Direct-to-reverberant energy ratio range in dB (low: a microphone across the room; in an
    office of RT60 0.6 s the reverberant sound is louder than the direct beyond ~0.7 m)."""
    p_phone: float = 0.2
    """Chance of a telephone band: 300-3400 Hz, nothing below or above."""
    p_codec: float = 0.2
    """Chance of a lossy codec round trip (one of `CODECS`)."""


def change_speed(x: np.ndarray, factor: float) -> np.ndarray:
    """Resample by linear interpolation: `factor` > 1 plays faster (shorter, higher)."""
    n = max(1, int(round(len(x) / factor)))
    return np.interp(np.arange(n) * factor, np.arange(len(x)), x).astype(np.float32)


def augment_clip(x: np.ndarray, rng: np.random.Generator, sample_rate: int, max_samples: int,
                 aug: ClipAugment = ClipAugment()) -> np.ndarray:
    """One augmented copy of mono float samples, never longer than max_samples unless the input was
    (and then never longer than the input: slowing it down would cut more of it)."""
    y = change_speed(x, float(rng.uniform(*aug.speed)))
    if len(y) > max(max_samples, len(x)):  # slowed past the limit: keep every word instead
        y = x.astype(np.float32)
    room = max(0, min(int(aug.max_pad_s * sample_rate), max_samples - len(y)))
    pad = int(rng.integers(0, room + 1))
    lead = int(rng.integers(0, pad + 1))
    y = np.concatenate([np.zeros(lead, np.float32), y, np.zeros(pad - lead, np.float32)])
    peak = float(np.abs(y).max())
    y = y * (float(rng.uniform(*aug.gain)) / peak) if peak > 0 else y
    # Drawn in a fixed order whatever applies, so each effect's draws do not move the others'.
    room, rt60, drr = rng.random() < aug.p_room, _log_uniform(rng, aug.rt60), float(rng.uniform(*aug.drr_db))
    noisy, brown, snr = rng.random() < aug.p_noise, rng.random() < aug.p_brown, float(rng.uniform(*aug.snr_db))
    phone, codec, which = rng.random() < aug.p_phone, rng.random() < aug.p_codec, int(rng.integers(len(CODECS)))
    if room:
        from e2e_dist.data.rooms import reverberate, statistical_rir

        # The echo rings on into the trailing silence (up to the clip length), as a recording's would.
        h = statistical_rir(rng, sample_rate, rt60, drr)
        y = reverberate(y, h, keep=max(len(y), min(max_samples, len(y) + len(h) - 1)))
    if noisy:
        rms = float(np.sqrt(np.mean(y ** 2)))
        y = y + (rms / 10 ** (snr / 20)) * (brown_noise(rng, len(y)) if brown else rng.normal(0.0, 1.0, len(y)))
    if phone:
        y = band_limit(y, sample_rate)
    if codec:
        y = codec_round_trip(y, sample_rate, CODECS[which])
    return np.clip(y, -1.0, 1.0).astype(np.float32)


CODECS = (("WAV", "ULAW"), ("WAV", "GSM610"), ("MP3", "MPEG_LAYER_III"))
"""(container, libsndfile subtype) of the training codecs; mu-law in place of one that does not take
the clip's rate (GSM 06.10: 8 kHz only). Opus is kept for evaluation (benchmarks/speech_held_out.py)."""


_RATES = {"GSM610": (8000,), "MPEG_LAYER_III": (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000),
          "OPUS": (8000, 12000, 16000, 24000, 48000)}
"""Sample rates each codec encodes (libsndfile refuses others)."""


def _log_uniform(rng: np.random.Generator, lo_hi: tuple[float, float]) -> float:
    return float(np.exp(rng.uniform(np.log(lo_hi[0]), np.log(lo_hi[1]))))


def brown_noise(rng: np.random.Generator, n: int) -> np.ndarray:
    """Unit-RMS brown noise (integrated white noise, its drift removed): energy falls 6 dB/octave."""
    walk = np.cumsum(rng.normal(size=n))
    walk -= np.linspace(walk[0], walk[-1], n)
    return walk / max(float(np.sqrt(np.mean(walk ** 2))), 1e-12)


def band_limit(x: np.ndarray, sample_rate: int, band: tuple[float, float] = (300.0, 3400.0)) -> np.ndarray:
    """`x` through a telephone channel: 6th-order Butterworth band-pass (the top edge capped just
    below Nyquist, where an 8 kHz clip already ends)."""
    from scipy.signal import butter, sosfilt

    hi = min(band[1], 0.45 * sample_rate)
    return sosfilt(butter(6, (band[0], hi), "bandpass", fs=sample_rate, output="sos"), x).astype(np.float32)


def codec_round_trip(x: np.ndarray, sample_rate: int, codec: tuple[str, str]) -> np.ndarray:
    """`x` encoded with a lossy codec in memory and decoded again (same length)."""
    import io

    import soundfile as sf

    fmt, subtype = codec
    if sample_rate not in _RATES.get(subtype, (sample_rate,)):  # mu-law takes any rate
        fmt, subtype = "WAV", "ULAW"
    buf = io.BytesIO()
    sf.write(buf, np.clip(x, -1.0, 1.0), sample_rate, format=fmt, subtype=subtype)
    buf.seek(0)
    y = sf.read(buf, dtype="float32")[0]
    # GSM frames pad the end; MP3 may add a few samples of decoder delay.
    return np.pad(y, (0, max(0, len(x) - len(y))))[: len(x)].astype(np.float32)
