"""Text from Parquet and JSONL shards: windows are the documents' bytes, nested subsets, S3 = local, bad input.

Runs that are killed, restarted, resized and resumed mid-epoch on record shards: tests/train/test_train_e2e.py
(its corpus is stdlib sources in Parquet and JSONL shards).

The corpus: documents of random text in 3 Parquet shards (row groups of 5 rows, so reads start at
checkpoints inside shards) and 3 JSONL shards, plus the stream each shard should become
(documents joined by EOS).
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from e2e_dist.data import records as rec
from e2e_dist.data.common import DataError, seeded_order
from e2e_dist.data.registry import build_data
from e2e_dist.models.gpt import EOS
from tests.data.test_text import S, cfg, pieces, rows, stitch


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, list[str]]:
    """{path: its documents}: 3 Parquet + 3 JSONL shards of 12-30 documents (a few empty or None)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("shards")
    rng = random.Random(1)
    out = {}
    for i in range(6):
        docs = [f"s{i}d{j} " + "".join(rng.choice("abcdefgh ijklmnop\n") for _ in range(rng.randint(20, 400)))
                for j in range(rng.randint(12, 30))]
        docs[3] = ""  # empty documents carry no text and no EOS
        if i < 3:
            path = root / f"part-{i}.parquet"
            table = pa.table({"id": list(range(len(docs))), "text": docs, "meta": [{"k": j} for j in range(len(docs))]})
            pq.write_table(table, path, row_group_size=5)
        else:
            path = root / "jsonl" / f"part-{i}.jsonl"
            path.parent.mkdir(exist_ok=True)
            lines = [json.dumps({"text": d, "n": j}) for j, d in enumerate(docs)]
            lines.insert(2, "")  # blank lines are skipped
            path.write_text("\n".join(lines) + "\n")
        out[str(path)] = [d for d in docs if d]
    return out


@pytest.fixture
def fine_checkpoints(monkeypatch):
    """JSONL checkpoints every 256 stream bytes (the index pass reads this on the driver)."""
    monkeypatch.setattr(rec, "CHECKPOINT_EVERY", 256)


@pytest.fixture
def no_index_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("E2E_DIST_CACHE", str(tmp_path / "cache"))


def test_index_and_reads_from_any_offset(shards, fine_checkpoints):
    """Every shard's stream, read from arbitrary offsets through its checkpoints, is its documents."""
    for uri, docs in shards.items():
        entry = rec.index_shard(uri, "text", None, checkpoint_every=256)
        expected = _tokens(docs)
        assert entry["length"] == len(expected) and entry["docs"] == len(docs)
        assert len(entry["checkpoints"]) > 2  # row groups of 5 / every 256 bytes
        rng = random.Random(uri)
        for _ in range(20):
            off = rng.randrange(0, len(expected) - 10)
            n = rng.randint(1, min(700, len(expected) - off))
            ck = np.array(entry["checkpoints"]).reshape(-1, 2)
            got, decoded = rec.read_stream(uri, off, n, column="text", offsets=ck[:, 0], locators=ck[:, 1],
                                           storage_cfg=None, eos=EOS)
            assert (got == expected[off:off + n]).all() and decoded >= 0


def _tokens(docs: list[str]) -> np.ndarray:
    parts = []
    for k, d in enumerate(docs):
        if k:
            parts.append(np.array([EOS], np.uint16))
        parts.append(np.frombuffer(d.encode(), np.uint8).astype(np.uint16))
    return np.concatenate(parts)


def test_windows_are_the_documents_in_seeded_shard_order(ray_local, shards, no_index_cache):
    root = str(next(iter(shards))).rsplit("/", 1)[0]
    bundle = build_data(cfg(root, val_fraction=0.34, seq_len=S))  # 6 shards: whole shards go to val
    docs = {d for ds in shards.values() for d in ds}
    n_docs = 0
    for ds, split in ((bundle.train, "train"), (bundle.val, "val")):
        got = pieces(stitch(*rows(ds)))
        assert all(p.decode() in docs for p in got[:-1]), "every piece between EOS is a whole document"
        n_docs += len(got) - 1
        assert bundle.stats[f"{split}_windows"] == len(rows(ds)[1])
    # Documents come shard by shard in the seeded order of the shards' keys (a shard's last
    # document of each split may be cut by the window grid, hence >= all but one per split).
    assert n_docs >= sum(map(len, shards.values())) - 2
    train_doc_order = [p.decode() for p in pieces(stitch(*rows(bundle.train)))[:-1]]
    owner = {d: u for u, ds in shards.items() for d in ds}
    shard_seq = list(dict.fromkeys(owner[d] for d in train_doc_order))
    keys = {u: u.split("shards", 1)[1] for u in shards}
    assert shard_seq == [u for u in seeded_order(shard_seq, seed=0, key=lambda u: keys[u].split("/", 1)[1])]


