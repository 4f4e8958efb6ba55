"""`e2e-dist predict`: one input file through an exported model, with plain PyTorch (no DeepSpeed, no Ray).

An image file -> its class label; an audio file -> its transcript. The input is prepared exactly
as the training data pipeline prepared it (same decode/resize/normalize or decode/resample
functions, with the sizes from the exported run config), so predictions match what was trained.
"""

from __future__ import annotations

import os
import re
from typing import Any

import torch

from e2e_dist.config import absolute_path
from e2e_dist.data.common import is_remote, list_files, read_range
from e2e_dist.errors import UserError


def class_names(cfg: Any, num_classes: int, storage_cfg: Any = None) -> list[str]:
    """Labels of the classifier's outputs, in index order.

    The training data defines them (sorted class folder names), and a run config does not record
    them: the built-in digits ("0".."9"); the class folders of the run's image folder when it is
    still reachable; else "class <i>".
    """
    if cfg.data.source == "digits":
        return [str(i) for i in range(num_classes)]
    if cfg.data.source == "image-folder" and cfg.data.paths:
        from e2e_dist.data.images import IMAGE_SUFFIXES, class_of

        try:
            files = list_files(cfg.data.paths, storage_cfg, suffixes=IMAGE_SUFFIXES)
        except UserError:
            files = []
        found = sorted({c for c in map(class_of, files) if c is not None})
        if found:
            return found + [f"class {i}" for i in range(len(found), num_classes)]
    return [f"class {i}" for i in range(num_classes)]


def _read_input(input_path: str, storage_cfg: Any) -> bytes:
    """The input file's bytes (local path or s3:// object); UserError naming it when it is not a file."""
    if is_remote(input_path):
        items = list_files([input_path], storage_cfg, field="input")  # DataError when nothing is there
        item = next((it for it in items if it.uri == input_path), None)
        if item is None:
            raise UserError(f"input: {input_path} is a prefix, not a file")
        uri, size = item.uri, item.size
    else:
        uri = absolute_path(input_path)
        if os.path.isdir(uri):
            raise UserError(f"input: {input_path} is a directory, not a file (give the files in it)")
        if not os.path.isfile(uri):
            raise UserError(f"input: no such file: {input_path}")
        size = os.path.getsize(uri)
    try:
        return read_range(uri, 0, size, storage_cfg)
    except OSError as e:
        raise UserError(f"input: cannot read {input_path}: {e}") from None


MIN_AUDIO_SECONDS = 0.1
"""Shorter clips are padded with silence to this: the model's strided convolutions need a few
hundred samples, and silence decodes to nothing."""


def load_predictor(exported_file: str, storage_cfg: Any = None) -> tuple[Any, Any]:
    """The exported image or speech model (eval mode) and its run config; UserError for text models."""
    from e2e_dist.export import load_exported

    model, cfg = load_exported(exported_file, storage_cfg)
    kind = getattr(model, "input_kind", None)
    if kind not in ("pixels", "waveform"):
        raise UserError(f"predict: {exported_file} holds a {cfg.model.kind!r} model ({kind} in); predict takes "
                        "image or speech models (use `e2e-dist generate` for text models)")
    return model.eval(), cfg


def _why(e: Exception) -> str:
    """The first line of a decoder's error, without the in-memory buffer's repr PIL puts there."""
    line = (str(e).splitlines() or [type(e).__name__])[0]
    return re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", line) or type(e).__name__


def predict_one(model: Any, cfg: Any, input_path: str, storage_cfg: Any = None) -> str:
    """Class label (image models) or transcript (speech models) of one file; UserError naming it."""
    data = _read_input(input_path, storage_cfg)
    if model.input_kind == "pixels":
        from e2e_dist.data.images import decode_image

        try:
            pixels = decode_image(data, cfg.data.image_size, model.in_channels)
        except Exception as e:  # any decoder failure means the input is not a usable image
            raise UserError(f"input: cannot decode image {input_path}: {_why(e)}") from None
        index = int(model.predict(torch.from_numpy(pixels)[None])[0])
        return class_names(cfg, model.num_classes, storage_cfg)[index]
    from e2e_dist.data.speech import decode_audio

    try:
        samples = decode_audio(data, cfg.data.sample_rate)
    except ValueError as e:
        raise UserError(f"input: cannot decode audio {input_path}: {_why(e)}") from None
    audio = torch.from_numpy(samples)[None]
    shortest = int(MIN_AUDIO_SECONDS * cfg.data.sample_rate)
    if audio.shape[1] < shortest:
        audio = torch.nn.functional.pad(audio, (0, shortest - audio.shape[1]))
    return model.transcribe(audio, torch.tensor([audio.shape[1]]))[0]


def predict(exported_file: str, input_path: str, storage_cfg: Any = None) -> str:
    """Class label (image models) or transcript (speech models) of the file at `input_path`."""
    model, cfg = load_predictor(exported_file, storage_cfg)
    return predict_one(model, cfg, input_path, storage_cfg)
