"""Room impulse responses: how a room colours speech on its way to a microphone, made offline.

Two generators, so a model trained on one can be judged on rooms it never heard:

- `statistical_rir` (training, in the augmentation): the direct sound, a few early reflections,
  then a diffuse tail of Gaussian noise whose level falls 60 dB in RT60 seconds; high frequencies
  die sooner than low ones (air and soft surfaces absorb them), as in real rooms.
- `shoebox_rir` (evaluation only): the image-source method (Allen & Berkley 1979) in a random
  rectangular room with a random source and microphone, the walls' absorption chosen by Eyring's
  formula for the RT60 asked. Its reflections are geometric, not random, so its echo pattern is
  not one the training generator can produce.

`measure_rt60` reads the reverberation time back from an impulse response (Schroeder's backward
integration, the -5 to -25 dB slope extrapolated to 60 dB), for tests and the benchmark table.
"""

from __future__ import annotations

import math

import numpy as np

SPEED_OF_SOUND = 343.0
"""Metres per second."""
_LN_1E3 = math.log(1e3)  # an amplitude 60 dB down: exp(-ln(1000))


def statistical_rir(rng: np.random.Generator, sample_rate: int, rt60: float, drr_db: float) -> np.ndarray:
    """A synthetic impulse response: direct path at 0, 2-8 early reflections in the first 50 ms,
    then a noise tail decaying 60 dB per `rt60` seconds (above ~1.5 kHz in 0.4-0.8 x that time).
    drr_db: direct-to-reverberant energy ratio (high: close microphone, low: far across the room)."""
    from scipy.signal import butter, sosfilt

    n = max(8, int(sample_rate * rt60 * 1.1))
    t = np.arange(n) / sample_rate
    # The diffuse field builds up over the first few milliseconds (the mixing time) rather than at once.
    onset = min(n - 1, int(sample_rate * rng.uniform(0.002, 0.012)))
    ramp = np.clip((t - onset / sample_rate) / 0.01, 0.0, 1.0)
    noise = rng.normal(size=n)
    split = min(1500.0, 0.35 * sample_rate)
    low = sosfilt(butter(2, split, "lowpass", fs=sample_rate, output="sos"), noise)
    high = noise - low
    high_rt = rt60 * rng.uniform(0.4, 0.8)
    tail = (low * np.exp(-_LN_1E3 * t / rt60) + high * np.exp(-_LN_1E3 * t / high_rt)) * ramp
    tail *= math.sqrt(10 ** (-drr_db / 10) / max(float(np.sum(tail ** 2)), 1e-12))
    # Early reflections off the nearest walls, floor, table: single echoes, each up to a third of
    # the tail's amplitude (all of them together at most about the tail's energy: the DRR holds).
    level = 10 ** (-drr_db / 20)
    for _ in range(int(rng.integers(2, 9))):
        k = int(sample_rate * rng.uniform(0.001, 0.05))
        if k < n:
            tail[k] += rng.choice((-1.0, 1.0)) * rng.uniform(0.1, 0.35) * level * math.exp(-_LN_1E3 * t[k] / rt60)
    tail[0] += 1.0  # the direct sound
    return tail.astype(np.float32)


def eyring_absorption(room: np.ndarray, rt60: float) -> float:
    """Wall absorption coefficient (0-1, the same on every surface) giving `rt60` in a room of
    these dimensions by Eyring's formula RT60 = 0.161 V / (-S ln(1 - a))."""
    volume = float(np.prod(room))
    surface = 2.0 * float(room[0] * room[1] + room[0] * room[2] + room[1] * room[2])
    return float(min(0.99, 1.0 - math.exp(-0.161 * volume / (surface * rt60))))


def shoebox_rir(rng: np.random.Generator, sample_rate: int, rt60: float) -> np.ndarray:
    """Image-source impulse response of a random room (3-9 x 3-7 x 2.5-4 m) whose measured RT60
    (`measure_rt60`) is `rt60` within a few percent, source and microphone at least 0.5 m from
    every wall, normalized to a direct path of 1."""
    room = rng.uniform((3.0, 3.0, 2.5), (9.0, 7.0, 4.0))
    src, mic = (rng.uniform(0.5, room - 0.5) for _ in range(2))
    # Eyring assumes a diffuse field; an empty rectangular room rings longer than it says (the
    # axial modes), so the absorption is corrected on the measured decay, three times.
    target = rt60
    for _ in range(3):
        h = _image_rir(room, src, mic, math.sqrt(1.0 - eyring_absorption(room, target)), sample_rate, rt60 * 1.1)
        target *= rt60 / measure_rt60(h, sample_rate)
    return h


