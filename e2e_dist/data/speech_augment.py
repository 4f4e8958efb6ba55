"""Seeded augmentation of one clip, in the decode task: what recordings of the same words differ by.

Drawn from a generator seeded by the row (a resumed run hears exactly the same clips): speed
(resampling, which moves tempo and pitch together, as Kaldi's speed perturbation), volume,
silence before and after (within the clip length training uses, so no word is cut), and white
noise at a random signal-to-noise ratio.
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
    if rng.random() < aug.p_noise:
        rms = float(np.sqrt(np.mean(y ** 2)))
        y = y + rng.normal(0.0, rms / 10 ** (float(rng.uniform(*aug.snr_db)) / 20), y.shape).astype(np.float32)
    return np.clip(y, -1.0, 1.0).astype(np.float32)
