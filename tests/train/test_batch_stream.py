"""BatchStream over a real Ray Data dataset: order, epochs, and resuming at a saved position.

The stream feeds Ray Data's `iter_torch_batches` our modality collate (Ray runs it, plus pinning
and the device copy on a GPU, in its prefetch threads). A restarted worker rebuilds the stream
from the saved (epoch, samples) position and must see exactly the batches the first one would
have seen next - also when the run comes back with another number of workers.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from e2e_dist.data.text import collate
from e2e_dist.train.batches import BatchStream

ROWS, BATCH, SEQ = 10, 2, 4  # 5 full batches per epoch


@pytest.fixture
def dataset(ray_local):
    import ray.data
    from ray.data import DataContext

    DataContext.get_current().execution_options.preserve_order = True
    # Row i holds the token i everywhere, so a batch names the rows it came from.
    return ray.data.from_items([{"tokens": np.full(SEQ + 1, i, dtype=np.int64)} for i in range(ROWS)])


def rows_of(batch: dict[str, torch.Tensor]) -> list[int]:
    assert batch["tokens"].dtype == torch.int64 and batch["tokens"].shape == (BATCH, SEQ + 1)
    return batch["tokens"][:, 0].tolist()


def test_stream_walks_epochs_in_order_and_resumes_where_it_stopped(dataset):
    stream = BatchStream(dataset, BATCH, collate, torch.device("cpu"), prefetch=2)
    first = [rows_of(stream.next()) for _ in range(7)]
    assert first[:5] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    assert first[5:] == [[0, 1], [2, 3]]  # the second epoch starts over
    assert stream.state() == {"epoch": 1, "samples": 2 * BATCH}
    expected_next = [rows_of(stream.next()) for _ in range(4)]

    resumed = BatchStream(dataset, BATCH, collate, torch.device("cpu"), epoch=1, samples=2 * BATCH, prefetch=0)
    assert [rows_of(resumed.next()) for _ in range(4)] == expected_next == [[4, 5], [6, 7], [8, 9], [0, 1]]
    assert resumed.state() == {"epoch": 2, "samples": BATCH}


def test_stream_without_a_full_batch_says_what_to_change(ray_local):
    import ray.data

    tiny = ray.data.from_items([{"tokens": np.zeros(SEQ + 1, dtype=np.int64)}])
    with pytest.raises(RuntimeError, match="micro_batch_size"):
        BatchStream(tiny, BATCH, collate, torch.device("cpu")).next()


def test_each_epoch_reshuffles_the_same_way_on_every_run_and_resume(dataset):
    def stream(**kw):
        return BatchStream(dataset, BATCH, collate, torch.device("cpu"), shuffle_rows=3 * BATCH, seed=7, **kw)

    first = stream()
    epochs = [[rows_of(first.next()) for _ in range(5)] for _ in range(3)]
    for order in epochs:  # an epoch is still every row exactly once
        assert sorted(r for batch in order for r in batch) == list(range(ROWS))
    assert len({str(order) for order in epochs}) == 3, epochs  # no two epochs alike
    assert epochs[0] != [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]

    again = stream()  # a second run: the same orders
    assert [[rows_of(again.next()) for _ in range(5)] for _ in range(3)] == epochs
    resumed = stream(epoch=1, samples=2 * BATCH)  # a restart inside epoch 1
    assert [rows_of(resumed.next()) for _ in range(3)] == epochs[1][2:]
    other_seed = BatchStream(dataset, BATCH, collate, torch.device("cpu"), shuffle_rows=3 * BATCH, seed=8)
    assert [rows_of(other_seed.next()) for _ in range(5)] != epochs[0]


def ranks(dataset, world: int, **position) -> list[BatchStream]:
    return [BatchStream(dataset, BATCH, collate, torch.device("cpu"), rank=r, world=world, prefetch=0,
                        shuffle_rows=3 * BATCH, seed=7, **position) for r in range(world)]


def train_rounds(streams: list[BatchStream], n: int) -> list[int]:
    """The rows `n` optimizer steps (one micro-batch per rank each) trained on, all ranks together."""
    return [row for _ in range(n) for s in streams for row in rows_of(s.next())]


def test_position_survives_resizing_without_skipping_or_repeating_a_row(dataset):
    """2 workers -> 1 -> 2, across an epoch boundary: every row is trained on exactly once per
    epoch, in the order an unresized run takes; the saved position means the same at every size."""
    (single,) = ranks(dataset, 1)
    order = train_rounds([single], 7)  # epoch 0, then 2 micro-batches of epoch 1
    assert sorted(order[: ROWS]) == list(range(ROWS))

    two = ranks(dataset, 2)
    seen = train_rounds(two, 1)  # micro-batches 0 (rank 0) and 1 (rank 1)
    assert [s.state() for s in two] == [{"epoch": 0, "samples": 2 * BATCH}] * 2
    (one,) = ranks(dataset, 1, **two[0].state())
    seen += train_rounds([one], 3)  # micro-batches 2, 3, 4: the rest of epoch 0
    assert one.state() == {"epoch": 0, "samples": ROWS}
    two_again = ranks(dataset, 2, **one.state())
    seen += train_rounds(two_again, 1)  # epoch 1's micro-batches 0 and 1
    assert seen == order
    assert [s.state() for s in two_again] == [{"epoch": 1, "samples": 2 * BATCH}] * 2


def test_an_epoch_ends_for_every_rank_together(dataset):
    """5 micro-batches on 2 ranks: the fifth is left over; both ranks move to epoch 1 at once."""
    two = ranks(dataset, 2)
    train_rounds(two, 2)
    train_rounds(two, 1)
    assert [s.state()["epoch"] for s in two] == [1, 1]
