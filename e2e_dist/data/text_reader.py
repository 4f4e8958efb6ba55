"""Reading text windows by number: the worker side of the text sources.

A split is one byte stream (files and record shards laid end to end, EOS after each read to its
end); window k is stream[k*S : k*S + S + 1]. `TextReader.read_chunks(ids, chunk)` sorts the
windows it is asked for, merges neighbours (and small gaps) into stream ranges and reads each range
once (plain files with one ranged read per file piece, record shards from the nearest checkpoint
of their index, data/records.py), then cuts the windows from them chunk by chunk. Blocks (data/order.py) are ~256 KiB stretches of plain files and, in record
shards, the stretches between checkpoints (Parquet row groups, ~1 MiB of JSONL), so a rank that
reads its blocks whole decodes each row group once.
"""

from __future__ import annotations

import logging
from typing import Any, Iterator

import numpy as np

from e2e_dist.data.common import DataError, read_range
from e2e_dist.data.samples import VALID, Shared

log = logging.getLogger("e2e_dist.data")
BLOCK_STREAM_BYTES = 1 << 18
"""Stream bytes per block of plain files: one read that amortizes a request, small enough to mix."""
MERGE_GAP_BYTES = 1 << 12
"""Windows closer than this in the stream are read as one range (fewer requests, a few bytes more)."""


def _read_tokens(uri: str, offset: int, n: int, storage_cfg: Any, strict: bool, pad: int) -> np.ndarray:
    """n byte ids of uri from offset; an unreadable or shrunk file reads as PAD (ignored by the
    loss) with a warning, so windows keep their place, or raises DataError when strict."""
    try:
        data = read_range(uri, offset, n, storage_cfg)
    except OSError as e:
        if strict:
            raise DataError(f"data.paths: cannot read {uri}: {str(e).splitlines()[0] if str(e) else e!r}") from None
        log.warning("unreadable %s (%s): its bytes become PAD", uri, e)
        data = b""
    out = np.full(n, pad, dtype=np.uint16)
    out[: len(data)] = np.frombuffer(data, dtype=np.uint8)
    if len(data) < n:
        if strict:
            raise DataError(f"data.paths: {uri} is shorter than listed (changed while training?)")
        if data:
            log.warning("%s shrank since it was listed: %d missing bytes become PAD", uri, n - len(data))
    return out


class TextReader:
    """Windows of one split's stream. Everything that grows with the corpus (segments, checkpoints)
    is in the object store once (`Shared`); the reader itself pickles to a few hundred bytes."""

    def __init__(self, segments: dict[str, np.ndarray], uris: list[str], checkpoints: dict[str, tuple], *,
                 seq_len: int, storage: Any, strict: bool, eos: int, pad: int, column: str, node_cache_mb: int = 0):
        self.shared = Shared.put({"segments": segments, "uris": uris, "checkpoints": checkpoints})
        self.seq_len, self.storage, self.strict = seq_len, storage, strict
        self.eos, self.pad, self.column, self.node_cache_mb = eos, pad, column, node_cache_mb

    def read(self, ids: np.ndarray) -> tuple[dict[str, np.ndarray], int]:
        return next(self.read_chunks(ids, max(1, len(ids))))

    def read_chunks(self, ids: np.ndarray, chunk: int) -> Iterator[tuple[dict[str, np.ndarray], int]]:
        """The windows `ids`, `chunk` at a time: every stream range they need is read first (once:
        the bytes read come with the first chunk), then windows are cut from it chunk by chunk."""
        S = self.seq_len
        sid = np.unique(ids)
        gap = max(1, MERGE_GAP_BYTES // S)
        cut = np.nonzero(np.diff(sid) > gap)[0] + 1
        firsts, streams, nbytes = [], [], 0
        for run in np.split(sid, cut):
            if len(run):
                w0, w1 = int(run[0]), int(run[-1])
                stream, read = self._range(w0 * S, w1 * S + S + 1)
                firsts.append(w0)
                streams.append(stream)
                nbytes += read
        starts = np.array(firsts, dtype=np.int64)
        for i in range(0, max(len(ids), 1), chunk):
            part = ids[i:i + chunk]
            tokens = np.empty((len(part), S + 1), dtype=np.uint16)
            which = np.searchsorted(starts, part, side="right") - 1
            for r in np.unique(which):
                at = np.nonzero(which == r)[0]
                tokens[at] = streams[r][(part[at] - starts[r])[:, None] * S + np.arange(S + 1)]
            yield ({"tokens": tokens, "index": part.astype(np.int64), VALID: np.ones(len(part), dtype=bool)},
                   nbytes if i == 0 else 0)

    def _range(self, lo: int, hi: int) -> tuple[np.ndarray, int]:
        """Stream bytes [lo, hi) as token ids, and the bytes read (or decoded) from storage for them."""
        from e2e_dist.data.records import read_stream

        shared = self.shared.get()
        seg, uris, ckpts = shared["segments"], shared["uris"], shared["checkpoints"]
        offs, starts, lengths, eos, which = seg["offset"], seg["start"], seg["length"], seg["eos"], seg["uri"]
        parts, nbytes = [], 0
        i, pos = int(np.searchsorted(offs, lo, side="right")) - 1, lo
        while pos < hi:
            s0, n = int(offs[i]), int(lengths[i])
            if pos < s0 + n:
                take = min(hi, s0 + n) - pos
                uri, at = uris[which[i]], int(starts[i]) + pos - s0
                if uri in ckpts:
                    off, loc, identity = ckpts[uri]
                    data, read = read_stream(uri, at, take, column=self.column, offsets=off, locators=loc,
                                             storage_cfg=self.storage, eos=self.eos, identity=identity,
                                             cache_mb=self.node_cache_mb)
                else:
                    data, read = _read_tokens(uri, at, take, self.storage, self.strict, self.pad), take
                parts.append(data)
                nbytes += read
                pos += take
            if pos < hi and eos[i] and pos == s0 + n:
                parts.append(np.array([self.eos], np.uint16))
                pos += 1
            i += 1
        return np.concatenate(parts), nbytes


def block_starts(segments: dict[str, np.ndarray], uris: list[str], checkpoints: dict[str, np.ndarray],
                 seq_len: int, windows: int) -> np.ndarray:
    """Block boundaries (window numbers) of a split: every BLOCK_STREAM_BYTES of plain files, at the
    checkpoints of record shards (a Parquet row group is one block, however large: a block starting
    inside one would decode it from its start), and where a file starts."""
    offs, starts, lengths, which = segments["offset"], segments["start"], segments["length"], segments["uri"]
    total = int(offs[-1] + lengths[-1] + segments["eos"][-1]) if len(offs) else 0
    grid = np.arange(0, total, BLOCK_STREAM_BYTES, dtype=np.int64)
    seg_of = np.searchsorted(offs, grid, side="right") - 1
    is_record = np.array([uris[w] in checkpoints for w in which], dtype=bool)
    marks = [grid[~is_record[seg_of]], offs.astype(np.int64)]
    for i in np.nonzero(is_record)[0]:
        off = checkpoints[uris[which[i]]][0]
        inside = off[(off > starts[i]) & (off < starts[i] + lengths[i])]
        marks.append(offs[i] + inside - starts[i])
    # A block starts at the first window that begins at or after its mark.
    first = -(-np.concatenate(marks) // seq_len)
    return np.unique(np.concatenate([[0, windows], first[(first > 0) & (first < windows)]])).astype(np.int64)
