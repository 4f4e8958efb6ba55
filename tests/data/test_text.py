"""The text sources: deterministic split/subset, packing, stats, errors, reads by window number.

Window contents are checked against the files themselves: windows sorted by their index are
stitched back into the split's byte stream, cut at EOS, and every piece must be a real file's
bytes, in the seeded order that `common.seeded_order` defines.
"""

from __future__ import annotations

import os
import random
import sysconfig

import numpy as np
import pytest
import torch

from e2e_dist.config import DataConfig
from e2e_dist.data import text
from e2e_dist.data.common import DataError, glob_regex, seeded_order, split_by_hash, take_fraction
from e2e_dist.data.registry import build_data
from e2e_dist.errors import ConfigError, UserError
from e2e_dist.models.gpt import EOS, PAD

S = 16  # tiny windows: many of them from a small corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, bytes]:
    """40 files of distinct random text (sizes 100..1500 bytes) in nested directories."""
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    files = {}
    for i in range(40):
        path = root / f"d{i % 3}" / f"doc{i:02d}.txt"
        path.parent.mkdir(exist_ok=True)
        data = f"doc {i}: ".encode() + bytes(rng.choice(b"abcdefghij klmnop\n") for _ in range(rng.randint(100, 1500)))
        path.write_bytes(data)
        files[str(path)] = data
    return files


@pytest.fixture
def small_chunks(monkeypatch):
    # 32 windows per block and per read task, so tests cross many block and task boundaries.
    from e2e_dist.data import text_reader

    monkeypatch.setattr(text_reader, "BLOCK_STREAM_BYTES", 32 * S)
    monkeypatch.setattr(text, "BLOCK_STREAM_BYTES", 32 * S)


def cfg(root, **kw) -> DataConfig:
    return DataConfig(**{"source": "text", "paths": [str(root)], "seq_len": S, "val_fraction": 0.1, **kw})


def rows(split) -> tuple[np.ndarray, np.ndarray]:
    """All (tokens, index) of a split, read by Ray Data tasks, in sample order."""
    toks, idx = [], []
    for b in split.dataset().iter_batches(batch_size=64, batch_format="numpy"):
        toks.append(b["tokens"])
        idx.append(b["index"])
    return np.concatenate(toks), np.concatenate(idx)


