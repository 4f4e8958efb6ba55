"""The universal form, converted by every rank of the resuming group at once, each a slice of the parameters.

DeepSpeed's ds_to_universal (0.19.8) is one process: extract every ZeRO shard's fragment of every
parameter into temp files, merge each parameter's fragments into `zero/<name>/{fp32,exp_avg,
exp_avg_sq,step}.pt`, save the shared optimizer state, copy the model states. Extract and merge
work parameter by parameter, so W ranks convert W disjoint slices with its own per-parameter
functions (spread_convert.py) and the work per rank falls as 1/W:

1. A rank takes, in each param group, the parameters whose first element lies in its 1/W of the
   group (param_shapes from the model states: the same split on every rank, in the order the
   group is flattened, so a rank's parameters sit in about 1/W of the shards).
2. Its node fetches the shards of its block (ZeRO-1/2: its contiguous 1/W of them), whose fragment
   maps the ranks then share, and any other shard it needs for at least half of that shard's
   elements (1 rank's checkpoint on 2: both read the one shard, memory-mapped, and share the
   extracting). The smaller pieces of its parameters that lie in shards held elsewhere (the
   parameter at a block's edge) are extracted there and handed over as fragment files through
   storage (`universal/_fragments/`, deleted after the commit), not as whole shards. A ZeRO-3 shard
   holds a piece of every parameter, so for a ZeRO-3 source every node fetches every shard.
3. Each rank merges its parameters straight into the form both ZeRO families load (universal.py)
   in its node's restore directory and uploads them; rank 0 also writes the shared files, and the
   manifest last, after every rank's upload (the commit protocol). A failure on any rank fails the
   conversion on every rank, in one line.
4. The files stay in the node's directory: the restore that follows fetches only what its ranks
   load and this node did not convert.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from e2e_dist import storage
from e2e_dist.checkpoint.layout import (
    FORMAT_VERSION,
    MANIFEST,
    CommittedCheckpoint,
    now_utc,
)
from e2e_dist.checkpoint.ranks import Ledger, Ranks, node_fetch
from e2e_dist.checkpoint.spread_convert import Source, extract, merge
from e2e_dist.errors import CheckpointError, StorageError

log = logging.getLogger(__name__)
FRAGMENTS_DIR = "_fragments"


def slice_of(param_shapes: list[dict[str, Any]], rank: int, world: int) -> list[str]:
    """The parameters `rank` converts: in each group, those whose first element lies in its 1/W of
    the group's elements. Every parameter falls to exactly one rank."""
    mine = []
    for group in param_shapes:
        total = max(1, sum(_numel(s) for s in group.values()))
        start = 0
        for name, shape in group.items():
            if start * world // total == rank:
                mine.append(name)
            start += _numel(shape)
    return mine


@dataclass
class Route:
    """Where one rank's fragments come from, and which it extracts for ranks on other nodes."""

    fetch: set[int] = field(default_factory=set)
    """Shards its node fetches for it."""
    local: dict[int, list[str]] = field(default_factory=dict)
    """Shard on its node -> its parameters to extract from it."""
    give: dict[int, list[str]] = field(default_factory=dict)
    """Shard of its block -> other nodes' parameters to extract from it and upload."""
    receive: list[tuple[str, int]] = field(default_factory=list)
    """(parameter, shard) fragments it downloads."""


