"""A split as an indexable sequence of samples, and what turns sample ids into decoded rows.

Every data source hands the launcher two `SampleSet`s (train, val). A SampleSet is small and
picklable, whatever the corpus size: the number of samples, block boundaries (data/order.py),
and a *reader* whose `read(ids)` returns those samples decoded, in that order, plus the bytes it
read from storage. Whatever a reader needs that grows with the corpus (the row table of an image
folder, a text index's checkpoints) sits once in Ray's object store (`Shared`) and travels as a
reference, so a task or a rank that unpickles a reader fetches it once per process.

Rows carry a `valid` column: a sample that cannot be decoded keeps its place (zeros, valid False)
and is dropped from its micro-batch on the rank, so a bad file never shifts which rank trains on
which sample. The reads themselves run in Ray Data tasks (`SampleSet.dataset`), or, for a set the
launcher materialized once (`SampleSet.materialize`: a train set under data.cache_mb, the
validation selection), as zero-copy gathers from the object store.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator

import numpy as np

READ_BYTES = "read_bytes"
"""Column of a read task's output: the bytes it read from storage, on its first row (0 elsewhere)."""
READ_SAMPLES = "read_samples"
"""Column of a read task's output: the samples it read and decoded, on its first row (0 elsewhere)."""
VALID = "valid"

_shared_cache: dict[str, Any] = {}


class Shared:
    """A value put once in Ray's object store; pickles as its reference; `get()` once per process."""

    def __init__(self, ref: Any):
        self.ref = ref

    @classmethod
    def put(cls, value: Any) -> "Shared":
        import ray

        return cls(ray.put(value))

    def get(self) -> Any:
        import ray

        key = self.ref.hex()
        if key not in _shared_cache:
            if len(_shared_cache) > 64:  # one per live set; old runs' values go
                _shared_cache.clear()
            _shared_cache[key] = ray.get(self.ref)
        return _shared_cache[key]


class SharedArray:
    """A large numpy array kept in the object store and used like the array where it is read
    (np.asarray, indexing, len): resolved once per process. What lets a rank's plan stay a few KiB
    while a split of 1 TB has a million block boundaries."""

    def __init__(self, array: np.ndarray):
        self.shared = Shared.put(np.ascontiguousarray(array))

    def value(self) -> np.ndarray:
        return self.shared.get()

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return np.asarray(self.value(), dtype=dtype)

    def __getitem__(self, key):
        return self.value()[key]

    def __len__(self) -> int:
        return len(self.value())


SHARE_ABOVE_BYTES = 1 << 16
"""Block boundaries larger than this travel to the ranks through the object store (`SampleSet.shared`)."""