def test_subsets_are_nested_and_the_index_is_built_once(ray_local, shards, no_index_cache, tmp_path, monkeypatch):
    from e2e_dist.data import common

    indexed = []
    real = common.per_shard_in_tasks
    monkeypatch.setattr(common, "per_shard_in_tasks", lambda files, *a, **kw: indexed.append(len(files)) or real(files, *a, **kw))
    from e2e_dist.data import index_store

    monkeypatch.setattr(index_store, "per_shard_in_tasks", common.per_shard_in_tasks)
    root = str(next(iter(shards))).rsplit("/", 1)[0]
    small = build_data(cfg(root, max_bytes=2000))
    large = build_data(cfg(root, max_bytes=6000))
    assert indexed == [len(shards), 0]  # the second build read the stored index
    [stored] = (tmp_path / "cache" / "index").glob("text-*.parquet")
    t_small, i_small = rows(small.train)
    t_large, i_large = rows(large.train)
    by_index = dict(zip(i_large.tolist(), map(bytes, t_large.astype(np.uint16))))
    assert 0 < len(i_small) < len(i_large)
    assert all(by_index[k] == bytes(w.astype(np.uint16)) for k, w in zip(i_small.tolist(), t_small))
    import pyarrow.parquet as pq

    assert sorted(pq.read_table(stored).column("uri").to_pylist()) == sorted(shards)


def test_s3_shards_read_the_same_windows_as_local(ray_local, shards, s3_server, s3_bucket, no_index_cache):
    import boto3

    from e2e_dist.config import StorageConfig

    bucket = s3_bucket.removeprefix("s3://")
    client = boto3.client("s3", endpoint_url=s3_server.url, region_name="us-east-1")
    root = str(next(iter(shards))).rsplit("/", 1)[0]
    for path in shards:
        client.put_object(Bucket=bucket, Key="records/" + path[len(root) + 1:], Body=open(path, "rb").read())
    storage = StorageConfig(endpoint_url=s3_server.url)
    remote = build_data(cfg("unused", paths=[f"{s3_bucket}/records/"]), storage_cfg=storage)
    local = build_data(cfg(root))
    for a, b in ((remote.train, local.train), (remote.val, local.val)):
        (ta, ia), (tb, ib) = rows(a), rows(b)
        assert (ia == ib).all() and (ta == tb).all()


@pytest.mark.parametrize("case,match", [
    ("parquet-missing-column", r"data.text_column: no column 'text' in .*bad.parquet \(columns: body\)"),
    ("parquet-not-string", r"data.text_column: column 'text' of .*bad.parquet is int64, not a string"),
    ("jsonl-missing-field", r"data.text_column: no field 'text' in .*bad.jsonl at byte 16 \(line 2\)"),
    ("jsonl-not-string", r"data.text_column: field 'text' in .*bad.jsonl at byte 0 is int, not a string"),
    ("jsonl-not-json", r"data.paths: .*bad.jsonl at byte 16 \(line 2\): not a JSON line \(Expecting ',' delimiter at column 13\)$"),
    ("parquet-corrupt", r"data.paths: cannot read shard .*bad.parquet: "),
])
def test_bad_shards_stop_before_training_with_one_line(ray_local, tmp_path, no_index_cache, case, match):
    import pyarrow as pa
    import pyarrow.parquet as pq

    good = tmp_path / "good.jsonl"
    good.write_text("\n".join(json.dumps({"text": "x" * 200}) for _ in range(5)))
    if case == "parquet-missing-column":
        pq.write_table(pa.table({"body": ["a" * 100]}), tmp_path / "bad.parquet")
    elif case == "parquet-not-string":
        pq.write_table(pa.table({"text": [1, 2, 3]}), tmp_path / "bad.parquet")
    elif case == "parquet-corrupt":
        (tmp_path / "bad.parquet").write_bytes(b"PAR1" + b"\x07" * 100)
    else:
        second = {"jsonl-missing-field": '{"body": "b"}', "jsonl-not-string": '{"text": 7}',
                  "jsonl-not-json": '{"text": "b"'}[case]
        first = '{"text": 7}' if case == "jsonl-not-string" else '{"text": "aaa"}'
        (tmp_path / "bad.jsonl").write_text(first + "\n" + second + "\n")
    with pytest.raises(DataError, match=match) as e:
        build_data(cfg(tmp_path))
    assert "\n" not in str(e.value)