def stitch(tokens: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Windows back into the stream they were cut from (window k starts at k*S, overlapping 1)."""
    order = np.argsort(index)
    assert (index[order] == np.arange(len(index))).all(), "window indices are not 0..n-1"
    w = tokens[order].astype(np.int64)
    assert (w[1:, 0] == w[:-1, -1]).all(), "consecutive windows must share one boundary token"
    return np.concatenate([w[0], *[x[1:] for x in w[1:]]])


def pieces(stream: np.ndarray) -> list[bytes]:
    cuts = np.flatnonzero(stream == EOS)
    out, start = [], 0
    for c in cuts:
        out.append(bytes(stream[start:c].astype(np.uint8)))
        start = c + 1
    out.append(bytes(stream[start:].astype(np.uint8)))  # after the last EOS: a cut file's head (or empty)
    return out


def root_of(corpus) -> str:
    return os.path.commonpath(list(corpus))


# --------------------------------------------------------------------------------- no Ray needed
def test_hash_split_and_fraction_are_nested_and_stable():
    items = [f"f{i}" for i in range(200)]
    train, val = split_by_hash(items, val_fraction=0.1, seed=3, key=str)
    assert set(train).isdisjoint(val) and len(train) + len(val) == 200 and 5 < len(val) < 40
    assert (train, val) == split_by_hash(list(reversed(items)), val_fraction=0.1, seed=3, key=str)
    assert split_by_hash(items, val_fraction=0.1, seed=4, key=str)[1] != val  # the seed matters
    quarter, half = take_fraction(train, 0.25), take_fraction(train, 0.5)
    assert half[: len(quarter)] == quarter and len(quarter) == round(len(train) / 4)
    # Val is never empty, even when no hash falls under the fraction.
    assert len(split_by_hash(["a", "b"], val_fraction=1e-9, seed=0, key=str)[1]) == 1
    assert seeded_order(items, seed=1, key=str) == seeded_order(sorted(items, reverse=True), seed=1, key=str)


def test_glob_regex_follows_shell_rules():
    assert glob_regex("*.txt").match("a.txt") and not glob_regex("*.txt").match("d/a.txt")
    rx = glob_regex("**/*.txt")
    assert rx.match("a.txt") and rx.match("d/e/a.txt") and not rx.match(".hidden/a.txt") and not rx.match("a.md")
    assert glob_regex("d?/[!x]*.py").match("d1/ab.py") and not glob_regex("d?/[!x]*.py").match("d1/xb.py")


def test_plan_is_cheap_exact_and_respects_max_bytes(corpus):
    files = text.list_files([root_of(corpus)])
    assert len(files) == 40 and all(f.size == len(corpus[f.uri]) for f in files)
    train, val = text.plan_splits(files, cfg(root_of(corpus), max_bytes=5000), "corpus")
    assert train.bytes == 5000 and train.windows == (train.length - 1) // S
    assert {s.uri for s in train.segments}.isdisjoint({s.uri for s in val.segments})
    assert val.windows >= 1 and len(val.segments) >= 1


def test_bad_paths_give_one_line_errors(tmp_path, corpus):
    cases = [
        (cfg(tmp_path / "missing.txt"), "missing.txt"),
        (cfg(str(tmp_path / "*.nothing")), "*.nothing"),
        (DataConfig(source="text", paths=[]), "data.paths"),
        (DataConfig(source="stdlib-text", paths=["x.txt"]), "data.paths"),
    ]
    for data_cfg, needle in cases:
        with pytest.raises(UserError) as e:
            build_data(data_cfg)
        assert needle in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="data.paths"):
        build_data(DataConfig(source="text"))


def test_too_small_for_a_window_names_the_path(tmp_path):
    (tmp_path / "tiny.txt").write_bytes(b"0123456789")
    with pytest.raises(DataError, match=r"data too small.*tiny\.txt") as e:
        build_data(cfg(tmp_path / "tiny.txt"))
    assert "\n" not in str(e.value)
    (tmp_path / "big.txt").write_bytes(b"x" * 200)
    with pytest.raises(DataError, match="max_bytes"):
        build_data(cfg(tmp_path / "big.txt", max_bytes=5))


def test_unreadable_file_is_skipped_or_fatal_when_strict(tmp_path, corpus, caplog):
    d = tmp_path / "c"
    d.mkdir()
    for i, data in enumerate(list(corpus.values())[:5]):
        (d / f"{i}.txt").write_bytes(data)
    (d / "gone.txt").symlink_to(tmp_path / "nowhere")  # listed by the walk, cannot be opened
    with caplog.at_level("WARNING", logger="e2e_dist.data"):
        assert len(text.list_files([str(d)])) == 5
    assert "gone.txt" in caplog.text
    with pytest.raises(DataError, match="gone.txt"):
        text.list_files([str(d)], strict=True)


def test_binary_looking_files_get_one_warning_naming_one(tmp_path, corpus, caplog, monkeypatch):
    texts = list(corpus.values())[:3]
    for i, data in enumerate(texts):
        (tmp_path / f"{i}.txt").write_bytes(data)
    monkeypatch.setattr(text, "build_text_bundle", lambda *a, **kw: "bundle")  # no Ray: the listing is enough
    with caplog.at_level("WARNING", logger="e2e_dist.data"):
        assert text.build_text(cfg(tmp_path)) == "bundle"
    assert not caplog.records  # all text: silent
    (tmp_path / "model.bin").write_bytes(np.arange(3000, dtype=np.int32).tobytes())
    with caplog.at_level("WARNING", logger="e2e_dist.data"):
        assert text.build_text(cfg(tmp_path)) == "bundle"  # a warning, never a failure
    [rec] = caplog.records
    msg = rec.getMessage()
    assert "data.paths: 1 of 4 sampled files look binary" in msg and str(tmp_path / "model.bin") in msg, msg
    assert "\n" not in msg


def test_looks_binary_tolerates_legacy_text_but_not_random_bytes():
    latin1 = ("Déjà vu à la façon de Noël, très élégant.\n" * 40).encode("latin-1")
    rng = np.random.default_rng(0)
    assert not text.looks_binary(latin1) and not text.looks_binary(b"") and not text.looks_binary("日本語\n".encode() * 99)
    assert text.looks_binary(rng.integers(1, 256, 4096, dtype=np.uint8).tobytes())  # no NUL, still binary
    assert text.looks_binary(b"text\0more text")


def test_file_vanishing_after_planning_reads_as_pad_or_fails_strict(ray_local, tmp_path):
    for name in ("a", "b", "c"):
        (tmp_path / f"{name}.txt").write_bytes(name.encode() * 300)
    train, _ = text.plan_splits(text.list_files([str(tmp_path)]), cfg(tmp_path), "t")
    victim = train.segments[0].uri
    kw = dict(name="train", storage_cfg=None, records={}, column="text")
    lenient, strict = text.text_samples(train, strict=False, **kw), text.text_samples(train, strict=True, **kw)
    assert (lenient.read(np.array([0]))[0]["tokens"][0] != PAD).all()
    os.remove(victim)
    out, read = lenient.read(np.array([0]))
    assert (out["tokens"][0] == PAD).all() and read == S + 1  # the model's loss ignores PAD targets
    with pytest.raises(DataError, match=os.path.basename(victim)):
        strict.read(np.array([0]))


# ------------------------------------------------------------------------------- through Ray
def test_windows_are_the_files_bytes_and_match_stats(ray_local, corpus, small_chunks):
    bundle = build_data(cfg(root_of(corpus), max_bytes=9000, seed=7))
    st = bundle.stats
    toks, idx = rows(bundle.train)
    assert toks.dtype == np.uint16 and toks.shape == (st["train_windows"], S + 1)
    assert st["train_bytes"] == 9000 and st["train_tokens"] == st["train_windows"] * S
    got = pieces(stitch(toks, idx))
    vt, vi = rows(bundle.val)
    assert len(vt) == st["val_windows"] >= 1
    by_content = {v: k for k, v in corpus.items()}
    whole, head = got[:-1], got[-1]
    val_whole = pieces(stitch(vt, vi))[:-1]
    assert whole and val_whole and all(p in by_content for p in whole + val_whole)  # each piece = one file
    val_files = {by_content[p] for p in val_whole}
    assert val_files.isdisjoint(by_content[p] for p in whole)
    # Train = the first files of the seeded order that are not held out; the cut file's head next.
    train_order = [f.uri for f in seeded_order(text.list_files([root_of(corpus)]), seed=7) if f.uri not in val_files]
    assert [by_content[p] for p in whole] == train_order[: len(whole)]
    assert corpus[train_order[len(whole)]].startswith(head)
    assert len(whole) + bool(head) <= st["train_files"] <= len(whole) + 2
    assert 9000 - S < sum(map(len, whole)) + len(head) <= 9000  # only the last partial window is dropped
    batch = bundle.collate({"tokens": toks[:4]})
    assert batch["tokens"].dtype == torch.long and batch["tokens"].shape == (4, S + 1)


def test_same_config_same_windows_and_nested_fractions(ray_local, corpus, small_chunks):
    root = root_of(corpus)
    a = rows(build_data(cfg(root, fraction=0.5)).train)
    b = rows(build_data(cfg(root, fraction=0.5)).train)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])  # same order, same bytes
    quarter = build_data(cfg(root, fraction=0.25))
    q = rows(quarter.train)
    half = dict(zip(a[1].tolist(), a[0]))
    assert len(q[1]) < len(a[1]) and all(np.array_equal(half[i], w) for i, w in zip(q[1].tolist(), q[0]))
    other_seed = rows(build_data(cfg(root, fraction=0.5, seed=1)).train)
    assert not np.array_equal(other_seed[0][:10], a[0][:10])


def test_single_file_holds_out_its_tail(ray_local, tmp_path):
    data = bytes(random.Random(1).choice(b"abcdef \n") for _ in range(2000))
    (tmp_path / "input.txt").write_bytes(data)
    bundle = build_data(cfg(tmp_path / "input.txt"))
    train = pieces(stitch(*rows(bundle.train)))
    val = pieces(stitch(*rows(bundle.val)))
    n_val = len(data) - bundle.stats["train_bytes"]
    assert n_val == bundle.stats["val_bytes"] == 200
    assert len(train) == 1 and data.startswith(train[0]) and len(train[0]) > 1800 - S  # the head, no EOS
    assert len(val) == 1 and data[-n_val:].startswith(val[0]) and len(val[0]) > n_val - S  # the tail


def test_stdlib_corpus_builds(ray_local):
    bundle = build_data(DataConfig(source="stdlib-text", seq_len=64, max_files=50, max_bytes=200_000))
    st = bundle.stats
    assert st["train_bytes"] == 200_000 and st["train_files"] <= 50 and st["val_windows"] >= 1
    files = text.stdlib_files(sysconfig.get_paths()["stdlib"])
    assert len(files) > 100
    assert all(f.uri.endswith(".py") and "site-packages" not in f.uri and "/test/" not in f.uri for f in files)
    sources = [open(f.uri, "rb").read() for f in seeded_order(files, seed=0)[:50]]
    batch = next(iter(bundle.train.dataset().iter_batches(batch_size=8, batch_format="numpy")))
    assert batch["tokens"].shape == (8, 65)
    for window in batch["tokens"]:
        for piece in pieces(window):  # every run of bytes between EOS is in one of the chosen files
            assert any(piece in src for src in sources)


def test_reads_by_window_number_coalesce_and_count_bytes(ray_local, corpus, small_chunks):
    """Any windows in any order come back as the stream's windows; windows closer than 4 KiB are read
    as one range, farther ones apart, so the bytes read are about the windows' bytes."""
    from e2e_dist.data.text_reader import MERGE_GAP_BYTES

    bundle = build_data(cfg(root_of(corpus), max_bytes=12_000))
    toks, idx = rows(bundle.train)
    far = 41 + MERGE_GAP_BYTES // S + 1
    ids = np.array([40, 3, 4, 5, far, 41])
    out, read = bundle.train.read(ids)
    assert np.array_equal(out["index"], ids) and np.array_equal(out["tokens"], toks[ids])
    assert read == (41 - 3) * S + S + 1 + S + 1  # windows 3..41 as one range, the far one alone
    assert bundle.train.blocks > 10 and np.diff(bundle.train.starts).max() <= 32  # small_chunks: 32 windows


def test_s3_prefix_and_glob_read_the_same_bytes_as_local(ray_local, s3_server, s3_bucket, corpus):
    import boto3

    from e2e_dist.config import StorageConfig

    bucket = s3_bucket.removeprefix("s3://")
    client = boto3.client("s3", endpoint_url=s3_server.url, region_name="us-east-1")
    root = root_of(corpus)
    for path, data in list(corpus.items())[:12]:
        client.put_object(Bucket=bucket, Key="corpus/" + os.path.relpath(path, root), Body=data)
    client.put_object(Bucket=bucket, Key="corpus/.hidden/skip.txt", Body=b"not data")
    # The endpoint travels in the storage config: Ray workers may predate AWS_ENDPOINT_URL.
    storage = StorageConfig(endpoint_url=s3_server.url)
    contents = set(corpus.values())
    for paths in ([f"{s3_bucket}/corpus"], [f"{s3_bucket}/corpus/**/*.txt"]):
        bundle = build_data(cfg("unused", paths=paths, val_fraction=0.2), storage_cfg=storage)  # whole files
        assert bundle.stats["train_files"] + bundle.stats["val_files"] == 12
        assert bundle.stats["train_bytes"] + bundle.stats["val_bytes"] == sum(map(len, list(corpus.values())[:12]))
        for split in (bundle.train, bundle.val):
            whole = pieces(stitch(*rows(split)))[:-1]
            assert whole and all(p in contents for p in whole)
    with pytest.raises(DataError, match="nothing/") as e:
        build_data(cfg("unused", paths=[f"{s3_bucket}/nothing/"]), storage_cfg=storage)
    assert "\n" not in str(e.value)


def test_bad_data_paths_fail_before_ray_starts_and_leave_nothing(tmp_path, monkeypatch, capsys):
    """`e2e-dist train` with an empty data dir: one line naming data.paths, in well under a second,
    no Ray started and no run directory (config.yaml) written."""
    from e2e_dist.cli import main
    from e2e_dist.train import ray_env

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started for a run whose data paths match nothing")

    monkeypatch.setattr(ray_env, "init_ray", no_ray)
    (tmp_path / "empty").mkdir()
    rc = main(["train", "tiny-text", "--set", "name=e", "--set", f"storage.path={tmp_path / 'runs'}",
               "--set", "data.source=text", "--set", f"data.paths=[{tmp_path / 'empty'}]"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == [f"e2e-dist: error: data.paths: no files matched '{tmp_path / 'empty'}'"]
    assert not (tmp_path / "runs").exists()
