"""Speech sources: `speech-manifest` (JSONL + WAV/FLAC, local or `s3://`) and `spoken-digits`.

A manifest line is `{"audio": path, "text": transcript}`; `audio` is relative to the manifest's
folder, absolute, or `s3://...`. `spoken-digits` synthesizes a corpus with eSpeak NG and the other
`data.synthesizers` into a cache folder once (`synth_speech.ensure_speech_corpus`) and then reads
it through the manifest path.

On the driver: manifests are parsed; transcripts are lower-cased, characters outside the
model's alphabet dropped (one warning listing them); audio files that do not exist are skipped
with a warning naming the manifest line and the file (one listing per folder, not one request
per file). The split is by the hash of each line's audio path (`common.split_by_hash`),
`fraction` takes a nested prefix of the seeded train order. Ray Data tasks then read and decode
each file with soundfile (`decode_audio`): mono, resampled to `data.sample_rate`, cut or
zero-padded to `data.max_audio_seconds`; targets are character ids (alphabet[i] -> i + 1, 0 is
the CTC blank) padded to the longest transcript.

Bad items (undecodable or truncated audio, a file gone since listing) are skipped with a warning
naming the file, or raise `DataError` with `data.strict`; strict also scans every file on the
driver first, so the run stops before training starts.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import posixpath
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from e2e_dist.config import CTCSpeechConfig
from e2e_dist.data.common import (
    DataError, decoded_dataset, is_remote, list_files, note_bad_item, raise_first_bad, read_many, read_range,
    row_seed, scan_batch, seeded_order, split_by_hash, take_fraction,
)
from e2e_dist.console import FILE_ONLY
from e2e_dist.data.registry import DataBundle, register_source
from e2e_dist.data.samples import VALID, row_samples
from e2e_dist.errors import ConfigError
from e2e_dist.storage import resolve

log = logging.getLogger("e2e_dist.data")
ROWS_PER_BLOCK = 32
"""Clips per Ray block/task (2 s at 16 kHz is 128 KiB of float32 each)."""


@dataclass(frozen=True)
class Utterance:
    uri: str
    """Local absolute path or s3:// URI of the audio file."""
    key: str
    """The audio path as the manifest wrote it: hashed for the split, stable across machines."""
    text: str
    """Normalized transcript (only alphabet characters)."""
    size: int


# ------------------------------------------------------------------------------ decoding
def wav_truncation(data: bytes) -> str | None:
    """Why a RIFF/WAVE file is truncated (its data chunk claims more bytes than exist), else None.

    libsndfile reads such files without error, returning fewer samples, so a cut-off download would
    otherwise train silently on a clipped utterance with the full transcript.
    """
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return None
    pos = 12
    while pos + 8 <= len(data):
        chunk, size = data[pos:pos + 4], int.from_bytes(data[pos + 4:pos + 8], "little")
        if chunk == b"data":
            have = len(data) - pos - 8
            if size != 0xFFFFFFFF and size > have:  # 0xFFFFFFFF: streamed WAV of unknown length
                return f"truncated WAV: data chunk declares {size} bytes, file holds {have}"
            return None
        pos += 8 + size + (size & 1)
    return "truncated WAV: no data chunk"


