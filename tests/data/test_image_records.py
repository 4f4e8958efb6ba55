"""`image-parquet`: labelled images in Parquet shards, local and on S3, decoded in Ray Data tasks.

The shards hold scikit-learn's digits as PNG bytes: 3 shards with integer labels and row groups
of 64, and the same images in the Hugging Face layout ({"bytes", "path"} structs, class names).
"""

from __future__ import annotations

import io

import numpy as np
import pytest

from e2e_dist.config import DataConfig, ResNetConfig
from e2e_dist.data.common import DataError
from e2e_dist.data.images import decode_image
from e2e_dist.data.registry import build_data
from tests.data.test_images import rows

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def png(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.round(img * (255 / 16)).astype(np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def digits_shards(tmp_path_factory):
    """(int-label folder, HF-layout folder, {png bytes: label})."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from sklearn.datasets import load_digits

    d = load_digits()
    images, labels = [png(x) for x in d.images[:600]], [int(y) for y in d.target[:600]]
    ints, hf = tmp_path_factory.mktemp("ints"), tmp_path_factory.mktemp("hf")
    for i in range(3):
        part = slice(i * 200, (i + 1) * 200)
        pq.write_table(pa.table({"image": images[part], "label": labels[part]}), ints / f"part-{i}.parquet",
                       row_group_size=64)
        pq.write_table(pa.table({"img": [{"bytes": b, "path": f"{j}.png"} for j, b in enumerate(images[part])],
                                 "name": [NAMES[y] for y in labels[part]]}), hf / f"part-{i}.parquet", row_group_size=64)
    return ints, hf, dict(zip(images, labels))


def cfg(path, **kw) -> DataConfig:
    return DataConfig(**{"source": "image-parquet", "paths": [str(path)], "image_size": 16, "val_fraction": 0.2, **kw})


def test_rows_are_the_shards_images_and_labels(ray_local, digits_shards):
    ints, hf, truth = digits_shards
    expected = {decode_image(b, 16, 1).tobytes(): y for b, y in truth.items()}
    model = ResNetConfig(in_channels=1, num_classes=10)
    for root, kw in ((ints, {}), (hf, {"image_column": "img", "label_column": "name"})):
        bundle = build_data(cfg(root, **kw), model_cfg=model)
        seen = 0
        for ds in (bundle.train, bundle.val):
            px, ys = rows(ds)
            got = [expected[p.tobytes()] for p in px]
            # Class names are sorted: 'eight' = 0, 'five' = 1, ... so map names back to digits.
            labels = ys if not kw else [NAMES.index(sorted(NAMES)[y]) for y in ys]
            assert list(labels) == got
            seen += len(px)
        assert seen == 600 == bundle.stats["train_rows"] + bundle.stats["val_rows"]
        assert bundle.stats["num_classes"] == 10


def test_subsets_are_nested_and_the_split_is_by_row_group(ray_local, digits_shards):
    ints, _, _ = digits_shards
    model = ResNetConfig(in_channels=1, num_classes=10)
    small = build_data(cfg(ints, fraction=0.25), model_cfg=model)
    large = build_data(cfg(ints, fraction=0.5), model_cfg=model)
    ps, _ = rows(small.train)
    pl, _ = rows(large.train)
    assert 0 < len(ps) < len(pl) and (pl[: len(ps)] == ps).all()
    pv_small, _ = rows(small.val)
    pv_large, _ = rows(large.val)
    assert (pv_small == pv_large).all()  # the val split does not move with the training fraction


def test_s3_shards_read_the_same_rows_as_local(ray_local, digits_shards, s3_server, s3_bucket):
    import boto3

    from e2e_dist.config import StorageConfig

    ints, _, _ = digits_shards
    bucket = s3_bucket.removeprefix("s3://")
    client = boto3.client("s3", endpoint_url=s3_server.url, region_name="us-east-1")
    for p in sorted(ints.glob("*.parquet")):
        client.put_object(Bucket=bucket, Key=f"digits-pq/{p.name}", Body=p.read_bytes())
    model = ResNetConfig(in_channels=1, num_classes=10)
    remote = build_data(cfg(f"{s3_bucket}/digits-pq/"), model_cfg=model, storage_cfg=StorageConfig(endpoint_url=s3_server.url))
    local = build_data(cfg(ints), model_cfg=model)
    for a, b in ((remote.train, local.train), (remote.val, local.val)):
        (pa_, ya), (pb, yb) = rows(a), rows(b)
        assert (pa_ == pb).all() and (ya == yb).all()


@pytest.mark.parametrize("case,match", [
    ("no-image", r"data.image_column: no column 'image' in .*bad.parquet \(columns: pixels, label\)"),
    ("text-image", r"data.image_column: column 'image' of .*bad.parquet is string, not image bytes"),
    ("float-label", r"data.label_column: column 'label' of .*bad.parquet is double, not an integer or a class name"),
    ("corrupt", r"data.paths: cannot read shard .*bad.parquet: "),
])
def test_bad_shards_stop_before_training_with_one_line(ray_local, tmp_path, case, match):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = {"no-image": {"pixels": [b"x"], "label": [1]}, "text-image": {"image": ["x"], "label": [1]},
             "float-label": {"image": [b"x"], "label": [1.5]}}.get(case)
    if table:
        pq.write_table(pa.table(table), tmp_path / "bad.parquet")
    else:
        (tmp_path / "bad.parquet").write_bytes(b"PAR1" + b"\x00" * 64)
    with pytest.raises(DataError, match=match) as e:
        build_data(cfg(tmp_path))
    assert "\n" not in str(e.value)


@pytest.mark.slow
def test_a_vision_run_trains_from_parquet_on_s3(ray_local, digits_shards, s3_server, s3_bucket, tmp_path):
    """Through the real stack: Ray Train, 2 workers, DeepSpeed, images from Parquet shards on moto,
    each rank reading and decoding its own images from the bucket (data.cache_mb=0)."""
    import boto3

    from e2e_dist.config import load_run_config
    from e2e_dist.train.launcher import run_training

    ints, _, _ = digits_shards
    bucket = s3_bucket.removeprefix("s3://")
    client = boto3.client("s3", endpoint_url=s3_server.url, region_name="us-east-1")
    for p in sorted(ints.glob("*.parquet")):
        client.put_object(Bucket=bucket, Key=f"vision-pq/{p.name}", Body=p.read_bytes())
    cfg = load_run_config("tiny-vision", [
        "name=vision-pq", f"storage.path={tmp_path}/runs", "data.source=image-parquet",
        f"data.paths=[{s3_bucket}/vision-pq/]", f"storage.endpoint_url={s3_server.url}", "trainer.max_steps=60",
        "data.image_size=16", "model.input_norm=none", "trainer.lr=0.003", "trainer.warmup_steps=10",
        "trainer.eval_every=60", "trainer.ckpt_every=60", "trainer.log_every=20", "data.cache_mb=0"])
    summary = run_training(cfg, quiet=True)
    m = summary.metrics
    assert m["step"] == 60 and m["val_acc"] > 0.4, m  # 10 classes: chance is 0.1
    assert summary.data_stats["train_rows"] + summary.data_stats["val_rows"] == 600
    # Each rank read its own half: both together at least what 60 steps of 64 trained on.
    assert m["data/samples_read_max_rank"] <= 0.55 * m["data/samples_read"] and m["data/samples_read"] >= 60 * 64, m
    assert m["data/bytes_read"] > 0
