from __future__ import annotations

import pytest
import torch

from e2e_dist.config import load_run_config
from e2e_dist.models.gpt import BOS, PAD, VOCAB_SIZE, ByteGPT, _filtered_probs
from e2e_dist.models.registry import build_model, model_kinds


def test_registry_builds_gpt_from_config():
    cfg = load_run_config("tiny-text", ["model.n_layer=3", "model.d_model=32", "model.n_head=2"])
    model = build_model(cfg.model, cfg.data)
    assert "gpt" in model_kinds() and isinstance(model, ByteGPT) and len(model.blocks()) == 3
    assert model.head.weight is model.tok_emb.weight  # tied embeddings


def test_shapes_loss_and_eval_sums():
    torch.manual_seed(0)
    model = ByteGPT(n_layer=2, n_head=2, d_model=16, max_seq_len=32)
    tokens = torch.randint(0, 256, (3, 17))
    assert model.logits(tokens[:, :-1]).shape == (3, 16, VOCAB_SIZE)
    loss = model({"tokens": tokens})
    assert loss.ndim == 0 and abs(loss.item() - torch.log(torch.tensor(float(VOCAB_SIZE))).item()) < 0.5
    tokens[0, 5:] = PAD
    sums = model.eval_sums({"tokens": tokens})
    assert sums["count"].item() == 3 * 16 - 12  # padded targets do not count
    metrics = model.summarize_eval({k: v.item() for k, v in sums.items()})
    assert abs(metrics["val_bpb"] - metrics["val_loss"] / 0.6931471805599453) < 1e-9


def test_causality():
    torch.manual_seed(0)
    model = ByteGPT(n_layer=2, n_head=2, d_model=16, max_seq_len=32).eval()
    a = torch.randint(0, 256, (1, 10))
    b = a.clone()
    b[0, 7:] = (b[0, 7:] + 1) % 256
    with torch.no_grad():
        assert torch.allclose(model.logits(a)[0, :7], model.logits(b)[0, :7], atol=1e-6)


def test_param_counts_and_generate():
    model = ByteGPT(n_layer=1, n_head=2, d_model=16, max_seq_len=32)
    emb = VOCAB_SIZE * 16 + 32 * 16
    assert model.num_params() - model.num_params(non_embedding=True) == emb
    out = model.generate(b"ab", max_new_bytes=5, generator=torch.Generator().manual_seed(0))
    assert isinstance(out, bytes) and len(out) == 5


def test_generate_greedy_top_k_and_top_p():
    torch.manual_seed(0)
    model = ByteGPT(n_layer=1, n_head=2, d_model=16, max_seq_len=32).eval()
    greedy = model.generate(b"ab", max_new_bytes=8, temperature=0)
    # Temperature 0 is the argmax at every step, and a tiny nucleus or top-1 keeps only that byte.
    idx = torch.tensor([[BOS, *b"ab"]])
    for byte in greedy:
        assert byte == int(model.logits(idx)[0, -1, :256].argmax())
        idx = torch.cat([idx, torch.tensor([[byte]])], dim=1)
    for kw in ({"top_p": 1e-6}, {"top_k": 1}):
        assert model.generate(b"ab", max_new_bytes=8, generator=torch.Generator().manual_seed(5), **kw) == greedy
    # A nucleus keeps the likeliest bytes holding top_p of the mass, renormalized.
    probs = _filtered_probs(torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])), None, 0.7)
    assert torch.allclose(probs, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="temperature >= 0"):
        model.generate(b"a", temperature=-0.5)
