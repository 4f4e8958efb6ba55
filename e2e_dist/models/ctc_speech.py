"""Waveform -> characters with CTC: a front end, transformer encoder, linear head.

Front end `conv`: raw samples (per-utterance normalized) -> convs with strides `conv_strides`
(kernel 2*stride, GELU; their product is the samples per encoder frame) -> LayerNorm. Front end
`mel`: log-mel energies computed inside the model (25 ms windows every 10 ms, fixed filterbank, no
learned weights: still one network from samples to characters), normalized per clip -> two
stride-2 convs (40 ms frames) -> LayerNorm. Then linear to d_model ->
depthwise-conv relative positions -> pre-norm bidirectional transformer blocks
(`scaled_dot_product_attention` with a key-padding mask) -> linear head over blank (index 0) +
the alphabet's characters (alphabet[i] is class i + 1). Greedy CTC decoding: best class per
frame, merge repeats, drop blanks; its confidence: the transcript's CTC probability at the
temperature each evaluation fits (`sequence_confidence`, `confidence_temperature`).

Batch: {"audio": float (B, N) zero-padded samples, "audio_lens": long (B,) valid samples,
"targets": long (B, L) character ids padded with 0, "target_lens": long (B,)}.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from e2e_dist.models.base import Batch, E2EModel
from e2e_dist.models.classifier import TEMPERATURES, temperature_from_sums
from e2e_dist.models.registry import register_model

BLANK = 0


# ------------------------------------------------------------------------------------ decoding
def greedy_decode(ids: torch.Tensor, lengths: torch.Tensor, alphabet: str) -> list[str]:
    """Best-path CTC decoding of (B, T) class ids: merge repeated ids, drop blanks, map to text."""
    out = []
    for row, n in zip(ids.tolist(), lengths.tolist()):
        chars, prev = [], BLANK
        for i in row[: int(n)]:
            if i != prev and i != BLANK:
                chars.append(alphabet[i - 1])
            prev = i
        out.append("".join(chars))
    return out


def greedy_emissions(lp: torch.Tensor) -> list[tuple[int, int, int]]:
    """One clip's valid (T, V) log-probs -> (class id, first frame, last frame) of each character the
    best path emits (a run of one non-blank class is one character, as greedy_decode reads it)."""
    out: list[tuple[int, int, int]] = []
    prev = BLANK
    for f, i in enumerate(lp.argmax(dim=-1).tolist()):
        if i != BLANK and i == prev:
            out[-1] = (i, out[-1][1], f)
        elif i != BLANK:
            out.append((i, f, f))
        prev = i
    return out


def greedy_targets(lp: torch.Tensor, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T, V) log-probs with (B,) valid frames -> the greedy transcripts as CTC targets: padded
    ids (B, L) and lengths (B,), on lp's device."""
    hyps = [[i for i, _, _ in greedy_emissions(row[: int(n)])] for row, n in zip(lp, frames.tolist())]
    ids = torch.zeros(len(hyps), max(1, max(map(len, hyps))), dtype=torch.long)
    for b, h in enumerate(hyps):
        ids[b, : len(h)] = torch.tensor(h, dtype=torch.long)
    return ids.to(lp.device), torch.tensor([len(h) for h in hyps], device=lp.device)


