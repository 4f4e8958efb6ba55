"""How speech reaches a microphone: room impulse responses (data/rooms.py), the channel effects and
room in the augmentation (data/speech_augment.py), and the other synthesizers (data/synthesizers.py).

Measured, not assumed: the RT60 read back from each impulse response's decay, the energy a band
limit leaves outside its band, a codec's error, the length of what each synthesizer says.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from e2e_dist.data import rooms, synthesizers
from e2e_dist.data.speech_augment import ClipAugment, augment_clip, band_limit, codec_round_trip


def needs(engine: str):
    return pytest.mark.skipif(shutil.which(engine) is None, reason=f"{engine} not installed "
                              f"(.ci/install-speech-deps.sh: apt-get install {synthesizers.INSTALL[engine]})")


# ------------------------------------------------------------------------------ rooms
@pytest.mark.parametrize("rt60", [0.25, 0.5, 1.0])  # shorter: the octave filters ring as long
def test_statistical_rir_decays_at_the_rt60_asked(rt60):
    for seed in range(3):
        for drr in (-4.0, 4.0, 12.0):
            h = rooms.statistical_rir(np.random.default_rng(seed), 8000, rt60, drr)
            if drr < 10:  # a close microphone's decay starts 12 dB down: too little of it left to read
                assert rooms.measure_rt60(h, 8000) == pytest.approx(rt60, rel=0.2)
            # Direct sound vs the rest: the DRR asked (early reflections add a little reverberant energy)
            measured = 10 * np.log10(h[0] ** 2 / np.sum(h[1:].astype(np.float64) ** 2))
            assert drr - 3.0 < measured < drr + 0.5


@pytest.mark.parametrize("rt60", [0.3, 0.6])
def test_shoebox_rir_is_a_room_of_the_rt60_asked_and_seeded(rt60):
    rng = lambda s: np.random.default_rng(s)  # noqa: E731
    h = rooms.shoebox_rir(rng(1), 8000, rt60)
    assert rooms.measure_rt60(h, 8000) == pytest.approx(rt60, rel=0.05)
    assert h[0] == pytest.approx(1.0) and np.array_equal(h, rooms.shoebox_rir(rng(1), 8000, rt60))
    assert not np.array_equal(h[:2000], rooms.shoebox_rir(rng(2), 8000, rt60)[:2000])  # another room
    # Geometric echoes: silence between the direct sound and the first reflection (>= 0.5 m farther
    # away: every wall is at least 0.5 m from source and microphone... so >= ~1.4 ms at 343 m/s).
    first = int(np.flatnonzero(np.abs(h[2:]) > 1e-3)[0]) + 2
    assert first >= 0.001 * 8000
    # A more absorbent room (shorter RT60) rings less: its decay curve falls faster.
    assert rooms.measure_rt60(rooms.shoebox_rir(rng(1), 8000, rt60 / 2), 8000) < 0.6 * rt60


def test_reverberate_rings_on_after_the_sound_stops():
    x = np.zeros(8000, np.float32)
    x[1000:1400] = np.sin(np.arange(400) / 3.0)
    h = rooms.statistical_rir(np.random.default_rng(0), 8000, 0.6, 0.0)
    y = rooms.reverberate(x, h, keep=9000)
    assert len(y) == 9000 and np.abs(y).max() == pytest.approx(np.abs(x).max(), rel=1e-4)
    after = np.sqrt(np.mean(y[1600:2400] ** 2))  # 25-125 ms after the burst ended
    assert after > 0.05 * np.sqrt(np.mean(y[1000:1400] ** 2)) and np.abs(x[1600:2400]).max() == 0


# ------------------------------------------------------------------------------ channel
def _band_energy(x: np.ndarray, sr: int, lo: float, hi: float) -> float:
    spec = np.abs(np.fft.rfft(x)) ** 2
    f = np.fft.rfftfreq(len(x), 1 / sr)
    return float(spec[(f >= lo) & (f < hi)].sum())


def test_telephone_band_removes_what_is_outside_it():
    sr = 16000
    noise = np.random.default_rng(0).normal(0, 0.1, sr * 2).astype(np.float32)
    y = band_limit(noise, sr)
    for lo, hi in ((0, 150), (4500, 8000)):  # well below 300 Hz and above 3400 Hz
        assert _band_energy(y, sr, lo, hi) < 1e-3 * _band_energy(noise, sr, lo, hi)
    assert _band_energy(y, sr, 700, 2500) == pytest.approx(_band_energy(noise, sr, 700, 2500), rel=0.1)


@pytest.mark.parametrize("codec", [("WAV", "ULAW"), ("WAV", "GSM610"), ("MP3", "MPEG_LAYER_III"), ("OGG", "OPUS")])
def test_codecs_keep_length_and_lose_a_little(codec):
    sr = 8000
    t = np.arange(sr) / sr
    x = (0.3 * np.sin(2 * np.pi * 440 * t) * (1 + np.sin(2 * np.pi * 3 * t)) / 2).astype(np.float32)
    y = codec_round_trip(x, sr, codec)
    assert len(y) == len(x) and not np.array_equal(x, y)
    # Still the same tone: most of its energy at 440 Hz
    assert _band_energy(y, sr, 400, 480) > 0.8 * _band_energy(y, sr, 0, sr / 2)


def test_augmentation_puts_clips_in_rooms_and_channels():
    x = np.zeros(8000, np.float32)
    x[1000:2000] = np.sin(np.arange(1000) / 3.0)
    dry = ClipAugment(speed=(1, 1), gain=(0.5, 0.5), max_pad_s=0, p_noise=0, p_room=0, p_phone=0, p_codec=0)
    wet = ClipAugment(speed=(1, 1), gain=(0.5, 0.5), max_pad_s=0, p_noise=0, p_room=1, rt60=(0.8, 0.8),
                      drr_db=(0.0, 0.0), p_phone=0, p_codec=0)
    a = augment_clip(x, np.random.default_rng(0), 8000, 12000, dry)
    b = augment_clip(x, np.random.default_rng(0), 8000, 12000, wet)
    assert np.abs(a[2100:3000]).max() == 0 and np.sqrt(np.mean(b[2100:3000] ** 2)) > 0.01
    assert len(b) <= 12000 and len(b) > len(x)  # the echo rings on into the room the clip has
    phone = augment_clip(np.random.default_rng(1).normal(0, 0.1, 8000).astype(np.float32), np.random.default_rng(0),
                         8000, 8000, ClipAugment(p_noise=0, p_room=0, p_phone=1, p_codec=0, speed=(1, 1)))
    assert _band_energy(phone, 8000, 0, 120) < 1e-3 * _band_energy(phone, 8000, 700, 2500)


# ------------------------------------------------------------------------------ synthesizers
def test_held_out_engines_take_their_speakers_with_them():
    voices = synthesizers.training_voices(("espeak-ng", "flite"), ("festival",))
    assert [v.label for v in voices] == ["flite:awb", "flite:rms"]  # kal and slt are Festival's speakers too
    assert {v.speaker for v in synthesizers.training_voices(("flite",), ())} == {"awb", "rms", "slt", "kal"}
    for v in synthesizers.FLITE + synthesizers.FESTIVAL:
        assert synthesizers.voice_from_label(v.label) == v
    assert synthesizers.voice_from_label("en-us+m3").engine == "espeak-ng"


def _spoken_seconds(voice, text: str, speed: int, tmp: Path) -> float:
    x, sr = synthesizers.speak_samples(voice, text, speed, 50, tmp / "x.wav")
    loud = np.flatnonzero(np.abs(x) > 0.05 * np.abs(x).max())
    return (loud[-1] - loud[0]) / sr


@pytest.mark.parametrize("voice", [pytest.param(v, marks=needs(v.engine), id=v.label)
                                   for v in synthesizers.FLITE + synthesizers.FESTIVAL])
def test_each_synthesizer_says_the_words_asked_at_the_speed_asked(voice, tmp_path):
    one = _spoken_seconds(voice, "seven", 160, tmp_path)
    four = _spoken_seconds(voice, "seven one nine four", 160, tmp_path)
    assert 2.5 * one < four < 6 * one  # four words take about four times one word's time
    slow = _spoken_seconds(voice, "seven one nine four", 100, tmp_path)
    assert slow > 1.3 * four  # 100 wpm vs 160: 1.6x as long, give or take pauses
