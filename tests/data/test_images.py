"""Image sources through Ray Data: classes, split, subset, decoding, bad files, strict mode, digits, S3, predict.

Each test image is a flat gray level that encodes its class and index, so a decoded row can be
traced back to the file it came from without trusting the pipeline's own bookkeeping.
"""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
import torch
from PIL import Image

from e2e_dist.config import DataConfig, ResNetConfig, StorageConfig, load_run_config
from e2e_dist.data import images
from e2e_dist.data.common import DataError
from e2e_dist.data.registry import build_data
from e2e_dist.errors import ConfigError, UserError
from tests.helpers.exports import write_export

CLASSES = ("cat", "dog", "owl")
PER_CLASS = 12


def level(c: int, i: int) -> int:
    """The gray level of image i of class c: distinct for every image."""
    return 10 + 80 * c + 5 * i


def encoded(value: int, fmt: str, size: int = 6, mode: str = "L") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (size, size), value if mode == "L" else (value,) * 3).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """3 classes x 12 images (PNG, JPEG, RGB PNG mixed) + a corrupt and a truncated image in 'dog'."""
    root = tmp_path_factory.mktemp("imgs")
    for c, name in enumerate(CLASSES):
        (root / name).mkdir()
        for i in range(PER_CLASS):
            fmt, ext, mode = [("PNG", "png", "L"), ("JPEG", "jpg", "L"), ("PNG", "png", "RGB")][i % 3]
            (root / name / f"{i:02d}.{ext}").write_bytes(encoded(level(c, i), fmt, mode=mode))
    (root / "dog" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    (root / "dog" / "truncated.png").write_bytes(encoded(200, "PNG", size=64)[:60])
    (root / "notes.txt").write_text("not an image: ignored by suffix")
    return root


def cfg(root, **kw) -> DataConfig:
    return DataConfig(**{"source": "image-folder", "paths": [str(root)], "image_size": 8, "val_fraction": 0.25, **kw})


def gray_model(n: int = 3) -> ResNetConfig:
    return ResNetConfig(in_channels=1, num_classes=n)


def rows(split) -> tuple[np.ndarray, np.ndarray]:
    """(pixels, labels) of a split's decodable samples, read by Ray Data tasks in sample order."""
    px, lab = [], []
    for b in split.dataset().iter_batches(batch_size=16, batch_format="numpy"):
        px.append(b["pixels"][b["valid"]])
        lab.append(b["label"][b["valid"]])
    return np.concatenate(px), np.concatenate(lab)


def test_decode_image_resizes_converts_and_normalizes():
    gray = images.decode_image(encoded(255, "PNG", size=8), 4, 1)
    assert gray.shape == (1, 4, 4) and gray.dtype == np.float32 and np.allclose(gray, 1.0)
    rgb = images.decode_image(encoded(0, "JPEG", size=5), 7, 3)
    assert rgb.shape == (3, 7, 7) and np.allclose(rgb, -1.0, atol=0.02)
    with pytest.raises(OSError):  # PIL's UnidentifiedImageError
        images.decode_image(b"not an image", 4, 1)


def test_decode_images_marks_bad_files_with_a_warning_or_raises_when_strict(folder, caplog):
    """A bad file keeps its row (so no sample moves to another rank or micro-batch), marked invalid:
    the rank drops it from its micro-batch (train/batches.model_batch)."""
    batch = {"uri": np.array([str(folder / "cat" / "00.png"), str(folder / "dog" / "corrupt.png"),
                              str(folder / "dog" / "truncated.png")], dtype=object),
             "size": np.array([(folder / "cat" / "00.png").stat().st_size, 40, 60]), "label": np.array([0, 1, 1])}
    kw = dict(size=4, channels=1, storage=None)
    with caplog.at_level("WARNING", logger="e2e_dist.data"):
        out = images.decode_images(batch, strict=False, **kw)
    assert out["pixels"].shape == (3, 1, 4, 4) and out["valid"].tolist() == [True, False, False]
    assert out["label"].tolist() == [0, 1, 1] and (out["pixels"][1:] == 0).all()
    assert "corrupt.png" in caplog.text and "truncated.png" in caplog.text
    with pytest.raises(DataError, match="corrupt.png") as e:
        images.decode_images(batch, strict=True, **kw)
    assert "\n" not in str(e.value)


def test_folder_through_ray_data_classes_split_and_pixels(ray_local, folder, caplog):
    with caplog.at_level("WARNING", logger="e2e_dist.data"):
        bundle = build_data(cfg(folder), model_cfg=gray_model())
    s = bundle.stats
    assert s["num_classes"] == 3 and s["train_rows"] + s["val_rows"] == 3 * PER_CLASS + 2  # listed, before decoding
    assert s["train_samples"] == s["train_rows"] and s["val_rows"] >= 1
    seen = set()
    for ds in (bundle.train, bundle.val):
        px, lab = rows(ds)
        assert px.shape[1:] == (1, 8, 8)
        for p, c in zip(px, lab):
            value = round((float(p.mean()) * 0.5 + 0.5) * 255)  # undo [-1, 1] normalization
            matches = [i for i in range(PER_CLASS) if abs(level(c, i) - value) <= 2]  # JPEG may be off by 1-2
            assert len(matches) == 1, (c, value)
            seen.add((int(c), matches[0]))
    # Every good image arrived exactly once across the two splits; the two bad ones were skipped.
    assert seen == {(c, i) for c in range(3) for i in range(PER_CLASS)}
    batch = bundle.collate({"pixels": px, "label": lab})
    assert batch["pixels"].dtype == torch.float32 and batch["labels"].dtype == torch.int64


def test_split_is_deterministic_and_fraction_nested(ray_local, folder):
    def labels_and_levels(**kw):
        px, lab = rows(build_data(cfg(folder, **kw), model_cfg=gray_model()).train)
        return sorted(zip(lab.tolist(), np.round(px.mean(axis=(1, 2, 3)), 3).tolist()))

    full = labels_and_levels()
    assert labels_and_levels() == full
    half = labels_and_levels(fraction=0.5)
    assert set(half) < set(full) and abs(len(half) - len(full) / 2) <= 2
    other = labels_and_levels(seed=1)
    assert other != full


def test_strict_mode_stops_before_training_naming_the_file(ray_local, folder):
    with pytest.raises(DataError, match=r"(corrupt|truncated)\.png.*and 1 more") as e:
        build_data(cfg(folder, strict=True), model_cfg=gray_model())
    assert "\n" not in str(e.value)


def test_config_and_layout_errors_are_one_line(tmp_path, folder):
    with pytest.raises(ConfigError, match="num_classes=2.*3 classes"):
        build_data(cfg(folder), model_cfg=gray_model(2))
    with pytest.raises(ConfigError, match="data.paths"):
        build_data(DataConfig(source="image-folder"))
    with pytest.raises(DataError, match="no such file or directory"):
        build_data(cfg(tmp_path / "missing"))
    one = tmp_path / "one"
    (one / "only").mkdir(parents=True)
    (one / "only" / "a.png").write_bytes(encoded(1, "PNG"))
    (one / "loose.png").write_bytes(encoded(1, "PNG"))
    with pytest.raises(DataError, match="loose.png is not inside a class subfolder"):
        build_data(cfg(one, strict=True))
    with pytest.raises(DataError, match="1 class folder"):
        build_data(cfg(one))


def test_digits_written_once_as_png_and_read_as_an_image_folder(ray_local, tmp_path):
    from sklearn.datasets import load_digits

    root = images.write_digits_folder(tmp_path / "digits")
    pngs = sorted(root.glob("*/*.png"))
    assert len(pngs) == 1797 and sorted(p.name for p in root.iterdir() if p.is_dir()) == [str(d) for d in range(10)]
    d = load_digits()
    first = np.asarray(Image.open(root / str(d.target[0]) / "digit-0000.png"))
    assert np.array_equal(first, np.round(d.images[0] * 255 / 16).astype(np.uint8))
    mtime = pngs[0].stat().st_mtime_ns
    assert images.write_digits_folder(tmp_path / "digits") == root and pngs[0].stat().st_mtime_ns == mtime

    cfg_ = load_run_config("tiny-vision", ["data.source=digits", f"data.paths=[{tmp_path / 'digits'}]",
                                           "data.image_size=16"])
    bundle = build_data(cfg_.data, model_cfg=cfg_.model)
    assert bundle.stats["train_rows"] + bundle.stats["val_rows"] == 1797 and bundle.stats["num_classes"] == 10
    assert 120 <= bundle.stats["val_rows"] <= 240  # val_fraction 0.1
    batch = bundle.collate(bundle.val.read(np.arange(8))[0])
    assert batch["pixels"].shape == (8, 1, 16, 16) and batch["labels"].max() <= 9


def test_s3_folder_reads_the_same_images_as_local(ray_local, s3_server, s3_bucket, folder):
    import boto3

    client = boto3.client("s3", endpoint_url=s3_server.url, region_name="us-east-1")
    bucket = s3_bucket.removeprefix("s3://")
    for p in folder.rglob("*"):
        if p.is_file() and "corrupt" not in p.name and "truncated" not in p.name:
            client.put_object(Bucket=bucket, Key="imgs/" + p.relative_to(folder).as_posix(), Body=p.read_bytes())
    storage = StorageConfig(endpoint_url=s3_server.url)
    remote = build_data(cfg("unused", paths=[f"{s3_bucket}/imgs"]), model_cfg=gray_model(), storage_cfg=storage)
    local_px, local_lab = rows(build_data(cfg(folder), model_cfg=gray_model()).train)
    remote_px, remote_lab = rows(remote.train)
    key = lambda px, lab: sorted(zip(lab.tolist(), np.round(px.mean(axis=(1, 2, 3)), 4).tolist()))  # noqa: E731
    assert key(remote_px, remote_lab) == key(local_px, local_lab)  # same keys -> same split -> same images


def export_file(tmp_path, cfg, model) -> str:
    return write_export(tmp_path / "model.safetensors", cfg, model)


def test_predict_returns_the_class_label_of_an_image_file(tmp_path, folder, capsys):
    from e2e_dist.models.registry import build_model
    from e2e_dist.predict import predict

    cfg_ = load_run_config("tiny-vision", ["data.source=image-folder", f"data.paths=[{folder}]", "model.num_classes=3",
                                           "model.widths=[4, 8]", "data.image_size=8"])
    torch.manual_seed(0)
    model = build_model(cfg_.model, cfg_.data).eval()
    exported = export_file(tmp_path, cfg_, model)
    img = folder / "owl" / "03.png"
    label = predict(exported, str(img))
    pixels = torch.from_numpy(images.decode_image(img.read_bytes(), 8, 1))[None]
    assert label in CLASSES and label == CLASSES[int(model.predict(pixels)[0])]
    with pytest.raises(UserError, match="corrupt.png"):
        predict(exported, str(folder / "dog" / "corrupt.png"))
    with pytest.raises(UserError, match="no such file"):
        predict(exported, str(tmp_path / "nope.png"))
    with pytest.raises(UserError, match="is a directory, not a file"):
        predict(exported, str(folder))
    with pytest.raises(UserError) as err:
        predict(exported, str(folder / "dog" / "corrupt.png"))
    assert "BytesIO" not in str(err.value) and "\n" not in str(err.value)
    # Several inputs: each gets its answer or its one-line error, and the exit code says one failed.
    from e2e_dist.cli import main

    assert main(["predict", exported, str(img), str(tmp_path / "nope.png"), str(folder / "owl" / "03.png")]) == 1
    out, errors = capsys.readouterr()
    assert [line.split("\t")[:2] for line in out.splitlines()] == [[str(img), label], [str(img), label]]
    assert all(re.fullmatch(r"p=[01]\.\d\d\ttop3: .+", line.split("\t", 2)[2]) for line in out.splitlines())
    assert errors.splitlines() == [f"e2e-dist: error: input: no such file: {tmp_path / 'nope.png'}",
                                   "e2e-dist: error: 1 of 3 input(s) failed"]