def test_large_corpora_are_indexed_in_ray_data_tasks(ray_local, shards, tmp_path, monkeypatch, no_index_cache):
    """Above SMALL_INDEX_BYTES the index pass runs in Ray Data tasks, not driver threads: the same
    index, and a bad shard is still one line naming it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from e2e_dist.data import common

    root = str(next(iter(shards))).rsplit("/", 1)[0]
    in_threads = rows(build_data(cfg(root)).train)
    monkeypatch.setenv("E2E_DIST_CACHE", str(tmp_path / "cache2"))  # index again, now in tasks
    monkeypatch.setattr(common, "SMALL_INDEX_BYTES", 0)
    in_tasks = rows(build_data(cfg(root)).train)
    assert (in_threads[0] == in_tasks[0]).all() and (in_threads[1] == in_tasks[1]).all()
    (tmp_path / "data").mkdir()
    pq.write_table(pa.table({"body": ["a" * 100]}), tmp_path / "data" / "bad.parquet")
    with pytest.raises(DataError, match=r"^data.text_column: no column 'text' in .*bad.parquet \(columns: body\)$"):
        build_data(cfg(tmp_path / "data"))


def test_training_reads_decode_each_row_group_once_per_node(shards, tmp_path, monkeypatch):
    """A Parquet row group read to its end is kept in the node's cache: a later read of it, by any
    process on the node, decodes nothing (and equals the first); a read that needs only the start
    of a row group decodes only its first rows; without an identity (no mtime) nothing is kept."""
    from e2e_dist.data import node_cache

    monkeypatch.setenv("E2E_DIST_NODE_CACHE", str(tmp_path / "node"))
    monkeypatch.setattr(rec, "PARQUET_READ_ROWS", 1)
    uri, docs = next((u, d) for u, d in shards.items() if u.endswith(".parquet"))
    ck = np.array(rec.index_shard(uri, "text", None)["checkpoints"]).reshape(-1, 2)
    expected = _tokens(docs)

    def read(off: int, n: int, identity: str = "shard-v1") -> tuple[np.ndarray, int]:
        rec._cursor.clear()  # as another process would: nothing of this one's last row group
        return rec.read_stream(uri, off, n, column="text", offsets=ck[:, 0], locators=ck[:, 1], storage_cfg=None,
                               eos=EOS, identity=identity, cache_mb=64)

    second_rg = int(ck[1, 0])
    head, decoded = read(second_rg - 3, 6)  # the end of row group 0 and the first bytes of row group 1
    assert (head == expected[second_rg - 3: second_rg + 3]).all()
    assert decoded < second_rg + len(docs[5]) + 10  # row group 0 and the first document of row group 1 only
    whole, decoded = read(0, len(expected))
    assert (whole == expected).all() and decoded < len(expected)  # row group 0 came from the node's cache
    again, decoded = read(0, len(expected))
    assert (again == expected).all() and decoded == 0
    _, decoded = read(0, len(expected), identity="")
    assert decoded > 0.9 * len(expected)  # no identity: nothing is kept, everything is decoded
    node_cache.evict(0)  # over any limit: the oldest entries go
    assert node_cache.get("shard-v1", "text", 0) is None


def test_data_plan_says_what_a_config_costs_and_reuses_the_stored_index(ray_local, shards, tmp_path):
    from e2e_dist.config import load_run_config
    from e2e_dist.data.data_plan import plan_data

    root = str(next(iter(shards))).rsplit("/", 1)[0]
    cfg = load_run_config("tiny-text", ["data.source=text", f"data.paths=[{root}]", "data.max_files=null",
                                        "data.seq_len=16", "model.max_seq_len=16", f"storage.path={tmp_path}/runs"])
    first, second = plan_data(cfg), plan_data(cfg)
    assert "shard index    6 shards: 0 from the stored index, 6 indexed now" in first
    assert "shard index    6 shards: 6 from the stored index, 0 indexed now" in second
    assert (tmp_path / "runs" / ".e2e-index").is_dir()  # kept with the runs, where every node finds it
    train = next(line for line in first if line.startswith("train "))
    per_rank = next(line for line in first if line.startswith("per rank "))
    n = int(train.split()[1].replace(",", ""))
    assert f"{n // 2:,} samples per epoch" in per_rank  # 2 workers: half each


def test_a_run_refused_for_a_bad_shard_leaves_the_earlier_run_of_its_name_as_it_was(ray_local, tmp_path):
    """Nothing is written before every check has passed: a bad shard is found when the data is built
    (after storage and checkpoints were checked), and the run's config.yaml is still the old one."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from e2e_dist.config import load_run_config
    from e2e_dist.train.launcher import fit_run

    (tmp_path / "data").mkdir()
    pq.write_table(pa.table({"body": ["a" * 100]}), tmp_path / "data" / "bad.parquet")
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("name: r  # the earlier attempt\n")
    cfg = load_run_config("tiny-text", ["name=r", f"storage.path={tmp_path / 'runs'}", "data.source=text",
                                        f"data.paths=[{tmp_path / 'data'}]"])
    with pytest.raises(DataError, match="no column 'text'"):
        fit_run(cfg, resume=None)
    assert (run / "config.yaml").read_text() == "name: r  # the earlier attempt\n"