def _image_rir(room: np.ndarray, src: np.ndarray, mic: np.ndarray, beta: float, sample_rate: int,
               length: float) -> np.ndarray:
    """Every image of the source within `length` seconds of the mic, each an impulse of
    beta ** reflections / distance at its delay; starts at the direct sound."""
    n = int(sample_rate * length) + 2
    h = np.zeros(n)
    reach = SPEED_OF_SOUND * length
    axes = []
    for d in range(3):  # per axis: image coordinate relative to the mic and reflections on that axis
        m = np.arange(-int(reach / (2 * room[d])) - 1, int(reach / (2 * room[d])) + 2)
        pos = np.concatenate([src[d] + 2 * m * room[d], -src[d] + 2 * m * room[d]]) - mic[d]
        hits = np.concatenate([np.abs(2 * m), np.abs(2 * m - 1)])  # |m-q| + |m| for q = 0, 1
        axes.append((pos, hits))
    (px, hx), (py, hy) = axes[0], axes[1]
    dxy2 = (px[:, None] ** 2 + py[None, :] ** 2).ravel()
    hxy = (hx[:, None] + hy[None, :]).ravel()
    near = dxy2 <= reach ** 2
    dxy2, hxy = dxy2[near], hxy[near]
    for pz, hz in zip(*axes[2]):  # one z layer at a time keeps memory at one plane of images
        dist = np.sqrt(dxy2 + pz ** 2)
        keep = dist <= reach
        dist, hits = dist[keep], hxy[keep] + hz
        delay = dist / SPEED_OF_SOUND * sample_rate
        k = delay.astype(np.int64)
        frac = delay - k
        amp = beta ** hits / np.maximum(dist, 0.1)
        np.add.at(h, k, amp * (1 - frac))  # linear interpolation between the two nearest samples
        np.add.at(h, k + 1, amp * frac)
    start = int(float(np.linalg.norm(src - mic)) / SPEED_OF_SOUND * sample_rate)
    h = h[start:start + int(sample_rate * length)]
    return (h / max(float(np.abs(h[:2]).max()), 1e-12)).astype(np.float32)


def measure_rt60(h: np.ndarray, sample_rate: int, band: tuple[float, float] | None = (350.0, 1400.0)) -> float:
    """Reverberation time of an impulse response (s): Schroeder's energy decay curve, its least-
    squares slope between -5 and -25 dB (T20), extrapolated to a 60 dB fall. band: measured in
    these frequencies (Hz; default the 500 Hz and 1 kHz octaves, where rooms are rated), None: all."""
    from scipy.signal import butter, sosfilt

    x = np.asarray(h, np.float64)
    if band is not None:
        x = sosfilt(butter(4, band, "bandpass", fs=sample_rate, output="sos"), x)
    energy = np.cumsum(x[::-1] ** 2)[::-1]
    edc = 10 * np.log10(np.maximum(energy / energy[0], 1e-30))
    sel = np.flatnonzero((edc <= -5) & (edc >= -25))
    if len(sel) < 2:
        raise ValueError("impulse response too short to fall 25 dB")
    slope = np.polyfit(sel / sample_rate, edc[sel], 1)[0]  # dB per second (negative)
    return float(-60.0 / slope)


def reverberate(x: np.ndarray, h: np.ndarray, keep: int | None = None) -> np.ndarray:
    """`x` as heard through impulse response `h`, at the same peak level; `keep` samples (default
    len(x): the echo after the last word is cut where the clip ends)."""
    from scipy.signal import fftconvolve

    y = fftconvolve(x, h)[: len(x) if keep is None else keep]
    peak_in, peak_out = float(np.abs(x).max()), float(np.abs(y).max())
    return (y * (peak_in / peak_out) if peak_out > 0 else y).astype(np.float32)
