"""The data section of the run config (and `Section`, the base of every section).

Split from config.py to keep each module small; import both from e2e_dist.config. This module
must not import Ray, DeepSpeed or torch.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


def refuse_retired(data: Any, field: str, why: str) -> Any:
    """A section's raw input, or a one-line error when it sets a field that no longer exists."""
    if isinstance(data, dict) and field in data:
        raise ValueError(f"{field} {why}")
    return data


def describe_first_error(err: ValidationError, *, unknown: str = "unknown field") -> tuple[list[str], str, str]:
    """pydantic's first error as (location, message, " (got <value>)" or ""): the one wording of
    a bad value for the run config and for a plug-in's options. `unknown` words an extra key."""
    e = err.errors()[0]
    msg = unknown if e["type"] == "extra_forbidden" else e["msg"].removeprefix("Value error, ")
    got = e.get("input")
    shown = e["type"] not in ("extra_forbidden", "missing", "union_tag_invalid") and not isinstance(got, (dict, list))
    got_txt = f" (got {got!r})" if shown and repr(got) not in msg else ""
    return [str(p) for p in e["loc"]], msg, got_txt


class Section(BaseModel):
    """Base of every config section: unknown fields are errors; docstrings under fields are docs."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)


# ----------------------------------------------------------------------------------------- data
class DataConfig(Section):
    source: str = "stdlib-text"
    """Data source in the data registry: `text` (files/globs/s3 prefixes; Parquet/JSONL shards give
    their data.text_column), `stdlib-text` (built-in corpus: this Python's standard library sources),
    `image-folder` (class folders), `image-parquet` (image bytes + label columns in Parquet shards),
    `digits` (scikit-learn's 8x8 digits), `digit-glyphs` (digits rendered from the installed fonts and
    augmented, plus the scikit-learn digits), `speech-manifest`, `spoken-digits`; or a plug-in: a
    name installed packages declare under the `e2e_dist.data_sources` entry points, or an import
    path `package.module:builder` (docs/plugins.md)."""
    paths: list[str] = []
    """Files, globs or `s3://` prefixes for sources that read user data."""
    options: Any = {}
    """A plug-in source's own options (validated against the pydantic model it declares when the
    config loads; docs/plugins.md). Built-in sources take their settings from the fields here."""
    text_column: str = Field("text", min_length=1)
    """Text from Parquet / JSONL shards (`*.parquet`, `*.jsonl`, `*.ndjson` under data.paths): the
    column or field holding each document (UTF-8 strings; other files are read as raw bytes)."""
    seq_len: int = Field(128, ge=8, le=65536)
    """Text: length of each packed byte window (the model's context)."""
    val_fraction: float = Field(0.05, gt=0.0, lt=0.5)
    """Share of the data held out for validation; chosen deterministically by item hash."""
    fraction: float = Field(1.0, gt=0.0, le=1.0)
    """Data-size knob: deterministic subset of the training split (same seed -> same subset)."""
    max_bytes: int | None = Field(None, gt=0)
    """Text only: cap on training bytes after `fraction` (a deterministic prefix of the shuffled files)."""
    max_files: int | None = Field(None, gt=0)
    """Cap on the number of input files/items read (keeps tiny runs tiny)."""
    image_column: str = Field("image", min_length=1)
    """image-parquet: the column of encoded image bytes (binary, or a struct with a `bytes` field)."""
    label_column: str = Field("label", min_length=1)
    """image-parquet: the column of labels (integer classes, or class names: sorted into indices)."""
    image_size: int = Field(32, ge=8, le=1024)
    """Vision: images are resized to image_size x image_size."""
    sample_rate: int = Field(16000, ge=1000, le=96000)
    """Speech: waveforms are resampled to this rate."""
    max_audio_seconds: float = Field(2.0, gt=0)
    """Speech: longer clips are cut, shorter padded, to this length."""
    held_out: float = Field(0.25, ge=0.0, lt=1.0)
    """digit-glyphs: share of the font designs, spoken-digits: of eSpeak's voice variants, kept out
    of training and validation, so a model can be judged on fonts / voices it never saw
    (`e2e-dist data make-digits DIR`, `e2e-dist data make-speech DIR --voices held-out`)."""
    variants: int = Field(4, ge=1, le=64)
    """digit-glyphs, spoken-digits: differently augmented copies of each glyph / clip per epoch."""
    augment: bool = True
    """digit-glyphs: augment each copy (size, placement, rotation, slant, frame, resolution, blur,
    polarity, grey levels, noise, JPEG: data/glyph_augment.py); spoken-digits: speed, volume,
    silence, room echo, noise, telephone band, codecs (data/speech_augment.py). false: glyphs
    plain and centred, clips as synthesized."""
    synthesizers: list[Literal["espeak-ng", "flite", "festival"]] = Field(["espeak-ng", "flite"], min_length=1)
    """spoken-digits: the speech engines its corpus speaks with (data/synthesizers.py). An engine
    not listed is held out of training, and so is every speaker it has (Flite's kal and slt are
    Festival's too), so a model can be judged on a synthesis method it never heard."""
    strict: bool = False
    """Stop the run on the first unreadable item instead of skipping it with a warning."""
    seed: int = 0
    """Seed of the split, the subset and the per-epoch shuffle."""
    shuffle_blocks: int | None = Field(None, ge=1)
    """Blocks mixed in each window of the global shuffle (data/order.py): every epoch permutes the
    blocks (runs of samples read together: ~256 KiB of text, a Parquet row group, one file), then
    interleaves the samples of each `shuffle_blocks` consecutive blocks. More mixes more of the
    corpus into each batch; each rank reads ~1/W of the data when the global batch is at least
    this. None: max(64, 8 x the most workers the run may have). Kept with every checkpoint: a
    resume continues the order it began with."""
    decode_tasks: int | None = Field(None, ge=1)
    """Read/decode tasks each rank keeps running (Ray Data): enough to keep the step fed. None: the
    node's CPUs per training worker on it (at least 1)."""
    cache_mb: int = Field(1024, ge=0)
    """A decoded train set of images, clips or glyphs estimated at up to this many MiB is read and
    decoded once, before training, and kept in Ray's object store: every epoch's samples are then
    gathered from memory instead of read and decoded again. Larger sets, and text (its windows are
    cheap to read again), are read by each rank, its own samples only. 0 = always read."""
    node_cache_mb: int = Field(2048, ge=0)
    """Decoded Parquet row groups each node keeps on local disk for all its ranks' reads
    (data/node_cache.py: a window crossing into the next row group, blocks that neighbouring ranks
    share); the oldest go first. 0 = none."""
    index_cache: str | None = None
    """Where shard indexes are kept (record shards' stream checkpoints, Parquet row groups): a
    local folder or s3:// prefix. None: `<storage.path>/.e2e-index`, next to the runs, where every
    node and later run or sweep trial finds them."""

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        return refuse_retired(data, "shuffle_buffer_batches", "is gone: every epoch is a global shuffle now "
                              "(data.shuffle_blocks sets how many blocks each window mixes)")
