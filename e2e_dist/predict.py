"""`e2e-dist predict`: input files through an exported model, with plain PyTorch (no DeepSpeed, no Ray).

An image file -> its class label with the top classes' probabilities; an audio file -> its
transcript with a confidence. The input is prepared as the training pipeline prepared it (the
same decode/resize/normalize or decode/resample functions, sizes from the exported run config),
after bringing it into the training form where it is not (input_contract.py).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
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
    if cfg.data.source in ("digits", "digit-glyphs"):
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
TOP_K = 3
"""Classes shown with their probabilities after the answer."""


@dataclass(frozen=True)
class Prediction:
    answer: str
    """The class label, or the transcript."""
    details: str
    """Image: the answer's probability and the top classes; speech: confidence (and pieces)."""
    confidence: float | None = None
    """Image: the answer's (calibrated) probability, unrounded (benchmarks measure calibration with it);
    speech: the transcript's confidence, unrounded."""


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
    return predict_details(model, cfg, input_path, storage_cfg).answer


def predict_details(model: Any, cfg: Any, input_path: str, storage_cfg: Any = None) -> Prediction:
    """The answer for one file with how sure the model is; UserError naming the file. The input is
    brought into the training form as input_contract.py says, or refused in one line."""
    data = _read_input(input_path, storage_cfg)
    if model.input_kind == "pixels":
        return _image_prediction(model, cfg, data, input_path, storage_cfg)
    return _speech_prediction(model, cfg, data, input_path)


def _image_prediction(model: Any, cfg: Any, data: bytes, input_path: str, storage_cfg: Any) -> Prediction:
    import numpy as np
    from PIL import Image

    from e2e_dist.data.images import image_pixels
    from e2e_dist.input_contract import OutOfContract, check_image_size, glyph_like_training, open_image, pad_square

    try:
        im = open_image(data)
        check_image_size(im, input_path)
        if cfg.data.source == "digits":  # glyph models: polarity and framing as the built-in digits have them
            glyph = glyph_like_training(np.asarray(im.convert("L"), dtype=np.float64) / 255.0, DIGITS_SOURCE_SIDE)
            im = Image.fromarray(np.round(glyph * 255).astype(np.uint8), mode="L")
            im = im.resize((DIGITS_SOURCE_SIDE, DIGITS_SOURCE_SIDE), Image.Resampling.BOX)  # as the 8x8 originals
        elif cfg.data.source == "digit-glyphs":  # trained on every polarity and framing: only keep the aspect
            im = pad_square(im)
        pixels = image_pixels(im, cfg.data.image_size, model.in_channels)
    except OutOfContract as e:
        raise UserError(f"input: {e}") from None
    except Exception as e:  # any decoder failure means the input is not a usable image
        raise UserError(f"input: cannot decode image {input_path}: {_why(e)}") from None
    with torch.no_grad():
        logits = model.logits(torch.from_numpy(pixels)[None]).float()
        # Calibrated: divided by the temperature fitted on the validation set (models/classifier.py)
        probs = torch.softmax(logits / float(getattr(model, "temperature", 1.0)), dim=-1)[0]
    names = class_names(cfg, model.num_classes, storage_cfg)
    top = torch.topk(probs, min(TOP_K, len(probs)))
    ranked = [(names[int(i)], float(p)) for p, i in zip(top.values, top.indices)]
    return Prediction(ranked[0][0], f"p={ranked[0][1]:.2f}\ttop{len(ranked)}: "
                      + ", ".join(f"{n} {p:.2f}" for n, p in ranked), confidence=ranked[0][1])


DIGITS_SOURCE_SIDE = 8
"""The built-in digits are 8x8 images (upsampled to data.image_size by the pipeline)."""


def _speech_prediction(model: Any, cfg: Any, data: bytes, input_path: str) -> Prediction:
    from e2e_dist.audio_segments import transcribe_recording
    from e2e_dist.data.speech import decode_audio
    from e2e_dist.input_contract import OutOfContract, check_audio_length

    try:
        samples = decode_audio(data, cfg.data.sample_rate)
        check_audio_length(samples, cfg.data.sample_rate)
    except OutOfContract as e:
        raise UserError(f"input: {input_path}: {e}") from None
    except ValueError as e:
        raise UserError(f"input: cannot decode audio {input_path}: {_why(e)}") from None
    # Cut at pauses into pieces as long as training's clips at most, words merged (audio_segments.py);
    # confidence: the least sure frame, calibrated on the validation clips (models/ctc_speech.py).
    t = transcribe_recording(model, samples, cfg.data.sample_rate, cfg.data.max_audio_seconds, MIN_AUDIO_SECONDS)
    extra = f"\tpieces={t.pieces}\tlowest={t.lowest:.2f}@{t.lowest_at:.1f}s" if t.pieces > 1 else ""
    return Prediction(t.text, f"confidence={t.confidence:.2f}{extra}", confidence=t.confidence)


def predict(exported_file: str, input_path: str, storage_cfg: Any = None) -> str:
    """Class label (image models) or transcript (speech models) of the file at `input_path`."""
    model, cfg = load_predictor(exported_file, storage_cfg)
    return predict_one(model, cfg, input_path, storage_cfg)