def decode_audio(data: bytes, sample_rate: int) -> np.ndarray:
    """WAV/FLAC/OGG bytes -> mono float32 samples at `sample_rate`. Raises ValueError on bad audio."""
    import soundfile as sf
    from scipy.signal import resample_poly

    problem = wav_truncation(data)
    if problem:
        raise ValueError(problem)
    try:
        x, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:
        raise ValueError(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    x = x.mean(axis=1)
    if not x.size:
        raise ValueError("no samples")
    if sr != sample_rate:
        g = math.gcd(sr, sample_rate)
        x = resample_poly(x, sample_rate // g, sr // g).astype(np.float32)
    return x


def normalize_transcript(text: str, alphabet: str) -> tuple[str, set[str]]:
    """Lower-case, keep alphabet characters, squeeze spaces; returns (text, dropped characters)."""
    lowered = " ".join(str(text).lower().split())
    dropped = {c for c in lowered if c not in alphabet}
    kept = "".join(c for c in lowered if c in alphabet)
    return (" ".join(kept.split()) if " " in alphabet else kept), dropped


def encode_transcript(text: str, alphabet: str) -> list[int]:
    """Character ids: alphabet[i] -> i + 1 (0 is the CTC blank)."""
    index = {c: i + 1 for i, c in enumerate(alphabet)}
    return [index[c] for c in text if c in index]


def decode_clips(batch: dict, *, sample_rate: int, max_samples: int, max_chars: int, alphabet: str, storage: Any,
                 strict: bool, scan: bool = False, augment: bool = False) -> dict:
    """Ray Data map_batches fn / row decoder: rows {uri, size, text[, seed]} -> fixed-shape audio/target
    arrays and `valid` (a bad file keeps its row, silent and invalid, or raises when strict).

    augment: each row's clip is augmented (data/speech_augment.py) by a generator seeded with the
    row's `seed`. With scan=True it returns only the bad files ({uri, reason}): the strict pre-check.
    """
    from e2e_dist.data.speech_augment import augment_clip

    audio, audio_len, targets, target_len, valid, bad, cut = [], [], [], [], [], [], []
    seeds = batch["seed"] if augment else [0] * len(batch["uri"])
    datas = read_many(batch["uri"], batch["size"], storage)
    for uri, data, text, seed in zip(batch["uri"], datas, batch["text"], seeds):
        try:
            if isinstance(data, Exception):
                raise data
            x = decode_audio(data, sample_rate)
        except Exception as e:  # any read/decoder failure (OSError, ValueError, ...) = a bad item
            note_bad_item(bad, "audio", uri, e, strict=strict, scan=scan)
            x, ok = np.zeros(0, np.float32), False
        else:
            ok = True
        if scan:
            continue
        if augment and ok:
            x = augment_clip(x, np.random.default_rng(int(seed)), sample_rate, max_samples)
        if len(x) > 1.1 * max_samples:  # >10% lost: speech, not just trailing silence, may be gone
            cut.append(str(uri))
        x = x[:max_samples]
        ids = encode_transcript(str(text), alphabet)[:max_chars]
        audio.append(np.pad(x, (0, max_samples - len(x))))
        audio_len.append(len(x))
        targets.append(ids + [0] * (max_chars - len(ids)))
        target_len.append(len(ids))
        valid.append(ok)
    if scan:
        return scan_batch(bad)
    if cut:
        log.warning("%d clip(s) over 1.1x data.max_audio_seconds were cut, their transcripts may no longer match "
                    "(e.g. %s)", len(cut), cut[0])
    return {"audio": np.stack(audio).astype(np.float32) if audio else np.zeros((0, max_samples), np.float32),
            "audio_len": np.array(audio_len, dtype=np.int64),
            "targets": np.array(targets, dtype=np.int64).reshape(len(targets), max_chars),
            "target_len": np.array(target_len, dtype=np.int64), VALID: np.array(valid, dtype=bool)}


def collate(batch: dict) -> dict:
    """numpy batch -> {"audio": float (B, N), "audio_lens", "targets": long (B, L), "target_lens"}."""
    import torch

    def t(name: str, dtype) -> "torch.Tensor":
        return torch.from_numpy(np.array(batch[name], dtype=dtype))  # a copy: Ray arrays are read-only

    return {"audio": t("audio", np.float32), "audio_lens": t("audio_len", np.int64),
            "targets": t("targets", np.int64), "target_lens": t("target_len", np.int64)}


# ------------------------------------------------------------------------------ driver side
def _bad(where: str, msg: str, strict: bool) -> None:
    if strict:
        raise DataError(f"{where}: {msg}")
    log.warning("%s: %s; skipped", where, msg)


def _audio_uri(manifest_uri: str, audio: str) -> str:
    if is_remote(audio) or os.path.isabs(audio):
        return audio
    if is_remote(manifest_uri):
        return "s3://" + posixpath.normpath(posixpath.join(posixpath.dirname(manifest_uri[len("s3://"):]), audio))
    return os.path.normpath(os.path.join(os.path.dirname(manifest_uri), audio))


def _existing_sizes(uris: Sequence[str], storage_cfg: Any) -> dict[str, int]:
    """Sizes of the files among `uris` that exist: local stat, or one S3 listing per folder."""
    import pyarrow.fs as pafs

    sizes: dict[str, int] = {}
    local = [u for u in uris if not is_remote(u)]
    for u in local:
        try:
            if os.path.isfile(u):
                sizes[u] = os.path.getsize(u)
        except OSError:
            pass
    for folder in sorted({posixpath.dirname(u) for u in uris if is_remote(u)}):
        fs, base = resolve(folder, storage_cfg)
        try:
            infos = fs.get_file_info(pafs.FileSelector(base.rstrip("/"), recursive=False, allow_not_found=True))
        except OSError as e:
            raise DataError(f"data.paths: cannot list {folder}: {str(e).splitlines()[0]}") from None
        for info in infos:
            if info.type == pafs.FileType.File:
                sizes["s3://" + info.path] = info.size
    return sizes


MANIFEST_SUFFIXES = (".jsonl", ".json")


def read_manifests(paths: Sequence[str], alphabet: str, storage_cfg: Any, strict: bool) -> list[Utterance]:
    """Every usable manifest line as an Utterance; bad lines and missing files warned about (or raised)."""
    entries: list[tuple[str, str, str, str]] = []  # (where, uri, key, text)
    dropped: set[str] = set()
    for m in list_files(paths, storage_cfg, suffixes=MANIFEST_SUFFIXES, strict=strict):
        raw = read_range(m.uri, 0, m.size, storage_cfg).decode("utf-8", errors="replace")
        for lineno, line in enumerate(raw.splitlines(), 1):
            where = f"{m.uri}:{lineno}"
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                audio, text = row["audio"], row["text"]
                if not isinstance(audio, str) or not isinstance(text, str):
                    raise TypeError
            except (ValueError, KeyError, TypeError):
                _bad(where, 'not a JSON object with string "audio" and "text"', strict)
                continue
            norm, lost = normalize_transcript(text, alphabet)
            dropped |= lost
            if not norm:
                _bad(where, f"transcript {text!r} has no character of the model's alphabet", strict)
                continue
            entries.append((where, _audio_uri(m.uri, audio), audio, norm))
    if dropped - {" "}:
        log.warning("transcript characters outside the model alphabet were dropped: %s",
                    "".join(sorted(dropped - {" "})))
    sizes = _existing_sizes([uri for _, uri, _, _ in entries], storage_cfg)
    out = []
    for where, uri, key, text in entries:
        if sizes.get(uri):
            out.append(Utterance(uri=uri, key=key, text=text, size=sizes[uri]))
        else:
            _bad(where, f"audio file missing or empty: {uri}", strict)
    return out


def build_speech_bundle(data_cfg: Any, model_cfg: Any, storage_cfg: Any, *, augment: bool = False) -> DataBundle:
    """Manifests -> split, subset, lazily decoded Ray Datasets of fixed-shape clips + stats.
    augment: `data.variants` augmented copies of each training clip (validation stays as recorded)."""
    if not data_cfg.paths:
        raise ConfigError("data.paths: source 'speech-manifest' needs one or more manifest.jsonl files (local or s3://)")
    label = ", ".join(data_cfg.paths)
    alphabet = getattr(model_cfg, "alphabet", None) or CTCSpeechConfig().alphabet
    utts = read_manifests(data_cfg.paths, alphabet, storage_cfg, data_cfg.strict)
    utts = seeded_order(utts, seed=data_cfg.seed)[: data_cfg.max_files or None]
    train_all, val = split_by_hash(utts, val_fraction=data_cfg.val_fraction, seed=data_cfg.seed)
    train = take_fraction(train_all, data_cfg.fraction)
    if not train or not val:
        raise DataError(f"data: {label} has too few usable utterances ({len(utts)}) for a train and a val split")
    fn_kwargs = {"sample_rate": data_cfg.sample_rate,
                 "max_samples": int(data_cfg.sample_rate * data_cfg.max_audio_seconds),
                 "max_chars": max(len(u.text) for u in train + val), "alphabet": alphabet, "storage": storage_cfg,
                 "strict": data_cfg.strict}

    def rows(items: Sequence[Utterance]) -> list[dict]:
        return [{"uri": u.uri, "size": u.size, "text": u.text} for u in items]

    def augmented_rows(items: Sequence[Utterance]) -> list[dict]:
        return [{"uri": u.uri, "size": u.size, "text": u.text, "seed": row_seed(data_cfg.seed, u.key, k)}
                for u in items for k in range(data_cfg.variants)]

    if data_cfg.strict:
        scan = decoded_dataset(rows(train + val), decode_clips, name="scan", rows_per_block=ROWS_PER_BLOCK,
                               fn_kwargs={**fn_kwargs, "strict": False, "scan": True})
        raise_first_bad(scan.take_all(), "audio")
    train_rows = augmented_rows(train) if augment else rows(train)
    stats = {"train_rows": len(train_rows), "val_rows": len(val), "train_samples": len(train_rows),
             "train_clips": len(train), "train_bytes": sum(u.size for u in train),
             "train_chars": sum(len(u.text) for u in train)}
    log.info("speech data %s: %s", label, stats, extra=FILE_ONLY)
    row_bytes = fn_kwargs["max_samples"] * 4 + fn_kwargs["max_chars"] * 8 + 17  # float32 audio, int64 targets

    def samples(rows: list[dict], name: str, kwargs: dict):
        return row_samples(name, rows, decode_clips, kwargs, sample_bytes=row_bytes, rows_per_task=ROWS_PER_BLOCK,
                           size_column="size")

    return DataBundle(train=samples(train_rows, "train", {**fn_kwargs, "augment": augment}),
                      val=samples(rows(val), "val", fn_kwargs), collate=collate, stats=stats)


@register_source("speech-manifest")
def build_speech_manifest(data_cfg, *, model_cfg=None, storage_cfg=None) -> DataBundle:
    """User speech: data.paths = manifest.jsonl file(s), local or s3://."""
    return build_speech_bundle(data_cfg, model_cfg, storage_cfg)


build_speech_manifest.check_paths = lambda data_cfg, storage_cfg: list_files(  # see registry.check_data
    data_cfg.paths, storage_cfg, suffixes=MANIFEST_SUFFIXES, strict=data_cfg.strict)


SPOKEN_DIGITS_UTTERANCES = 1200
"""Size of the built-in corpus (fixed, with seed 0: every run and machine sees the same clips);
`data make-speech` writes as many by default (cli.SPOKEN_DIGITS_UTTERANCES, kept equal by a test)."""
OTHER_VOICE_SHARE = 0.4
"""Share of the built-in corpus spoken by engines other than eSpeak NG (when data.synthesizers has
any): their few voices sound more like people than eSpeak's many, and the model must hear them
often enough to stop leaning on eSpeak's formant sound."""


@register_source("spoken-digits")
def build_spoken_digits(data_cfg, *, model_cfg=None, storage_cfg=None) -> DataBundle:
    """Built-in: spoken digits (eSpeak NG and data.synthesizers), generated once into data.paths[0]
    or the cache folder."""
    from e2e_dist.data.images import cache_root
    from e2e_dist.data.synth_speech import corpus_voices, ensure_speech_corpus, split_variants

    if len(data_cfg.paths) > 1 or (data_cfg.paths and "://" in data_cfg.paths[0]):
        raise ConfigError("data.paths: source 'spoken-digits' takes at most one local folder "
                          "(where to write the corpus)")
    held = split_variants(data_cfg.held_out, data_cfg.seed)[1]
    train_variants, voices = corpus_voices("training", data_cfg.held_out, data_cfg.seed, data_cfg.synthesizers)
    # The corpus speaks with the training voices only: its folder is named by the held-out split.
    folder = data_cfg.paths[0] if data_cfg.paths else cache_root() / spoken_digits_folder(data_cfg)
    manifest = ensure_speech_corpus(folder, SPOKEN_DIGITS_UTTERANCES, seed=0, variants=train_variants,
                                    max_seconds=data_cfg.max_audio_seconds, voices=voices,
                                    voice_share=OTHER_VOICE_SHARE)
    log.info("spoken digits: voice variants held out: %s; other voices: %s", " ".join(held) or "none",
             " ".join(v.label for v in voices) or "none", extra=FILE_ONLY)
    return build_speech_bundle(data_cfg.model_copy(update={"paths": [str(manifest)]}), model_cfg, storage_cfg,
                               augment=data_cfg.augment)


def spoken_digits_folder(data_cfg: Any) -> str:
    """The cache folder of the built-in corpus for this held-out split and clip length (no clip of
    it longer than data.max_audio_seconds: what the model hears, it hears whole)."""
    engines = "+".join(sorted(data_cfg.synthesizers))
    return (f"spoken-digits-v5-{SPOKEN_DIGITS_UTTERANCES}-{engines}-max{data_cfg.max_audio_seconds:g}s"
            f"-heldout{data_cfg.held_out:g}-seed{data_cfg.seed}")