@dataclass(kw_only=True)
class SampleSet:
    """One split: samples 0..n-1 in blocks, read by `reader`."""

    name: str
    starts: np.ndarray
    """Block boundaries (int64, blocks + 1; starts[-1] = n): runs of samples that are one read."""
    reader: Any
    """`read(ids) -> (columns, bytes read)`: numpy columns of those samples in that order, with `valid`."""
    sample_bytes: int
    """Decoded bytes per sample (what a materialized copy costs)."""
    rows_per_task: int = 256
    """Samples per read task: enough to amortize a task, few enough to stream."""
    materialized: bool = False
    """Read from a copy in the object store (no storage reads, no decoding)."""
    worth_caching: bool = True
    """Decoding a sample costs more than reading it again (images, clips, rendered glyphs): a small
    set is decoded once into memory (data.cache_mb). Text windows are read again instead: a copy in
    memory would cost the driver a pass over the data before training and save nothing."""

    def keep_in_memory(self, cache_mb: int) -> bool:
        """Whether the launcher reads this set once into the object store (data.cache_mb)."""
        return self.worth_caching and self.n * self.sample_bytes <= cache_mb * 2**20

    @property
    def n(self) -> int:
        return int(self.starts[-1])

    @property
    def blocks(self) -> int:
        return len(self.starts) - 1

    def read(self, ids: np.ndarray) -> tuple[dict[str, np.ndarray], int]:
        return self.reader.read(np.asarray(ids, dtype=np.int64))

    def shared(self) -> "SampleSet":
        """This set with its block boundaries in the object store when they are large (what the
        driver hands the workers: each node fetches them once, each rank's plan stays small)."""
        if isinstance(self.starts, np.ndarray) and self.starts.nbytes > SHARE_ABOVE_BYTES:
            return replace(self, starts=SharedArray(self.starts))
        return self

    def dataset(self, ids: np.ndarray | None = None, *, tasks: int = 2, name: str | None = None,
                node_id: str | None = None):
        """A Ray Dataset of these samples decoded, in `ids` order (default: 0..n-1), in read tasks of
        rows_per_task; at most `tasks` at once, on node `node_id` when it has room."""
        ids = np.arange(self.n, dtype=np.int64) if ids is None else np.asarray(ids, dtype=np.int64)
        per = max(1, self.rows_per_task)
        return read_dataset([ids[i:i + per] for i in range(0, len(ids), per)], self.reader, tasks=tasks,
                            name=name or self.name, node_id=node_id, chunk=per)

    def materialize(self, ids: np.ndarray | None = None, *, tasks: int = 2) -> "SampleSet":
        """Read (and decode) these samples once into the object store: a set whose reads are gathers.
        With `ids`, the new set's sample i is this set's ids[i] (e.g. the validation selection)."""
        import ray

        refs = self.dataset(ids, tasks=tasks).to_numpy_refs()
        count = ray.remote(num_cpus=0)(_num_rows)
        rows = ray.get([count.remote(r) for r in refs])
        reader = MaterializedReader(refs, rows)
        starts = self.starts if ids is None else np.arange(len(ids) + 1, dtype=np.int64)
        return replace(self, starts=starts, reader=reader, materialized=True)

    def read_in_background(self, ids: np.ndarray, *, tasks: int = 2) -> "SampleSet":
        """Like `materialize(ids)`, but returns at once: `tasks` plain Ray tasks read and decode the
        samples while the caller goes on, and the first read of the new set waits for them.

        Why not Ray Data here: for a small selection (the validation samples every evaluation
        scores) the streaming executor's own start costs more than the reading (~2.5 s of a 1-step
        run's start-up on 2 cores for 512 text windows), and it blocked the driver before Train
        could start its workers; the workers need these samples only at their first evaluation."""
        import ray

        ids = np.asarray(ids, dtype=np.int64)
        parts = [p for p in np.array_split(ids, max(1, min(tasks, len(ids)))) if len(p)]
        reader = ray.put(self.reader)  # once, not once per task
        read = ray.remote(num_cpus=0)(_read_block)
        refs = [read.remote(reader, p, max(1, self.rows_per_task)) for p in parts]
        return replace(self, starts=np.arange(len(ids) + 1, dtype=np.int64),
                       reader=MaterializedReader(refs, [len(p) for p in parts]), materialized=True)


def _read_block(reader: Any, ids: np.ndarray, chunk: int) -> dict[str, np.ndarray]:
    """One background read task: the samples `ids` decoded, as one block of columns (one row per id)."""
    parts, pos = [], 0
    for cols, _ in read_in_chunks(reader, ids, chunk):
        n = len(cols[VALID])
        parts.append((np.arange(pos, pos + n), cols))
        pos += n
    if pos != len(ids):
        raise RuntimeError(f"reader {type(reader).__name__} returned {pos} rows for {len(ids)} samples")
    return gather(parts, pos)


def read_dataset(id_lists: list[np.ndarray], reader: Any, *, tasks: int, name: str, node_id: str | None = None,
                 chunk: int = 256):
    """Ray Dataset: one read task per id list, rows in list order, `chunk` rows per output block
    (`read_samples`)."""
    import ray.data

    from e2e_dist.data.common import deterministic

    remote_args: dict[str, Any] = {}
    if node_id is not None:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        # On the rank's node when it has room (soft): the rows then reach the trainer without a transfer.
        remote_args["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id, soft=True)
    items = [{"ids": ids.tobytes()} for ids in id_lists]
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items))).map_batches(
        read_samples, batch_size=1, batch_format="numpy", fn_kwargs={"reader": reader, "chunk": chunk},
        # Reads are I/O and light decoding; on a small machine the training workers hold every CPU,
        # and a 1-CPU task would never be scheduled.
        num_cpus=0, compute=ray.data.TaskPoolStrategy(size=max(1, min(tasks, len(items)))), **remote_args)
    ds.set_name(name)
    return deterministic(ds)