def plan_routes(maps: dict[int, dict[str, int]], slices: list[list[str]], blocks: list[list[int]],
                nodes: tuple[int, ...]) -> list[Route]:
    """Every rank's Route, alike on every rank, from each shard's fragment sizes ({name: elements})."""
    converter = {name: r for r, names in enumerate(slices) for name in names}
    owner = {i: r for r, block in enumerate(blocks) for i in block}
    share: dict[tuple[int, int], int] = {}
    for i, frags in maps.items():
        for name, n in frags.items():
            key = (converter.get(name, 0), i)
            share[key] = share.get(key, 0) + n
    totals = {i: max(1, sum(frags.values())) for i, frags in maps.items()}
    routes = [Route(fetch=set(block)) for block in blocks]
    for (r, i), n in share.items():
        if 2 * n >= totals[i]:
            routes[r].fetch.add(i)
    on_node: dict[int, set[int]] = {}
    for r, route in enumerate(routes):
        on_node.setdefault(nodes[r], set()).update(route.fetch)
    for i, frags in sorted(maps.items()):
        for name in frags:
            r = converter.get(name, 0)  # a shard's parameter is in param_shapes; rank 0 if ever not
            if i in on_node[nodes[r]]:
                routes[r].local.setdefault(i, []).append(name)
            else:
                routes[owner[i]].give.setdefault(i, []).append(name)
                routes[r].receive.append((name, i))
    return routes


def convert_spread(ckpt: CommittedCheckpoint, *, zero_stage: int, uri: str, source: str, local: Path, out: Path,
                   ranks: Ranks, storage_cfg: Any, ledger: Ledger) -> tuple[CommittedCheckpoint | None, list[str]]:
    """Collective: convert `ckpt` (written at `zero_stage`) to its universal form at `uri`, every rank
    its slice, with the native files under `local` and the output under `out` (both this node's).
    Returns the committed form, or (None, problems) when a node's native files failed their checksums."""
    import torch

    src = Source.of(ckpt, zero_stage)
    n = len(src.shards)
    if ranks.rank == 0:
        storage.delete_file(storage.join(uri, MANIFEST), storage_cfg)  # uncommitted while it changes
    blocks = [list(range(n)) if src.stage3 else src.own_block(r, ranks.world) for r in range(ranks.world)]
    first = [src.model_states, *(src.shards[i] for i in blocks[ranks.rank])]
    problems = node_fetch(ckpt, local, first, ranks, storage_cfg, ledger)
    if problems:
        return None, problems
    shapes = torch.load(local / src.model_states, map_location="cpu", mmap=True, weights_only=False)["param_shapes"]
    slices = [slice_of(shapes, r, ranks.world) for r in range(ranks.world)]
    route = plan_routes(_fragment_maps(src, local, ranks, blocks, shapes), slices, blocks, ranks.nodes)[ranks.rank]
    problems = node_fetch(ckpt, local, [src.shards[i] for i in sorted(route.fetch)], ranks, storage_cfg, ledger)
    if problems:
        return None, problems
    temp, frags_uri = local / f".universal-tmp-{ranks.rank}", storage.join(uri, FRAGMENTS_DIR)
    shutil.rmtree(temp, ignore_errors=True)
    given = _all_or_none(ranks, lambda: _give(src, local, route, temp.with_name(temp.name + "-give"), frags_uri,
                                              shapes, storage_cfg))

    def convert() -> list[dict[str, Any]]:
        extract(src, local, temp, route.local, shapes)
        _receive(route, given, temp, frags_uri, storage_cfg, ledger)
        written = merge(src, local, temp, out, slices[ranks.rank], shapes, rank=ranks.rank)
        return [e.to_dict() for e in storage.upload_dir(out, uri, storage_cfg, files=written)]

    doc = _commit(ckpt, uri, source, ranks, _all_or_none(ranks, convert), storage_cfg)
    ledger.converted = slices[ranks.rank]
    return CommittedCheckpoint(uri, ckpt.step, doc, storage_cfg), []


def _fragment_maps(src: Source, local: Path, ranks: Ranks, blocks: list[list[int]],
                   shapes: list[dict[str, Any]]) -> dict[int, dict[str, int]]:
    """Shard -> {parameter: elements of it there}. ZeRO-3: every shard holds every parameter (its
    maps are not needed: every node has every shard). ZeRO-1/2: each rank reads the maps of its
    block (memory-mapped: no tensor data) and the ranks share them; collective."""
    import torch
    from deepspeed.checkpoint.constants import (
        OPTIMIZER_STATE_DICT,
        PARAM_SLICE_MAPPINGS,
    )

    if src.stage3:
        return {i: {name: 1 for group in shapes for name in group} for i in range(len(src.shards))}
    maps: dict[int, dict[str, int]] = {}
    for i in blocks[ranks.rank]:
        sd = torch.load(local / src.shards[i], map_location="cpu", mmap=True, weights_only=False)
        for group in sd[OPTIMIZER_STATE_DICT][PARAM_SLICE_MAPPINGS]:
            for name, frag in group.items():
                maps.setdefault(i, {})[name] = maps.get(i, {}).get(name, 0) + int(frag.numel)
    return {i: frags for part in ranks.gather(maps) for i, frags in part.items()}