def batch_confidence(lp: torch.Tensor, frames: torch.Tensor, temperature: float = 1.0,
                     targets: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """(B, T, V) log-probs with (B,) valid frames -> (B,) sequence_confidence of each clip
    (targets: `greedy_targets` of lp, when already at hand)."""
    ids, lens = targets if targets is not None else greedy_targets(lp, frames)
    # log_softmax(lp / T) = log_softmax(logits / T): the log-probs carry the logits up to a constant.
    scaled = (lp.detach().float() / temperature).log_softmax(dim=-1)
    nll = F.ctc_loss(scaled.transpose(0, 1), ids, frames.to(lp.device), lens, blank=BLANK, reduction="none",
                     zero_infinity=False)
    return torch.exp(-nll)


def sequence_confidence(lp: torch.Tensor, temperature: float = 1.0) -> float:
    """How sure the model is of one clip's greedy transcript, from its valid (T, V) log-probs: the
    probability CTC gives that transcript (every alignment of it summed), logits divided by the
    temperature. A frame where a character nearly won over blank (a word maybe dropped) or over
    another character lowers it; the mean frame probability predict printed before stayed ~0.9 on
    garbled clips, most frames being sure blanks. Ranking held-out clips by it put half their
    character errors in the least sure tenth (BENCHMARKS.md section 12, issue 33). No frames: 1.0."""
    if lp.shape[0] == 0:
        return 1.0
    return float(batch_confidence(lp[None], torch.tensor([lp.shape[0]]), temperature)[0])


def ids_to_text(ids: torch.Tensor, lengths: torch.Tensor, alphabet: str) -> list[str]:
    """Padded target ids (B, L) -> reference strings (no CTC merging: targets are plain text)."""
    return ["".join(alphabet[i - 1] for i in row[: int(n)]) for row, n in zip(ids.tolist(), lengths.tolist())]


def edit_distance(a: Sequence, b: Sequence) -> int:
    """Levenshtein distance (substitutions, insertions, deletions all cost 1) of two sequences."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


# ------------------------------------------------------------------------------------ modules
class ConvFrontEnd(nn.Module):
    """Strided convs + GELU over raw samples: (B, N) -> (B, T, channels), T ~ N / prod(strides).

    No normalization between the convs: a per-frame LayerNorm there would erase each frame's
    loudness (speech vs. silence), which measurably slowed learning; one LayerNorm on the
    output (wav2vec 2.0's layout) keeps the encoder's inputs well scaled.
    """

    def __init__(self, channels: int, strides: Sequence[int]):
        super().__init__()
        self.strides = list(strides)
        self.convs = nn.ModuleList()
        c_in = 1
        for s in self.strides:
            # kaiming-normal weights: CTCSpeech.init_module
            self.convs.append(nn.Conv1d(c_in, channels, kernel_size=2 * s, stride=s, padding=s // 2))
            c_in = channels
        self.norm = nn.LayerNorm(channels)

    def out_lengths(self, n: torch.Tensor) -> torch.Tensor:
        """Frames each conv produces from n valid samples (the conv length formula, layer by layer)."""
        for conv in self.convs:
            k, s, p = conv.kernel_size[0], conv.stride[0], conv.padding[0]
            n = torch.div(n + 2 * p - k, s, rounding_mode="floor") + 1
        return n.clamp_min(1)

    def forward(self, x: torch.Tensor, lens: torch.Tensor | None = None) -> torch.Tensor:
        x = x.unsqueeze(1)
        for conv in self.convs:
            x = F.gelu(conv(x))
        return self.norm(x.transpose(1, 2))


class MelFrontEnd(nn.Module):
    """Log-mel energies (fixed STFT + triangular mel filterbank) -> two stride-2 convs: (B, N) -> (B, T, channels).

    Measured against `conv` on the spoken digits (single process, same model and optimizer): CTC
    left its all-blank plateau at ~300 steps instead of > 400, and a step cost a quarter of the time
    (a 2-s clip is 200 STFT frames instead of 16,000 samples through the first conv).
    """

    def __init__(self, channels: int, sample_rate: int, n_mels: int = 40):
        super().__init__()
        self.hop, self.win = sample_rate // 100, sample_rate * 25 // 1000
        self.n_fft = 1 << (self.win - 1).bit_length()
        freqs = np.linspace(0.0, sample_rate / 2, self.n_fft // 2 + 1)
        top = 2595.0 * np.log10(1.0 + sample_rate / 2 / 700.0)  # the Nyquist frequency in mel
        edges = 700.0 * (10 ** (np.linspace(0.0, top, n_mels + 2) / 2595.0) - 1)
        lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
        bank = np.clip(np.minimum((freqs - lo) / (mid - lo), (hi - freqs) / (hi - mid)), 0.0, None)
        window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(self.win) / self.win)  # periodic Hann
        # Fixed buffers computed with numpy (a model built on the meta device, as export checks
        # names, still gets real ones), not saved: nothing to learn, shard or export.
        self.register_buffer("filterbank", torch.from_numpy(bank.astype(np.float32)), persistent=False)
        self.register_buffer("window", torch.from_numpy(window.astype(np.float32)), persistent=False)
        self.conv1 = nn.Conv1d(n_mels, channels, 3, stride=2, padding=1)
        self.conv2 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        self.norm = nn.LayerNorm(channels)

    def out_lengths(self, n: torch.Tensor) -> torch.Tensor:
        frames = torch.div(n, self.hop, rounding_mode="floor") + 1  # centred STFT frames
        for _ in range(2):
            frames = torch.div(frames - 1, 2, rounding_mode="floor") + 1
        return frames.clamp_min(1)

    def forward(self, x: torch.Tensor, lens: torch.Tensor | None = None) -> torch.Tensor:
        # fp32 whatever the engine's dtype (a bf16 engine casts buffers too): STFT and logs need the range
        # .to(x.device): the buffers are real even on a model built on 'meta' (see __init__)
        spec = torch.stft(x.float(), self.n_fft, self.hop, self.win, self.window.to(x.device, torch.float32),
                          center=True, return_complex=True).abs() ** 2
        logmel = torch.log(self.filterbank.to(x.device, torch.float32) @ spec + 1e-6)  # (B, n_mels, frames)
        # Normalized over the clip's own frames only, padding then zeroed: a clip scores the same
        # alone (predict) as padded in a batch (training).
        n = logmel.shape[2]
        frames = torch.div(lens, self.hop, rounding_mode="floor") + 1 if lens is not None else torch.full(
            (logmel.shape[0],), n, device=logmel.device)
        valid = (torch.arange(n, device=logmel.device)[None, :] < frames[:, None]).float()[:, None, :]
        count = (valid.sum(dim=2, keepdim=True) * logmel.shape[1]).clamp_min(1.0)
        mean = (logmel * valid).sum(dim=(1, 2), keepdim=True) / count
        var = (((logmel - mean) * valid) ** 2).sum(dim=(1, 2), keepdim=True) / count
        logmel = (logmel - mean) * valid / torch.sqrt(var + 1e-5)
        y = F.gelu(self.conv2(F.gelu(self.conv1(logmel.to(self.conv1.weight.dtype)))))
        return self.norm(y.transpose(1, 2))


class ConvPositions(nn.Module):
    """Relative positions from a depthwise conv over frames, added to the input (as in wav2vec 2.0).

    Gives every frame its neighbours' context (15 frames) before attention, which shortened the
    CTC "all blanks" plateau several-fold versus fixed sinusoids in our tests, and needs no table,
    so clips of any length work at predict time.
    """

    def __init__(self, d_model: int, kernel: int = 15):
        super().__init__()
        self.conv = nn.Conv1d(d_model, d_model, kernel, padding=kernel // 2, groups=d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.gelu(self.conv(x.transpose(1, 2))).transpose(1, 2)


class EncoderBlock(nn.Module):
    """Pre-norm transformer block with bidirectional attention over the valid frames."""

    def __init__(self, d_model: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model, bias=False), nn.GELU(),
                                 nn.Linear(4 * d_model, d_model, bias=False))

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.mlp(self.ln2(x))


def normalize_waveform(audio: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit variance over each clip's valid samples; padding stays 0 (loudness-invariant)."""
    mask = (torch.arange(audio.shape[1], device=audio.device)[None, :] < lens[:, None]).to(torch.float32)
    x = audio.float()
    n = mask.sum(dim=1, keepdim=True).clamp_min(1.0)
    mean = (x * mask).sum(dim=1, keepdim=True) / n
    var = (((x - mean) * mask) ** 2).sum(dim=1, keepdim=True) / n
    return (x - mean) * mask / torch.sqrt(var + 1e-5)


class CTCSpeech(E2EModel):
    input_kind = "waveform"
    unit_name = "samples"

    def __init__(self, alphabet: str, conv_channels: int = 64, conv_strides: Sequence[int] = (5, 4, 4, 2),
                 n_layer: int = 2, n_head: int = 2, d_model: int = 64, example_samples: int = 32000,
                 front_end: str = "conv", sample_rate: int = 16000):
        super().__init__()
        if len(set(alphabet)) != len(alphabet) or not alphabet:
            raise ValueError(f"alphabet {alphabet!r} must be non-empty without repeated characters")
        self.alphabet = alphabet
        self.example_samples = example_samples  # clip length used for FLOP counting: the data's
        if front_end == "conv":
            self.front: nn.Module = ConvFrontEnd(conv_channels, conv_strides)
        elif front_end == "mel":
            self.front = MelFrontEnd(conv_channels, sample_rate)
        else:
            raise ValueError(f"unknown front_end {front_end!r} (conv, mel)")
        self.in_proj = nn.Linear(conv_channels, d_model)
        self.pos = ConvPositions(d_model)
        self.blocks_ = nn.ModuleList(EncoderBlock(d_model, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, len(alphabet) + 1)
        # Divides the logits for predict's confidence (1: uncalibrated); fitted by `summarize_eval`.
        self.register_buffer("confidence_temperature", torch.ones(()))
        self.init_weights()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # Checkpoints and exports from before calibration have no temperature: they are uncalibrated.
        state_dict.setdefault(prefix + "confidence_temperature", torch.ones(()))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def optional_state(self) -> list[str]:
        """State-dict keys a checkpoint may lack (their defaults fill in): export does not refuse it."""
        return ["confidence_temperature"]

    def init_module(self, name: str, module: nn.Module) -> None:
        if name.startswith("front.convs."):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        elif name.startswith("blocks_") and name.endswith(("proj", "mlp.2")):
            nn.init.normal_(module.weight, mean=0.0, std=0.02 / math.sqrt(2 * len(self.blocks_)))

    @property
    def vocab_size(self) -> int:
        return len(self.alphabet) + 1

    def log_probs(self, audio: torch.Tensor, audio_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, N) samples -> ((B, T, V) float32 log-probabilities, (B,) valid frames)."""
        x = normalize_waveform(audio, audio_lens).to(self.head.weight.dtype)
        x = self.in_proj(self.front(x, audio_lens))
        T = x.shape[1]
        frames = self.front.out_lengths(audio_lens).clamp_max(T)
        valid = torch.arange(T, device=x.device)[None, :] < frames[:, None]
        # Zero the padding frames, so the position conv sees the same zeros as at a clip's true end:
        # outputs on valid frames do not depend on how much padding the batch added.
        x = self.pos(x * valid[:, :, None].to(x.dtype))
        key_mask = valid[:, None, None, :]
        for block in self.blocks_:
            x = self.run_block(block, x, key_mask)
        return self.head(self.ln_f(x)).float().log_softmax(dim=-1), frames

    def _ctc(self, lp: torch.Tensor, frames: torch.Tensor, batch: Batch, reduction: str) -> torch.Tensor:
        # zero_infinity: a transcript too long for its clip's frames is skipped, not an inf loss.
        return F.ctc_loss(lp.transpose(0, 1), batch["targets"], frames, batch["target_lens"], blank=BLANK,
                          reduction=reduction, zero_infinity=True)

    def forward(self, batch: Batch) -> torch.Tensor:
        lp, frames = self.log_probs(batch["audio"], batch["audio_lens"])
        return self._ctc(lp, frames, batch, "mean")  # per target character, averaged over the batch

    def train_flops(self, batch_size: int) -> int:
        """As counted on the whole model, with the backward started at the log-probs: CTC's loss
        has no 'meta' kernel, and its dynamic programme holds no matmul FLOPs to count."""
        from e2e_dist.train.flops import train_flops_per_batch

        device = next(self.parameters()).device
        return train_flops_per_batch(self, self.example_batch(batch_size, device),
                                     loss_of=lambda m, b: m.log_probs(b["audio"], b["audio_lens"])[0].sum())

    def eval_sums(self, batch: Batch) -> dict[str, torch.Tensor]:
        lp, frames = self.log_probs(batch["audio"], batch["audio_lens"])
        per_utt = self._ctc(lp, frames, batch, "none") / batch["target_lens"].clamp_min(1).float()
        hyps = greedy_decode(lp.argmax(dim=-1), frames, self.alphabet)
        refs = ids_to_text(batch["targets"], batch["target_lens"], self.alphabet)
        sums = {
            "char_edits": sum(edit_distance(h, r) for h, r in zip(hyps, refs)),
            "chars": sum(len(r) for r in refs),
            "word_edits": sum(edit_distance(h.split(), r.split()) for h, r in zip(hyps, refs)),
            "words": sum(len(r.split()) for r in refs),
            "count": len(refs),
        }
        out = {k: torch.tensor(float(v), device=lp.device) for k, v in sums.items()}
        out["loss_sum"] = per_utt.sum().detach()
        # Calibration: how well the confidence at each temperature predicts an exact transcript
        # (binary cross-entropy, summed: ranks and batches add up as for the loss).
        exact = torch.tensor([float(h == r) for h, r in zip(hyps, refs)], device=lp.device)
        targets = greedy_targets(lp, frames)
        for i, t in enumerate(TEMPERATURES):
            c = batch_confidence(lp.detach(), frames, t, targets).clamp(1e-6, 1 - 1e-6)
            out[f"conf_bce_t{i}"] = -(exact * c.log() + (1 - exact) * (1 - c).log()).sum()
        return out

    def eval_sum_keys(self) -> list[str]:
        return ["loss_sum", "count", "char_edits", "chars", "word_edits", "words",
                *(f"conf_bce_t{i}" for i in range(len(TEMPERATURES)))]

    def summarize_eval(self, sums: dict[str, float]) -> dict[str, float]:
        """val_loss, val_cer, val_wer; and (fitting `confidence_temperature` on these sums)
        val_conf_temperature and val_conf_bce, the confidence's cross-entropy at it."""
        n = max(sums["count"], 1.0)
        metrics = {"val_loss": sums["loss_sum"] / n, "val_cer": sums["char_edits"] / max(sums["chars"], 1.0),
                   "val_wer": sums["word_edits"] / max(sums["words"], 1.0)}
        fitted = temperature_from_sums(sums, "conf_bce_t", self.confidence_temperature)
        if fitted is not None:
            metrics |= {"val_conf_temperature": fitted[0], "val_conf_bce": fitted[1]}
        return metrics

    def units_in(self, batch: Batch) -> int:
        return int(batch["audio"].shape[0])

    def example_batch(self, batch_size: int, device: torch.device | str = "cpu") -> Batch:
        n = self.example_samples
        frames = int(self.front.out_lengths(torch.tensor([n]))[0])
        L = max(1, min(frames // 4, 32))
        return {"audio": torch.randn(batch_size, n, device=device),
                "audio_lens": torch.full((batch_size,), n, dtype=torch.long, device=device),
                "targets": torch.randint(1, self.vocab_size, (batch_size, L), device=device),
                "target_lens": torch.full((batch_size,), L, dtype=torch.long, device=device)}

    def blocks(self) -> list[nn.Module]:
        return list(self.blocks_)

    @torch.no_grad()
    def transcribe(self, audio: torch.Tensor, audio_lens: torch.Tensor) -> list[str]:
        """Greedy transcripts of a batch of clips."""
        lp, frames = self.log_probs(audio, audio_lens)
        return greedy_decode(lp.argmax(dim=-1), frames, self.alphabet)


@register_model("ctc-speech")
def build_ctc_speech(cfg, data_cfg=None) -> CTCSpeech:
    samples = int(data_cfg.sample_rate * data_cfg.max_audio_seconds) if data_cfg is not None else 32000
    return CTCSpeech(cfg.alphabet, cfg.conv_channels, list(cfg.conv_strides), cfg.n_layer, cfg.n_head, cfg.d_model,
                     example_samples=samples, front_end=cfg.front_end,
                     sample_rate=data_cfg.sample_rate if data_cfg is not None else 16000)