def read_samples(batch: dict, *, reader: Any, chunk: int) -> Iterator[dict]:
    """Ray Data map_batches fn (a generator): {ids: int64 bytes} -> the reader's rows, `chunk` at a
    time, each chunk with what reading it took (bytes, samples) on its first row. A task reads its
    blocks once and decodes chunk by chunk: it holds the encoded blocks, not its samples decoded."""
    for raw in batch["ids"]:
        for cols, nbytes in read_in_chunks(reader, np.frombuffer(raw, dtype=np.int64), chunk):
            n = len(cols[VALID])
            read, samples = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
            if n:
                read[0], samples[0] = nbytes, n
            yield {**cols, READ_BYTES: read, READ_SAMPLES: samples}


def read_in_chunks(reader: Any, ids: np.ndarray, chunk: int) -> Iterator[tuple[dict[str, np.ndarray], int]]:
    """reader's rows for ids, `chunk` at a time: its own `read_chunks` where it has one (readers whose
    samples share reads: text windows of one range, rows of one row group), else `read` per chunk.
    The bytes read come with the first chunk (0 after)."""
    if hasattr(reader, "read_chunks"):
        yield from reader.read_chunks(ids, chunk)
        return
    for i in range(0, len(ids), chunk):
        yield reader.read(ids[i:i + chunk])


def _num_rows(block: dict) -> int:
    return len(next(iter(block.values()))) if block else 0


def gather(parts: list[tuple[np.ndarray, dict[str, np.ndarray]]], n: int) -> dict[str, np.ndarray]:
    """Columns of n rows from (positions, columns) parts that together cover 0..n-1."""
    out: dict[str, np.ndarray] = {}
    for where, cols in parts:
        for k, v in cols.items():
            if k not in out:
                out[k] = np.zeros((n,) + v.shape[1:], dtype=v.dtype)
            out[k][where] = v
    return out


class MaterializedReader:
    """Samples already decoded in object-store blocks (block i holds samples cum[i]..cum[i+1]-1)."""

    def __init__(self, refs: list, rows: list[int]):
        self.refs = [Shared(r) for r in refs]
        self.cum = np.concatenate([[0], np.cumsum(rows)]).astype(np.int64)

    def read(self, ids: np.ndarray) -> tuple[dict[str, np.ndarray], int]:
        which = np.searchsorted(self.cum, ids, side="right") - 1
        parts = []
        for b in np.unique(which):
            where = np.nonzero(which == b)[0]
            block = self.refs[b].get()
            parts.append((where, {k: v[ids[where] - self.cum[b]] for k, v in block.items()
                                  if k not in (READ_BYTES, READ_SAMPLES)}))
        return gather(parts, len(ids)), 0


class RowReader:
    """Samples = rows of a table (one per image file, clip, rendered glyph), decoded by `decode`, a
    function of a numpy batch of rows (the sources' map_batches functions). size_column: the
    column holding each row's file size, which is what reading it costs."""

    def __init__(self, rows: list[dict], decode: Callable[..., dict], fn_kwargs: dict, size_column: str | None = None):
        import pyarrow as pa

        self.table = Shared.put(pa.Table.from_pylist(rows))
        self.decode, self.fn_kwargs, self.size_column = decode, fn_kwargs, size_column

    def read(self, ids: np.ndarray) -> tuple[dict[str, np.ndarray], int]:
        part = self.table.get().take(ids)
        batch = {name: part.column(name).to_numpy(zero_copy_only=False) for name in part.column_names}
        out = self.decode(batch, **self.fn_kwargs)
        out.setdefault(VALID, np.ones(len(ids), dtype=bool))
        read = int(batch[self.size_column].sum()) if self.size_column else 0
        return out, read


def row_samples(name: str, rows: list[dict], decode: Callable[..., dict], fn_kwargs: dict, *, sample_bytes: int,
                rows_per_task: int, size_column: str | None = None) -> SampleSet:
    """A SampleSet of table rows, one sample (and one block) each: the epoch order is a full shuffle."""
    return SampleSet(name=name, starts=np.arange(len(rows) + 1, dtype=np.int64),
                     reader=RowReader(rows, decode, fn_kwargs, size_column), sample_bytes=sample_bytes,
                     rows_per_task=rows_per_task)
