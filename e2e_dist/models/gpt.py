"""A byte-level GPT small enough to hold in your head: bytes in, next-byte logits out.

Vocabulary = 256 byte values + specials (BOS, EOS, PAD), tied input/output embeddings,
pre-norm blocks, causal attention through `scaled_dot_product_attention`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from e2e_dist.models.base import Batch, E2EModel, nats_to_bits
from e2e_dist.models.registry import register_model

BOS, EOS, PAD = 256, 257, 258
VOCAB_SIZE = 259


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_head: int, dropout: float):
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        # (B, T, C) -> (B, heads, T, head_dim)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    def __init__(self, d_model: int, n_head: int, dropout: float):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_head, dropout)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, 4 * d_model, bias=False), nn.GELU(), nn.Linear(4 * d_model, d_model, bias=False)
        )
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.drop(self.mlp(self.ln2(x)))


class ByteGPT(E2EModel):
    input_kind = "bytes"
    unit_name = "tokens"

    def __init__(self, n_layer: int, n_head: int, d_model: int, max_seq_len: int, dropout: float = 0.0):
        super().__init__()
        self.max_seq_len = max_seq_len
        self.example_len = max_seq_len  # window length used for FLOP counting; the builder sets data.seq_len
        self.tok_emb = nn.Embedding(VOCAB_SIZE, d_model)
        self.pos_emb = nn.Embedding(max_seq_len, d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks_ = nn.ModuleList(Block(d_model, n_head, dropout) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, VOCAB_SIZE, bias=False)
        self.head.weight = self.tok_emb.weight  # tied: one table for bytes in and bytes out
        self.init_weights()

    def init_module(self, name: str, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            # GPT-2's scaled init of residual projections keeps the residual stream's variance flat in depth.
            residual = name.endswith(("attn.proj", "mlp.2"))
            std = 0.02 / math.sqrt(2 * len(self.blocks_)) if residual else 0.02
            nn.init.normal_(module.weight, mean=0.0, std=std)

    def train_flops(self, batch_size: int) -> int:
        n_layer, d_model = len(self.blocks_), self.tok_emb.embedding_dim
        return gpt_train_flops(n_layer=n_layer, d_model=d_model, seq_len=self.example_len, batch_size=batch_size)

    def logits(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.shape[1]
        if T > self.max_seq_len:
            raise ValueError(f"sequence of {T} > max_seq_len {self.max_seq_len}")
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))
        for block in self.blocks_:
            x = self.run_block(block, x)
        return self.head(self.ln_f(x))

    def forward(self, batch: Batch) -> torch.Tensor:
        tokens = batch["tokens"]  # (B, T+1): inputs are [:-1], targets [1:]
        logits = self.logits(tokens[:, :-1])
        return F.cross_entropy(logits.reshape(-1, VOCAB_SIZE).float(), tokens[:, 1:].reshape(-1), ignore_index=PAD)

    def eval_sums(self, batch: Batch) -> dict[str, torch.Tensor]:
        tokens = batch["tokens"]
        logits = self.logits(tokens[:, :-1])
        targets = tokens[:, 1:].reshape(-1)
        loss_sum = F.cross_entropy(logits.reshape(-1, VOCAB_SIZE).float(), targets, ignore_index=PAD, reduction="sum")
        return {"loss_sum": loss_sum.detach(), "count": (targets != PAD).sum().to(loss_sum.dtype)}

    def summarize_eval(self, sums: dict[str, float]) -> dict[str, float]:
        loss = sums["loss_sum"] / max(sums["count"], 1.0)
        # Every target is one byte, so bits per byte is the loss in bits.
        return {"val_loss": loss, "val_bpb": nats_to_bits(loss)}

    def units_in(self, batch: Batch) -> int:
        t = batch["tokens"]
        return t.shape[0] * (t.shape[1] - 1)

    def example_batch(self, batch_size: int, device: torch.device | str = "cpu") -> Batch:
        return {"tokens": torch.randint(0, 256, (batch_size, self.example_len + 1), device=device)}

    def blocks(self) -> list[nn.Module]:
        return list(self.blocks_)

    def embedding_parameters(self) -> list[nn.Parameter]:
        return [self.tok_emb.weight, self.pos_emb.weight]

    @torch.no_grad()
    def generate(self, prompt: bytes, max_new_bytes: int = 200, temperature: float = 0.8, top_k: int | None = 40,
                 top_p: float = 1.0, generator: torch.Generator | None = None) -> bytes:
        """Sample a continuation of `prompt`, byte by byte: temperature 0 is greedy (the likeliest
        byte); otherwise from the `top_k` likeliest bytes (0/None: all), then the smallest set of
        them holding `top_p` of the probability (1.0: all)."""
        if temperature < 0 or not 0 < top_p <= 1 or (top_k is not None and top_k < 0) or max_new_bytes < 0:
            raise ValueError(f"generate: need temperature >= 0, 0 < top_p <= 1, top_k >= 0, max_new_bytes >= 0 "
                             f"(got {temperature}, {top_p}, {top_k}, {max_new_bytes})")
        device = next(self.parameters()).device
        idx = torch.tensor([[BOS, *prompt]], dtype=torch.long, device=device)
        out = bytearray()
        for _ in range(max_new_bytes):
            logits = self.logits(idx[:, -self.max_seq_len:])[:, -1, :256].float()
            if temperature == 0:
                nxt = logits.argmax(dim=-1, keepdim=True)
            else:
                nxt = torch.multinomial(_filtered_probs(logits / temperature, top_k, top_p), 1, generator=generator)
            out.append(int(nxt))
            idx = torch.cat([idx, nxt], dim=1)
        return bytes(out)


def gpt_train_flops(*, n_layer: int, d_model: int, seq_len: int, batch_size: int) -> int:
    """Training FLOPs of a micro-batch from the shapes: 6N per token for the N matmul weights
    (12 d^2 per block: qkv 3, proj 1, MLP 8; the d x vocab head; forward 2N, backward 4N) plus
    attention's 12 L T d per token (QK^T and AV, 2 T d each forward, twice that backward; the full
    T x T square, causal or not) - PaLM's "model FLOPs", so MFU excludes recomputation. Equal to
    PyTorch's FlopCounterMode on the math attention kernel (tests/train/test_flops.py)."""
    matmul = n_layer * 12 * d_model * d_model + d_model * VOCAB_SIZE
    per_token = 6 * matmul + 12 * n_layer * seq_len * d_model
    return batch_size * seq_len * per_token


def _filtered_probs(logits: torch.Tensor, top_k: int | None, top_p: float) -> torch.Tensor:
    """Softmax over the top-k logits, then over the nucleus holding top_p of that mass."""
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # Keep a byte while the mass before it is below top_p: the likeliest one always stays.
        drop = sorted_p.cumsum(dim=-1) - sorted_p >= top_p
        probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


@register_model("gpt")
def build_gpt(cfg, data_cfg=None) -> ByteGPT:
    # The model's context is the data's window: the position table is sized to max_seq_len, the
    # windows (data.seq_len) may be shorter.
    model = ByteGPT(cfg.n_layer, cfg.n_head, cfg.d_model, cfg.max_seq_len, cfg.dropout)
    if data_cfg is not None:
        model.example_len = data_cfg.seq_len
    return model
