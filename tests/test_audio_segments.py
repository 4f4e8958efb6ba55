"""Long recordings cut into the pieces a speech model was trained on, and the pieces' words merged
(e2e_dist/audio_segments.py): on synthesized recordings whose words and pauses are known."""

from __future__ import annotations

import numpy as np
import pytest

from e2e_dist.audio_segments import (
    KEEP_S, MIN_PAUSE_S, OVERLAP_S, Piece, Word, merge_words, split_recording, words_of,
)

RATE = 8000


def recording(gaps: list[float], seed: int = 0) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Voiced 'words' (0.3-0.6 s of harmonics, each with a 70 ms near-silent stop closure inside,
    as in 'six' or 'eight') separated by the given gaps (seconds) over a noise floor 35 dB down.
    Returns the samples and each word's (first, end) sample."""
    rng = np.random.default_rng(seed)
    parts, words, pos = [np.zeros(int(0.3 * RATE))], [], int(0.3 * RATE)
    for gap in gaps + [0.3]:
        n = int(rng.uniform(0.3, 0.6) * RATE)
        t = np.arange(n) / RATE
        f0 = rng.uniform(100, 220)
        w = sum(np.sin(2 * np.pi * f0 * k * t) / k for k in range(1, 6)) * np.hanning(n) ** 0.3
        c = int(rng.uniform(0.3, 0.6) * n)
        w[c: c + int(0.07 * RATE)] *= 0.01
        parts += [w * rng.uniform(0.3, 1.0), np.zeros(int(gap * RATE))]
        words.append((pos, pos + n))
        pos += n + int(gap * RATE)
    x = np.concatenate(parts)
    x = x + rng.normal(0, 0.3 * 10 ** (-35 / 20), len(x))
    return x.astype(np.float32), words


def test_a_clip_within_the_window_is_one_piece():
    x, _ = recording([0.3, 0.05])
    assert split_recording(x, RATE, len(x) / RATE + 0.01) == [Piece(0, len(x))]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_long_recording_is_cut_only_inside_its_pauses(seed):
    gaps = list(np.random.default_rng(seed).choice([0.3, 0.6, 1.5, 3.0], size=40))
    x, words = recording(gaps, seed)
    pieces = split_recording(x, RATE, 2.0)
    assert all(p.end - p.start <= 2.0 * RATE for p in pieces)
    assert all(a.end <= b.start for a, b in zip(pieces, pieces[1:]))  # pauses everywhere: no overlap needed
    for w0, w1 in words:  # every word whole in exactly one piece, with its stop closure
        assert sum(p.start <= w0 and w1 <= p.end for p in pieces) == 1, (w0 / RATE, w1 / RATE)
        assert not any(w0 < p.start < w1 or w0 < p.end < w1 for p in pieces)
    # A pause longer than a piece is not transcribed beyond KEEP_S of silence on each side.
    for (_, gap_start), (gap_end, _), gap in zip(words, words[1:], gaps):
        heard = sum(max(0, min(p.end, gap_end) - max(p.start, gap_start)) for p in pieces) / RATE
        assert heard <= 2 * KEEP_S + 0.1 or gap < 2.0, (gap_start / RATE, heard)
    assert len(pieces) == len(words)  # an utterance per piece, as in training


def test_speech_without_pauses_gets_overlapping_windows_that_cover_it():
    x, words = recording([0.02] * 14, seed=3)
    pieces = split_recording(x, RATE, 2.0)
    assert len(pieces) >= 2 and all(p.end - p.start <= 2.0 * RATE for p in pieces)
    assert pieces[0].start <= words[0][0] and pieces[-1].end >= words[-1][1]
    for a, b in zip(pieces, pieces[1:]):
        assert a.end - b.start >= min(OVERLAP_S, 1.0) * RATE - 1 or a.end <= b.start  # overlap, or a real pause
    assert any(a.end > b.start for a, b in zip(pieces, pieces[1:]))
    for w0, w1 in words:  # each word heard whole by some piece
        assert any(p.start <= w0 and w1 <= p.end for p in pieces), (w0 / RATE, w1 / RATE)


def test_a_pause_separates_words_the_model_ran_together():
    timed = chars("seven", 1.0) + chars("eight", 1.5)  # no space emitted across the pause at 1.35 s
    assert [w.text for w in words_of(timed)] == ["seveneight"]
    assert [(w.text, w.start) for w in words_of(timed, [1.35])] == [("seven", 1.0), ("eight", 1.5)]
    assert [w.text for w in words_of(timed, [0.5, 2.5])] == ["seveneight"]  # pauses elsewhere


def test_a_short_pause_is_not_a_cut_but_a_long_one_is():
    x, words = recording([MIN_PAUSE_S / 3, 1.0, MIN_PAUSE_S / 3], seed=4)
    pieces = split_recording(x, RATE, 1.8)
    assert len(pieces) == 2 and words[1][1] <= pieces[0].end <= pieces[1].start <= words[2][0]


def chars(text: str, start: float, step: float = 0.04) -> list[tuple[str, float]]:
    return [(c, start + i * step) for i, c in enumerate(text)]


def test_merge_takes_a_word_cut_by_a_window_edge_from_the_piece_that_heard_it_whole():
    # Piece A hears 0-2 s: "one" "two", then "six" cut by its end ("si"); piece B (1.2-3.2 s) hears
    # "six" whole, "seven", and the end of "two" at its start ("o"). Timings differ by a frame.
    a = words_of(chars("one", 0.2) + [(" ", 0.35)] + chars("two", 0.95) + [(" ", 1.1)] + chars("si", 1.9))
    b = words_of(chars("o", 1.22) + [(" ", 1.3)] + chars("six", 1.86) + [(" ", 2.0)] + chars("seven", 2.4))
    pieces = [Piece(0, 2 * RATE), Piece(int(1.2 * RATE), int(3.2 * RATE))]
    merged, own = merge_words(pieces, [a, b], RATE, 0.04)
    assert [w.text for w in merged] == ["one", "two", "six", "seven"]
    assert own[0][1] == own[1][0] and 1.3 < own[0][1] < 1.86  # the switch lies between "o" and "six"
    # Pieces that do not overlap: their words one after the other.
    merged, _ = merge_words([Piece(0, RATE), Piece(RATE, 2 * RATE)], [a[:1], [Word("two", 1.2, 1.3)]], RATE, 0.04)
    assert [w.text for w in merged] == ["one", "two"]
