"""Long recordings -> pieces the speech model was trained on, and the pieces' transcripts back into one.

Why (issue 33): a speech model is trained on clips of at most `data.max_audio_seconds`, each one
utterance in silence; cutting a 5-minute recording into fixed windows split words ("six" -> "ix" /
"si") and tripled the CER.

Splitting (`split_recording`): a clip within the window stays one piece. A longer one is cut at
pauses: 10 ms frames quieter than the recording's noise floor + a margin (`quiet_frames`), in runs
of at least MIN_PAUSE_S (longer than the closure of a stop inside a word). It is cut at every pause
of SPLIT_S or more; where that leaves a piece longer than the window, at its best shorter pause
(the longest up to PAUSE_CAP_S, then the latest). A short pause is cut at its quietest frame, a
long one keeps KEEP_S of silence on each side and the rest is skipped. Where speech runs a whole
window without a pause, the window ends anyway and the next one starts OVERLAP_S earlier: every
word shorter than that is whole in one of the two. Each piece is transcribed with silence added
where it does not start or end quiet (`edge_padding`).

Merging (`merge_words`): words carry times (their characters' CTC frames) and are also split at
pauses (`words_of`). Between overlapping pieces the transcript switches from the first to the
second at a moment no word of either covers, nearest the middle of the overlap, so a word cut at
either piece's edge is taken from the piece that heard it whole, once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

FRAME_S = 0.01
"""Energy frame for finding pauses."""
MIN_PAUSE_S = 0.15
"""A quiet run at least this long is a pause between words: stop closures inside digit words
('six', 'eight', 'two') last 50-100 ms at the speeds the models are trained on."""
PAUSE_CAP_S = 0.3
"""Where a piece must end at a pause shorter than SPLIT_S: the longest, the latest among equals."""
KEEP_S = 0.2
"""Silence kept on each side of a long pause (training clips have 0-0.2 s lead-in and up to 0.4 s
of added silence); the rest of it is not transcribed."""
OVERLAP_S = 0.8
"""Windows over speech without a pause share this much: a digit word at 120 words per minute
(~0.5 s) plus the edge margins the merge keeps clear of."""
QUIET_DB = 8.0
"""A frame is quiet below the noise floor (10th percentile of frame energies) + this many dB,
or + a quarter of the floor-to-speech range when that is smaller (a noisy recording)."""
SPLIT_S = 0.2
"""A recording longer than a piece is cut at every pause at least this long (one utterance per
piece, as in training: packing utterances up to the window had 1.5x the CER with 0.1-0.25 s
pauses, BENCHMARKS.md section 12); shorter pauses only where a piece must end."""
BREAK_S = 0.2
"""Pauses at least this long separate words even where the model emitted no space."""
PAD_S = 0.15
"""Silence (zeros) added before and after each piece of a longer recording: training clips start and
end in silence, and the same clips cut to their speech had 1.8x the CER."""
EDGE_S = 0.12
"""The merge never switches pieces closer than this to an overlap's ends, where a piece's words are cut."""


@dataclass(frozen=True)
class Piece:
    start: int
    """First sample of the piece in the recording."""
    end: int
    """One past its last sample."""


@dataclass(frozen=True)
class Word:
    text: str
    start: float
    """Seconds into the recording of its first character's frame."""
    end: float
    """... and of its last character's frame."""

    @property
    def centre(self) -> float:
        return (self.start + self.end) / 2


def quiet_frames(samples: np.ndarray, sample_rate: int) -> np.ndarray:
    """One bool per FRAME_S frame: True where the recording is near its noise floor."""
    hop = max(1, int(sample_rate * FRAME_S))
    n = len(samples) // hop
    if n == 0:
        return np.zeros(0, dtype=bool)
    x = samples[: n * hop].astype(np.float64).reshape(n, hop)
    db = 10 * np.log10((x ** 2).mean(axis=1) + 1e-10)
    floor, loud = np.percentile(db, 10), np.percentile(db, 99)
    return db < floor + min(QUIET_DB, max(0.25 * (loud - floor), 1.0))


