"""What `predict` accepts (e2e_dist/input_contract.py), through the `predict` CLI on exported models.

The images are scikit-learn digits as the built-in source writes them (8x8, bright ink on black),
re-encoded the ways people's files come: inverted, ink in the alpha channel, 16-bit, EXIF-rotated,
letterboxed in a large canvas. A digits model must see each as the original (the same pixels, so
the same probabilities); the model is untrained: only the input path is under test.
"""

from __future__ import annotations

import io
import math
import wave

import numpy as np
import pytest
import torch
from PIL import Image

from e2e_dist.cli import main
from e2e_dist.config import load_run_config
from e2e_dist.data.images import image_pixels
from e2e_dist.input_contract import glyph_like_training, open_image
from tests.helpers.exports import write_export


@pytest.fixture(scope="module")
def digits_model(tmp_path_factory):
    from e2e_dist.models.registry import build_model

    cfg = load_run_config("tiny-vision", ["model.widths=[4, 8]", "data.source=digits", "data.image_size=16",
                                          "model.input_norm=none"])
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.data).eval()
    return write_export(tmp_path_factory.mktemp("vision") / "digits.safetensors", cfg, model)


def digit(i: int = 7) -> np.ndarray:
    from sklearn.datasets import load_digits

    return np.round(load_digits().images[i] * (255 / 16)).astype(np.uint8)


def save(tmp_path, name: str, im: Image.Image, **kw) -> str:
    path = tmp_path / name
    im.save(path, **kw)
    return str(path)


def variants(tmp_path) -> dict[str, str]:
    g = digit()
    out = {"original": save(tmp_path, "original.png", Image.fromarray(g, mode="L"))}
    out["inverted"] = save(tmp_path, "inverted.png", Image.fromarray(255 - g, mode="L"))
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 3] = g  # black ink whose shape lives in the alpha channel, on a transparent background
    out["alpha"] = save(tmp_path, "alpha.png", Image.fromarray(rgba, mode="RGBA"))
    out["16-bit"] = save(tmp_path, "sixteen.png", Image.fromarray(g.astype(np.uint16) * 257))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": the pixels are stored rotated the other way
    out["exif"] = save(tmp_path, "exif.jpg", Image.fromarray(np.rot90(g, 1).copy(), mode="L"), exif=exif, quality=100)
    return out


def prediction_lines(capsys) -> dict[str, list[str]]:
    return {line.split("\t")[0]: line.split("\t")[1:] for line in capsys.readouterr().out.splitlines()}


def test_reencoded_digits_are_seen_as_the_original(digits_model, tmp_path, capsys):
    files = variants(tmp_path)
    assert main(["predict", digits_model, *files.values()]) == 0
    lines = prediction_lines(capsys)
    original = lines[files["original"]]
    assert original[1].startswith("p=") and original[2].startswith("top3: ")
    for name in ("inverted", "alpha", "16-bit"):
        assert lines[files[name]] == original, name  # the same pixels: the same probabilities
    assert lines[files["exif"]][0] == original[0]  # JPEG-coded: the same answer


def test_decoding_fixes_hold_for_training_too():
    """open_image is training's decoder as well: 16-bit and alpha decode like the 8-bit original."""
    g = digit()
    buf = io.BytesIO()
    Image.fromarray(g.astype(np.uint16) * 257).save(buf, format="PNG")
    assert (np.asarray(open_image(buf.getvalue())) == g).all()
    assert np.asarray(Image.fromarray(g.astype(np.uint16) * 257).convert("L")).max() == 255  # PIL clips


def test_letterboxed_and_small_glyphs_are_reframed_like_training():
    g = digit().astype(np.float64) / 255
    big = np.kron(g, np.ones((10, 10)))  # 80 x 80
    canvas = np.ones((100, 240))  # white paper, the digit in dark ink, off-centre
    canvas[10:90, 150:230] = 1 - big
    reframed = glyph_like_training(canvas, 8)
    im = Image.fromarray(np.round(reframed * 255).astype(np.uint8), mode="L").resize((8, 8), Image.Resampling.BOX)
    seen = image_pixels(im, 16, 1)
    want = image_pixels(Image.fromarray(digit(), mode="L"), 16, 1)
    stretched = image_pixels(Image.fromarray(np.round(canvas * 255).astype(np.uint8), mode="L"), 16, 1)
    assert np.abs(seen - want).mean() < 0.15 < np.abs(stretched - want).mean()


def test_inputs_out_of_contract_get_one_line_each(digits_model, tmp_path, capsys):
    tiny = save(tmp_path, "one.png", Image.fromarray(np.zeros((1, 1), np.uint8), mode="L"))
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    ok = variants(tmp_path)["original"]
    assert main(["predict", digits_model, tiny, str(tmp_path), str(text), ok]) == 1
    out, err = capsys.readouterr()
    assert out.startswith(f"{ok}\t")
    assert err.splitlines() == [
        f"e2e-dist: error: input: {tiny} is 1x1 pixels: below 4 on a side there is nothing to recognize",
        f"e2e-dist: error: input: {tmp_path} is a directory, not a file (give the files in it)",
        f"e2e-dist: error: input: cannot decode image {text}: cannot identify image file",
        "e2e-dist: error: 3 of 4 input(s) failed",
    ]


@pytest.fixture(scope="module")
def speech_model(tmp_path_factory):
    from e2e_dist.models.registry import build_model

    cfg = load_run_config("tiny-speech", ["model.d_model=16", "model.n_layer=1", "model.conv_channels=8"])
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.data).eval()
    return write_export(tmp_path_factory.mktemp("speech") / "speech.safetensors", cfg, model), cfg


def wav(path, seconds: float, rate: int = 16000) -> str:
    t = np.arange(int(seconds * rate)) / rate
    # Tone bursts with silent gaps, so the windows have quiet moments to be cut at.
    x = 0.3 * np.sin(2 * np.pi * 220 * t) * (np.sin(2 * np.pi * 0.7 * t) > 0)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((x * 32767).astype("<i2").tobytes())
    return str(path)


def test_clips_from_a_hundredth_of_a_second_to_a_minute(speech_model, tmp_path, capsys):
    path, cfg = speech_model
    short, minute = wav(tmp_path / "short.wav", 0.01), wav(tmp_path / "minute.wav", 60)
    assert main(["predict", path, short, minute]) == 0
    lines = prediction_lines(capsys)
    assert lines[short][1].startswith("confidence=") and len(lines[short]) == 2  # padded: one piece
    # Bursts 0.71 s long, 0.71 s apart: two and their pause are longer than a piece may be, so each
    # burst is a piece of its own, cut in the pauses.
    assert 2 * (1 / 1.4) + 1 / 1.4 > cfg.data.max_audio_seconds
    assert int(lines[minute][2].removeprefix("pieces=")) == math.ceil(60 * 0.7)
    confidence = float(lines[minute][1].removeprefix("confidence="))
    lowest, at = lines[minute][3].removeprefix("lowest=").removesuffix("s").split("@")
    assert 0 <= float(lowest) <= confidence <= 1 and 0 <= float(at) < 60  # an untrained model: unsure


def test_a_clip_past_the_limit_is_refused_naming_it(speech_model, tmp_path, capsys):
    path, _ = speech_model
    long = wav(tmp_path / "long.wav", 601, rate=8000)
    assert main(["predict", path, long]) == 1
    assert capsys.readouterr().err.splitlines()[0] == (
        f"e2e-dist: error: input: {long}: 601 s of audio: longer than the 600 s predict transcribes (split the file)")
