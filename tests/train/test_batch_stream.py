"""BatchStream over a real Ray Data dataset: order, epochs, and resuming at a saved position.

The stream feeds Ray Data's `iter_torch_batches` our modality collate (Ray runs it, plus pinning
and the device copy on a GPU, in its prefetch threads). A restarted worker rebuilds the stream
from the saved (epoch, consumed) position and must see exactly the batches the first one would
have seen next.
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
    assert stream.state() == {"epoch": 1, "consumed": 2}
    expected_next = [rows_of(stream.next()) for _ in range(4)]

    resumed = BatchStream(dataset, BATCH, collate, torch.device("cpu"), epoch=1, consumed=2, prefetch=0)
    assert [rows_of(resumed.next()) for _ in range(4)] == expected_next == [[4, 5], [6, 7], [8, 9], [0, 1]]
    assert resumed.state() == {"epoch": 2, "consumed": 1}


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
    resumed = stream(epoch=1, consumed=2)  # a restart inside epoch 1
    assert [rows_of(resumed.next()) for _ in range(3)] == epochs[1][2:]
    other_seed = BatchStream(dataset, BATCH, collate, torch.device("cpu"), shuffle_rows=3 * BATCH, seed=8)
    assert [rows_of(other_seed.next()) for _ in range(5)] != epochs[0]
