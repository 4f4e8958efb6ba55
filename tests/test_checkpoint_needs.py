"""Which files a rank fetches and where a spread conversion's fragments come from, as plain functions
(tests/test_checkpoint_spread.py checks the same against real engines and what DeepSpeed opens)."""

from __future__ import annotations

from e2e_dist.checkpoint.needs import native_files
from e2e_dist.checkpoint.spread import plan_routes, slice_of

ZERO2 = ["latest", "zero_to_fp32.py", "zero_to_torch.py", "ds/mp_rank_00_model_states.pt",
         "ds/zero_pp_rank_0_mp_rank_00_optim_states.pt", "ds/zero_pp_rank_1_mp_rank_00_optim_states.pt"]
ZERO3 = ["latest", "ds/zero_pp_rank_0_mp_rank_00_model_states.pt", "ds/zero_pp_rank_1_mp_rank_00_model_states.pt",
         "ds/bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt", "ds/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"]


def test_a_rank_fetches_the_model_states_and_its_own_partition_only():
    assert native_files(ZERO2, rank=1) == ["ds/mp_rank_00_model_states.pt", "ds/zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert native_files(ZERO3, rank=0) == ["ds/bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                           "ds/zero_pp_rank_0_mp_rank_00_model_states.pt"]
    # elastic_checkpoint makes ZeRO-1/2 merge every partition on load; a file we do not know is kept
    assert native_files(ZERO2 + ["ds/extra.pt"], rank=1, elastic=True) == [
        "ds/extra.pt", "ds/mp_rank_00_model_states.pt", "ds/zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "ds/zero_pp_rank_1_mp_rank_00_optim_states.pt"]


def test_every_parameter_is_converted_by_exactly_one_rank_near_its_share_of_the_shards():
    shapes = [{"emb": (70, 10), "a": (10, 10), "b": (10, 30), "c": (20, 20)}, {"n1": (10,), "n2": (10,)}]
    for world in (1, 2, 3, 8):
        slices = [slice_of(shapes, r, world) for r in range(world)]
        names = [n for s in slices for n in s]
        assert sorted(names) == sorted(n for g in shapes for n in g) and len(names) == len(set(names))
    # group 0 has 1500 elements: "emb" (0-699) and "a" (700-799) start in rank 0's half
    assert slice_of(shapes, 0, 2) == ["emb", "a", "n1"] and slice_of(shapes, 1, 2) == ["b", "c", "n2"]


def test_the_piece_of_an_edge_parameter_in_another_nodes_shard_travels_as_fragments():
    # 2 shards (2 writer ranks) on 2 nodes: "emb" starts in shard 0 and ends in shard 1
    maps = {0: {"emb": 950, "n1": 10}, 1: {"emb": 50, "a": 100, "b": 300, "c": 400, "n2": 10}}
    slices = [["emb", "a", "n1"], ["b", "c", "n2"]]
    r0, r1 = plan_routes(maps, slices, [[0], [1]], nodes=(0, 1))
    assert r0.fetch == {0} and r1.fetch == {1}
    assert r0.local == {0: ["emb", "n1"]} and r0.receive == [("emb", 1), ("a", 1)]
    assert r1.give == {1: ["emb", "a"]} and r1.local == {1: ["b", "c", "n2"]} and r1.receive == []
    # the same ranks on one node share the node's copy: nothing travels
    r0, r1 = plan_routes(maps, slices, [[0], [1]], nodes=(0, 0))
    assert r0.local == {0: ["emb", "n1"], 1: ["emb", "a"]} and not r0.receive and not r1.give


def test_a_rank_reads_a_shard_it_needs_half_of_itself_and_fetches_the_rest_as_fragments():
    # 1 shard, 2 ranks on 2 nodes: rank 1 has no block; it needs 60% of shard 0 -> fetches it
    maps = {0: {"x": 400, "y": 600}}
    r0, r1 = plan_routes(maps, [["x"], ["y"]], [[0], []], nodes=(0, 1))
    assert r1.fetch == {0} and r1.local == {0: ["y"]} and not r0.give
    # ... 30%: its fragments are extracted by rank 0 and handed over
    maps = {0: {"x": 700, "y": 300}}
    r0, r1 = plan_routes(maps, [["x"], ["y"]], [[0], []], nodes=(0, 1))
    assert r1.fetch == set() and r0.give == {0: ["y"]} and r1.receive == [("y", 0)]