def find_pauses(samples: np.ndarray, sample_rate: int, min_pause_s: float = MIN_PAUSE_S) -> list[tuple[int, int, int]]:
    """Pauses as (first sample, end sample, quietest sample inside), in order."""
    quiet = quiet_frames(samples, sample_rate)
    hop = max(1, int(sample_rate * FRAME_S))
    edges = np.flatnonzero(np.diff(np.concatenate([[0], quiet.astype(np.int8), [0]])))
    out = []
    for f0, f1 in zip(edges[::2], edges[1::2]):
        if (f1 - f0) * hop >= min_pause_s * sample_rate:
            seg = samples[f0 * hop: f1 * hop].astype(np.float64).reshape(f1 - f0, hop)
            quietest = f0 + int(np.argmin((seg ** 2).mean(axis=1)))
            out.append((int(f0 * hop), int(f1 * hop), quietest * hop + hop // 2))
    if out and len(samples) - out[-1][1] < hop:  # the trailing partial frame belongs to a final pause
        s, _, q = out[-1]
        out[-1] = (s, len(samples), q)
    return out


def _cut(pause: tuple[int, int, int], limit: int, keep: int) -> tuple[int, int]:
    """(end of the piece before, start of the piece after) for a cut in `pause`, the first <= limit."""
    ps, pe, quietest = pause
    if pe - ps <= 2 * keep:
        if quietest <= limit:
            return quietest, quietest
        return limit, limit  # the pause reaches past the window: cut where the window ends, still in it
    return min(ps + keep, limit), pe - keep


def split_recording(samples: np.ndarray, sample_rate: int, window_s: float) -> list[Piece]:
    """Pieces of at most window_s covering all the speech: cut in pauses, overlapping where there is none."""
    n, window = len(samples), int(window_s * sample_rate)
    if n <= window:
        return [Piece(0, n)]
    keep, overlap = int(KEEP_S * sample_rate), min(int(OVERLAP_S * sample_rate), window // 2)
    tail, cap = int(0.05 * sample_rate), PAUSE_CAP_S * sample_rate
    pauses = find_pauses(samples, sample_rate)
    if pauses and pauses[0][0] == 0:  # leading silence: start KEEP_S before the speech
        start = max(0, pauses[0][1] - keep)
        pauses = pauses[1:]
    else:
        start = 0
    if pauses and pauses[-1][1] == n:  # trailing silence: stop KEEP_S after the speech
        n = min(n, pauses[-1][0] + keep)
        pauses = pauses[:-1]
    pieces = []
    while start < n:
        limit = min(start + window, n)
        feasible = [p for p in pauses if start + tail < p[0] and p[0] + tail <= limit]
        clear = [p for p in feasible if p[1] - p[0] >= SPLIT_S * sample_rate]
        if n - start <= window and not clear:
            pieces.append(Piece(start, n))
            break
        if clear:  # one utterance per piece, as the model was trained
            end, start_next = _cut(clear[0], limit, keep)
        elif feasible:
            end, start_next = _cut(max(feasible, key=lambda p: (min(p[1] - p[0], cap), p[0])), limit, keep)
        else:  # speech the whole window: overlap the next one
            end, start_next = limit, limit - overlap
        pieces.append(Piece(start, end))
        start = start_next
    return pieces


def words_of(chars: list[tuple[str, float]], breaks: list[float] = ()) -> list[Word]:
    """Timed characters (CTC emissions, seconds) -> timed words: split at spaces, and at `breaks`
    (pause times: training clips never span a pause between utterances, so the model emits no space
    at one, and "seven" + pause + "eight" came out "seveneight")."""
    words, cur = [], []
    marks = np.sort(np.asarray(breaks, dtype=np.float64))
    for ch, t in chars + [(" ", math.inf)]:
        if cur and ch != " " and np.searchsorted(marks, cur[-1][1]) != np.searchsorted(marks, t):
            words.append(Word("".join(c for c, _ in cur), cur[0][1], cur[-1][1]))
            cur = []
        if ch == " ":
            if cur:
                words.append(Word("".join(c for c, _ in cur), cur[0][1], cur[-1][1]))
            cur = []
        else:
            cur.append((ch, t))
    return words


def _switch_time(o0: float, o1: float, words: list[Word], frame_s: float) -> float:
    """A moment in (o0 + EDGE_S, o1 - EDGE_S) no word covers, nearest the middle; the middle if none."""
    mid = (o0 + o1) / 2
    grid = np.arange(o0 + EDGE_S, o1 - EDGE_S, frame_s / 2)
    if not len(grid):
        return mid
    covered = np.zeros(len(grid), dtype=bool)
    for w in words:
        covered |= (grid >= w.start - frame_s) & (grid <= w.end + frame_s)
    free = grid[~covered]
    return float(free[np.argmin(np.abs(free - mid))]) if len(free) else mid


def merge_words(pieces: list[Piece], words: list[list[Word]], sample_rate: int,
                frame_s: float) -> tuple[list[Word], list[tuple[float, float]]]:
    """The words of consecutive pieces as one transcript: each word once, taken from the piece that
    heard it whole where pieces overlap. frame_s: the model's frame length (its timing resolution).
    Also each piece's own stretch (seconds): where its words were kept."""
    out: list[Word] = []
    own = [(p.start / sample_rate, p.end / sample_rate) for p in pieces]
    for i, (piece, ws) in enumerate(zip(pieces, words)):
        if i and piece.start < pieces[i - 1].end:
            o0, o1 = piece.start / sample_rate, pieces[i - 1].end / sample_rate
            near = [w for w in out + ws if w.end >= o0 - frame_s and w.start <= o1 + frame_s]
            t = _switch_time(o0, o1, near, frame_s)
            out = [w for w in out if w.centre < t] + [w for w in ws if w.centre >= t]
            own[i - 1], own[i] = (own[i - 1][0], t), (t, own[i][1])
        else:
            out += ws
    return out, own


def piece_samples(samples: np.ndarray, piece: Piece, min_samples: int, pad: tuple[int, int] = (0, 0)) -> np.ndarray:
    """The piece's samples with pad[0] zeros before and pad[1] after, padded at the end to min_samples."""
    x = np.pad(samples[piece.start: piece.end], pad)
    return np.pad(x, (0, min_samples - len(x))) if len(x) < min_samples else x


def edge_padding(quiet: np.ndarray, piece: Piece, sample_rate: int) -> tuple[int, int]:
    """Zeros to add before and after a piece so it starts and ends in PAD_S of quiet, as training clips do."""
    hop, want = max(1, int(sample_rate * FRAME_S)), int(PAD_S / FRAME_S)
    f0, f1 = piece.start // hop, min(len(quiet), -(-piece.end // hop))
    head, tail = quiet[f0: f0 + want], quiet[max(f0, f1 - want): f1][::-1]
    lead = len(head) if head.all() else int(np.argmin(head)) if len(head) else 0
    trail = len(tail) if tail.all() else int(np.argmin(tail)) if len(tail) else 0
    return (want - lead) * hop, (want - trail) * hop


@dataclass(frozen=True)
class Transcript:
    text: str
    confidence: float
    """The pieces' mean confidence (calibrated: the share of pieces expected exactly right)."""
    pieces: int
    lowest: float
    """The least sure piece's confidence ..."""
    lowest_at: float
    """... and where its stretch starts, in seconds."""


def transcribe_recording(model, samples: np.ndarray, sample_rate: int, window_s: float, min_s: float) -> Transcript:
    """A CTC speech model's transcript of a recording of any length, piece by piece (split_recording,
    merge_words), with its confidence: ctc_speech.sequence_confidence of each piece's own stretch, at
    the model's `confidence_temperature` (fitted on the validation clips)."""
    import torch

    from e2e_dist.models.ctc_speech import greedy_emissions, sequence_confidence

    temperature = float(getattr(model, "confidence_temperature", 1.0))
    pieces = split_recording(samples, sample_rate, window_s)
    quiet = quiet_frames(samples, sample_rate)
    breaks = [q / sample_rate for _, _, q in find_pauses(samples, sample_rate, BREAK_S)]
    words, lps, frame_s = [], [], window_s
    with torch.no_grad():
        for p in pieces:
            pad = edge_padding(quiet, p, sample_rate) if len(pieces) > 1 else (0, 0)
            x = piece_samples(samples, p, int(min_s * sample_rate), pad)
            lp, frames = model.log_probs(torch.from_numpy(x)[None], torch.tensor([len(x)]))
            lp = lp[0, : int(frames[0])]
            frame_s, t0 = len(x) / sample_rate / max(1, lp.shape[0]), (p.start - pad[0]) / sample_rate
            # A character's time: the middle of its run of frames.
            words.append(words_of([(model.alphabet[i - 1], t0 + (a + b + 1) / 2 * frame_s)
                                   for i, a, b in greedy_emissions(lp)], breaks))
            lps.append((t0, frame_s, lp))
    merged, own = merge_words(pieces, words, sample_rate, frame_s)
    confidences = []
    for (t0, step, lp), (lo, hi) in zip(lps, own):
        # Overlapping pieces: only the frames whose words were kept (the cut-off edges are not the answer).
        f0, f1 = max(0, round((lo - t0) / step)), min(lp.shape[0], round((hi - t0) / step))
        confidences.append(sequence_confidence(lp[f0:f1] if len(pieces) > 1 else lp, temperature))
    worst = int(np.argmin(confidences))
    return Transcript(" ".join(w.text for w in merged), float(np.mean(confidences)), len(pieces),
                      confidences[worst], own[worst][0])
