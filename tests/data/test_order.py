"""The global order (data/order.py): the same at any world size, a real shuffle across shards, arithmetic resume.

No Ray here: the order is a function of block boundaries, seed and epoch. The shuffle test plans a
64-shard text corpus from a listing alone (text.plan_splits never opens a file) and maps each
trained window back to its shard.
"""

from __future__ import annotations

import numpy as np
import pytest

from e2e_dist.config import DataConfig
from e2e_dist.data import text
from e2e_dist.data.common import FileItem
from e2e_dist.data.order import EpochOrder, eval_chunks, eval_selection, rank_share
from e2e_dist.data.text_reader import block_starts


def uneven_blocks(n_blocks: int = 40, seed: int = 0) -> np.ndarray:
    sizes = np.random.default_rng(seed).integers(1, 30, n_blocks)
    return np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)


def global_batches(order: EpochOrder, batch: int, world: int) -> list[np.ndarray]:
    """Every global batch of the epoch as the ranks train on it: rank 0's share, then rank 1's, ..."""
    return [np.concatenate([rank_share(order, start=0, batch=batch, first=b, count=1, rank=r, world=world)
                            for r in range(world)]) for b in range(order.n // batch)]


def test_an_epoch_is_every_sample_once_and_the_same_at_any_world_size():
    starts = uneven_blocks()
    order = EpochOrder(starts, seed=3, epoch=0, window_blocks=8)
    assert sorted(order.positions(0, order.n)[0].tolist()) == list(range(order.n))
    one = global_batches(order, 16, 1)
    for world in (2, 4, 8):
        assert all(np.array_equal(a, b) for a, b in zip(one, global_batches(order, 16, world))), world
    # Many batches at once = one at a time (what a read task asks for vs what the test checks).
    many = rank_share(order, start=0, batch=16, first=2, count=5, rank=1, world=4)
    assert np.array_equal(many, np.concatenate([b[4:8] for b in one[2:7]]))


def test_epochs_and_seeds_give_other_orders_and_runs_repeat_them():
    starts = uneven_blocks()
    seq = {(s, e): EpochOrder(starts, seed=s, epoch=e, window_blocks=8).positions(0, int(starts[-1]))[0].tolist()
           for s in (0, 1) for e in (0, 1, 2)}
    assert len({tuple(v) for v in seq.values()}) == 6
    assert EpochOrder(starts, seed=0, epoch=1, window_blocks=8).positions(0, 50)[0].tolist() == seq[0, 1][:50]


def test_a_position_is_enough_to_continue():
    """Resume is arithmetic: the batches after position p, computed from p alone, are the batches an
    uninterrupted epoch trains on there; on another world size and global batch too."""
    order = EpochOrder(uneven_blocks(), seed=5, epoch=2, window_blocks=8)
    whole = global_batches(order, 8, 2)
    resumed = [rank_share(order, start=5 * 8, batch=8, first=b, count=1, rank=0, world=1) for b in range(3)]
    assert all(np.array_equal(a, b) for a, b in zip(resumed, whole[5:8]))
    # A resized resume continues the same order: the samples after the position, none before.
    after = np.concatenate([rank_share(order, start=40, batch=16, first=b, count=1, rank=r, world=4)
                            for b in range(3) for r in range(4)])
    assert np.array_equal(np.sort(after), np.sort(order.positions(40, 88)[0]))


def test_a_batch_mixes_many_shards_of_a_64_shard_corpus():
    """64 shards of 600-900 KiB (~3 blocks each), global batches of 64 windows: each batch draws
    from >= 16 shards (the old stream gave 1-2: consecutive text of one shard)."""
    rng = np.random.default_rng(0)
    files = [FileItem(uri=f"/corpus/shard-{i:02d}.txt", key=f"shard-{i:02d}.txt", size=int(rng.integers(600, 900)) << 10)
             for i in range(64)]
    cfg = DataConfig(source="text", paths=["/corpus"], seq_len=512, val_fraction=0.05)
    train, _ = text.plan_splits(files, cfg, "corpus")
    segs = train.segments
    lengths = np.array([s.length for s in segs])
    eos = np.array([s.eos for s in segs])
    arrays = {"uri": np.arange(len(segs)), "start": np.zeros(len(segs), np.int64), "length": lengths, "eos": eos,
              "offset": np.concatenate([[0], np.cumsum(lengths + eos)[:-1]])}
    starts = block_starts(arrays, [s.uri for s in segs], {}, cfg.seq_len, train.windows)
    order = EpochOrder(starts, seed=0, epoch=0, window_blocks=64)
    shard_of = np.searchsorted(arrays["offset"], np.arange(train.windows) * cfg.seq_len, side="right") - 1
    distinct = [len(np.unique(shard_of[b])) for b in global_batches(order, 64, 4)]
    assert min(distinct) >= 16 and np.mean(distinct) >= 30, (min(distinct), np.mean(distinct))


def test_the_validation_selection_and_its_chunks_do_not_depend_on_the_world_size():
    assert eval_selection(10, 20).tolist() == list(range(10))
    sel = eval_selection(1000, 8)
    assert sel.tolist() == [0, 125, 250, 375, 500, 625, 750, 875]  # spread over the whole split
    for world in (1, 2, 3, 4):
        got = [eval_chunks(21, 4, r, world) for r in range(world)]
        chunks = [c for mine, _ in got for c in mine]
        assert chunks == [(0, 4), (4, 8), (8, 12), (12, 16), (16, 20), (20, 21)], world  # fixed cuts, in order
        assert {rounds for _, rounds in got} == {-(-6 // world)}  # every rank runs as many forwards


@pytest.mark.parametrize("bad", [(5, 3), (7, 2)])
def test_a_batch_that_does_not_split_over_the_ranks_is_refused(bad):
    batch, world = bad
    with pytest.raises(ValueError, match="does not split"):
        rank_share(EpochOrder(uneven_blocks(), seed=0, epoch=0, window_blocks=4), start=0, batch=batch, first=0,
                   count=1, rank=0, world=world)