def _give(src: Source, local: Path, route: Route, temp: Path, frags_uri: str, shapes: list[dict[str, Any]],
          storage_cfg: Any) -> list[dict[str, Any]]:
    """Extract the fragments other nodes' ranks need from this rank's shards and upload them."""
    if not route.give:
        return []
    shutil.rmtree(temp, ignore_errors=True)
    extract(src, local, temp, route.give, shapes)
    entries = storage.upload_dir(temp, frags_uri, storage_cfg)
    shutil.rmtree(temp, ignore_errors=True)
    return [e.to_dict() for e in entries]


def _receive(route: Route, given: list[list[dict[str, Any]]], temp: Path, frags_uri: str, storage_cfg: Any,
             ledger: Ledger) -> None:
    """Download this rank's fragments from other nodes into `temp`, checked against the givers' sha256."""
    wanted = {(name, f"{i:02d}") for name, i in route.receive}
    entries = {f["path"]: f for files in given for f in files
               if (f["path"].split("/")[0], f["path"].rsplit(".", 1)[-1]) in wanted}
    if not entries:
        return
    for got in storage.download_dir(frags_uri, temp, storage_cfg, files=list(entries)):
        if got.sha256 != entries[got.path]["sha256"]:
            raise CheckpointError(f"fragment {got.path} arrived corrupt")
    ledger.add(frags_uri, sorted(entries), sum(f["size"] for f in entries.values()))


def _all_or_none(ranks: Ranks, step: Callable[[], Any]) -> list[Any]:
    """Run `step` on every rank; every rank's result, or CheckpointError on every rank if any failed."""
    error, result = "", None
    try:
        result = step()
    except StorageError as e:
        error = str(e)
    except Exception as e:  # noqa: BLE001 - any converter failure is one line, on every rank
        error = f"{type(e).__name__}: {e}"
    outcomes = ranks.gather((error, result))
    errors = [e for e, _ in outcomes if e]
    if errors:
        raise CheckpointError(f"universal conversion failed: {errors[0]}")
    return [r for _, r in outcomes]


def _commit(ckpt: CommittedCheckpoint, uri: str, source: str, ranks: Ranks, uploaded: list[list[dict[str, Any]]],
            storage_cfg: Any) -> dict[str, Any]:
    """Rank 0 writes the manifest once every rank's files are uploaded; every rank gets it back."""
    doc: dict[str, Any] = {}
    if ranks.rank == 0:
        files = sorted((f for entries in uploaded for f in entries), key=lambda f: f["path"])
        doc = {"format_version": FORMAT_VERSION, "kind": "universal", "step": ckpt.step, "source": source,
               "files": files, "converted_by": ranks.world, "created_at": now_utc()}
        try:
            storage.write_text(storage.join(uri, MANIFEST), json.dumps(doc, indent=1), storage_cfg)
        except StorageError as e:
            doc = {"error": str(e)}
        try:  # transient hand-over files, not part of the form: a leftover is harmless, so only said
            storage.delete_tree(storage.join(uri, FRAGMENTS_DIR), storage_cfg)
        except StorageError as e:
            log.warning("could not delete %s: %s", storage.join(uri, FRAGMENTS_DIR), e)
    doc = ranks.from_rank0(doc)
    if "error" in doc:
        raise CheckpointError(f"universal form of {ckpt.uri} not committed: {doc['error']}")
    return doc


def _numel(shape: Any) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n
