"""torch.compile's shared cache (train/compile_cache.py): what one run compiled, a run on a node
with an empty local cache loads from storage instead of compiling again."""

from __future__ import annotations

import os

import pytest
import torch

from e2e_dist.config import load_run_config
from e2e_dist.train import compile_cache


@pytest.mark.timeout(600)
def test_a_node_with_an_empty_cache_loads_what_another_compiled(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    from torch._dynamo.utils import counters

    cfg = load_run_config("tiny-text", [f"storage.path={tmp_path}/runs"])
    cpu = torch.device("cpu")
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))
    x = torch.randn(8, 32)

    def first_step() -> dict[str, int]:
        torch._dynamo.reset()
        counters.clear()
        torch.compile(model)(x).sum().backward()
        return dict(counters["inductor"])

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "node-a"))  # the first node
    assert compile_cache.load(cfg, cpu) == 0  # nothing shared yet: compiles cold
    cold = first_step()
    assert cold.get("fxgraph_cache_miss", 0) > 0 and not cold.get("fxgraph_cache_hit")
    saved = compile_cache.save(cfg, cpu)
    blob = compile_cache.blob_uri(cfg, cpu)
    assert saved > 0 and os.path.getsize(blob) == saved and blob.startswith(f"{tmp_path}/runs/_compile_cache/")

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "node-b"))  # another node: empty local cache
    torch.compiler.reset()
    assert compile_cache.load(cfg, cpu) == saved
    warm = first_step()
    assert warm.get("fxgraph_cache_hit", 0) == cold["fxgraph_cache_miss"] and not warm.get("fxgraph_cache_miss")
    # another model shape is another key: nothing loaded for it
    other = load_run_config("tiny-text", [f"storage.path={tmp_path}/runs", "model.n_layer=3"])
    assert compile_cache.cache_key(other, cpu) != compile_cache.cache_key(cfg, cpu)
    assert compile_cache.load(other, cpu) == 0
