"""BatchStream over a real SampleSet read by Ray Data tasks: each rank reads its own samples, the
global sequence is world-size free, a resume reads nothing before its position, resizes skip and
repeat nothing.

The split is ROWS table rows whose decoded tokens name the row, so a batch says which samples it holds.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from e2e_dist.data.order import EpochOrder, rank_share
from e2e_dist.data.samples import row_samples
from e2e_dist.data.text import collate
from e2e_dist.train.batches import BatchStream

ROWS, SEQ, BLOCK = 48, 4, 4
CPU = torch.device("cpu")


def name_rows(batch: dict) -> dict:
    return {"tokens": np.repeat(batch["i"].astype(np.int64)[:, None], SEQ + 1, axis=1)}


@pytest.fixture
def split(ray_local):
    """48 samples in blocks of 4 (as a text stream's windows are), read 8 per task."""
    rows = row_samples("train", [{"i": i} for i in range(ROWS)], name_rows, {}, sample_bytes=8, rows_per_task=8)
    return replace(rows, starts=np.arange(0, ROWS + 1, BLOCK, dtype=np.int64))


def stream(split, world: int = 1, rank: int = 0, *, batch: int = 8, **kw) -> BatchStream:
    mb = batch // world // kw.pop("accum", 1)
    return BatchStream(split, micro_batch=mb, grad_accum=batch // world // mb, collate=collate, device=CPU,
                       shuffle_blocks=4, rank=rank, world=world, seed=7, prefetch=2, **kw)


def rows_of(batch: dict[str, torch.Tensor]) -> list[int]:
    return batch["tokens"][:, 0].tolist()


def steps(streams: list[BatchStream], n: int) -> list[list[int]]:
    """n optimizer steps: each a global batch, rank 0's micro-batches first (as W=1 accumulates them)."""
    return [[row for s in streams for _ in range(s.accum) for row in rows_of(s.next())] for _ in range(n)]


def test_every_rank_reads_only_its_samples_and_the_sequence_is_the_same_at_1_2_4_workers(split):
    runs = {}
    for world in (1, 2, 4):
        ranks = [stream(split, world, r, accum=2 if world == 1 else 1) for r in range(world)]
        runs[world] = steps(ranks, ROWS // 8)  # one epoch
        for s in ranks:
            s.close()
        # Each rank's tasks read and decoded exactly its share of epoch 0 (at W=2: 50%, not 100%).
        assert [s.epoch_counters[0]["samples"] for s in ranks] == [ROWS // world] * world
    assert runs[1] == runs[2] == runs[4]
    assert sorted(r for b in runs[1] for r in b) == list(range(ROWS))  # an epoch: every sample once
    assert runs[1][0] != list(range(8))  # shuffled


def test_a_resume_late_in_the_epoch_reads_nothing_before_its_position(split, monkeypatch):
    """Resume is arithmetic: the stream asks its read tasks for the samples after the position only
    (recorded where the ids leave for Ray Data), and trains on what the uninterrupted run would."""
    whole = steps([stream(split)], ROWS // 8 + 1)
    asked: list[np.ndarray] = []
    real = BatchStream._rows

    def recording(self, ids, windows):
        asked.append(ids.copy())
        return real(self, ids, windows)

    monkeypatch.setattr(BatchStream, "_rows", recording)
    late = stream(split, samples=40)  # 5 of 6 batches done
    assert steps([late], 2) == whole[5:7]  # the last batch of epoch 0, then epoch 1 goes on
    order = EpochOrder(split.starts, seed=7, epoch=0, window_blocks=4)
    assert np.array_equal(asked[0], rank_share(order, start=40, batch=8, first=0, count=1, rank=0, world=1))
    assert len(asked[0]) == 8 and late.epoch_counters[0]["samples"] == 8  # of epoch 0: the last batch only
    assert late.state() == {"epoch": 1, "samples": 8, "shuffle_blocks": 4}


def test_positions_survive_resizing_without_skipping_or_repeating_a_sample(split):
    """2 workers -> 1 -> 2 (global batch 8 throughout), across an epoch boundary: every step trains on
    what an unresized run trains on, and the saved position means the same at every size."""
    order = steps([stream(split)], 7)
    two = [stream(split, 2, r) for r in range(2)]
    seen = steps(two, 2)
    assert [s.state() for s in two] == [{"epoch": 0, "samples": 16, "shuffle_blocks": 4}] * 2
    one = stream(split, **{k: v for k, v in two[0].state().items() if k != "shuffle_blocks"})
    seen += steps([one], 4)  # the rest of epoch 0
    assert one.state()["epoch"] == 0 and one.state()["samples"] == ROWS
    two_again = [stream(split, 2, r, epoch=0, samples=ROWS) for r in range(2)]
    seen += steps(two_again, 1)  # epoch 1's first batch
    assert seen == order
    assert [s.state() for s in two_again] == [{"epoch": 1, "samples": 8, "shuffle_blocks": 4}] * 2


def test_each_epoch_has_its_own_order_the_same_on_every_run(split):
    first = steps([stream(split)], 3 * ROWS // 8)
    epochs = [sum(first[i:i + ROWS // 8], []) for i in range(0, len(first), ROWS // 8)]
    assert all(sorted(e) == list(range(ROWS)) for e in epochs) and len({tuple(e) for e in epochs}) == 3
    assert steps([stream(split)], 3 * ROWS // 8) == first
    materialized = steps([stream(split.materialize())], 3 * ROWS // 8)  # read once, gathered from memory
    assert materialized == first


def test_a_selection_read_in_the_background_holds_what_materialize_reads(split):
    """The validation selection: plain read tasks started at once (no Ray Data executor), read
    when first asked; sample i of the new set is ids[i] of the split, as with materialize(ids)."""
    ids = np.array([5, 0, 47, 13, 13, 30, 2], dtype=np.int64)
    background, blocking = split.read_in_background(ids, tasks=3), split.materialize(ids)
    assert background.n == blocking.n == len(ids) and background.materialized
    order = np.arange(len(ids))[::-1].copy()
    got, want = background.read(order)[0], blocking.read(order)[0]
    assert sorted(got) == sorted(want) and all(np.array_equal(got[k], want[k]) for k in want)
    assert got["tokens"][:, 0].tolist() == ids[order].tolist()


def test_a_train_set_smaller_than_a_global_batch_says_what_to_change(split):
    tiny = replace(split, starts=np.array([0, 4], dtype=np.int64))
    with pytest.raises(RuntimeError, match="fewer than one global batch of 8.*micro_batch_size"):
        stream(tiny).next()


def test_undecodable_samples_leave_their_micro_batch_not_their_place(ray_local):
    def half_bad(batch: dict) -> dict:
        out = name_rows(batch)
        out["valid"] = batch["i"] % 2 == 0
        return out

    split = row_samples("train", [{"i": i} for i in range(16)], half_bad, {}, sample_bytes=8, rows_per_task=8)
    s = BatchStream(split, micro_batch=4, grad_accum=1, collate=collate, device=CPU, shuffle_blocks=4, seed=0)
    batches = [rows_of(s.next()) for _ in range(4)]
    assert all(len(b) <= 4 and all(r % 2 == 0 for r in b) for b in batches)
    assert sorted(r for b in batches for r in b) == list(range(0, 16, 2))
