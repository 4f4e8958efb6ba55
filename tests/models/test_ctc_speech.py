"""The CTC speech model: decoding, confidence and its calibration, edit distances, metrics, padding,
FLOPs by hand, DeepSpeed fp32/bf16."""

from __future__ import annotations

import math

import pytest
import torch

from e2e_dist.config import load_run_config
from e2e_dist.models.ctc_speech import CTCSpeech, edit_distance, greedy_decode, sequence_confidence
from e2e_dist.models.registry import build_model, model_kinds
from e2e_dist.train.flops import forward_flops, train_flops_per_batch
from tests.models import make_engine


def one_hot_logits(ids: list[list[int]], vocab: int) -> torch.Tensor:
    """(B, T, V) logits whose best class per frame is the given id."""
    return torch.nn.functional.one_hot(torch.tensor(ids), vocab).float() * 10.0


def test_greedy_decode_merges_repeats_and_drops_blanks():
    alphabet = "abc"  # ids: 0 blank, 1 a, 2 b, 3 c
    frames = [[1, 1, 0, 1, 2, 2, 0, 0, 3, 3],  # a a(repeat) _ a b b(repeat) _ _ c c -> "aabc"
              [0, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # all blank -> ""
              [2, 0, 2, 2, 0, 0, 3, 1, 1, 1]]  # b _ b b _ _ c a a a -> "bbca"; only 8 frames valid -> "bbca"
    logits = one_hot_logits(frames, 4)
    assert greedy_decode(logits.argmax(-1), torch.tensor([10, 10, 10]), alphabet) == ["aabc", "", "bbca"]
    # Frames past each clip's length are ignored.
    assert greedy_decode(logits.argmax(-1), torch.tensor([8, 3, 7]), alphabet) == ["aab", "", "bbc"]


def test_edit_distance_on_characters_and_words():
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance("", "abc") == 3 and edit_distance("abc", "") == 3 and edit_distance("", "") == 0
    assert edit_distance("flaw", "lawn") == 2
    assert edit_distance("three one four".split(), "three four".split()) == 1
    assert edit_distance("one two".split(), "two one".split()) == 2


class FixedOutput(CTCSpeech):
    """The real model's metric path, with chosen frame-level outputs instead of a network."""

    def __init__(self, alphabet: str, frames: list[list[int]], scale: float = 1.0):
        super().__init__(alphabet, conv_channels=4, conv_strides=[2], n_layer=1, n_head=1, d_model=8)
        self.frames, self.scale = frames, scale

    def log_probs(self, audio, audio_lens):
        logits = one_hot_logits(self.frames, self.vocab_size) * self.scale
        return logits.log_softmax(-1), torch.full((len(self.frames),), logits.shape[1])


def test_eval_sums_give_cer_and_wer():
    alphabet = " abc"  # ids: 0 blank, 1 space, 2 a, 3 b, 4 c
    # hyp 1: "ab c" vs ref "ab c" (exact); hyp 2: "a c" vs ref "ab cb" (2 char edits: b deleted twice;
    # words: "a" vs "ab" substituted, "c" vs "cb" substituted -> 2 word edits).
    model = FixedOutput(alphabet, [[2, 3, 1, 4, 0, 0], [2, 0, 1, 1, 4, 0]])
    targets = torch.tensor([[2, 3, 1, 4, 0], [2, 3, 1, 4, 3]])
    batch = {"audio": torch.zeros(2, 8), "audio_lens": torch.tensor([8, 8]), "targets": targets,
             "target_lens": torch.tensor([4, 5])}
    sums = {k: float(v) for k, v in model.eval_sums(batch).items()}
    assert set(sums) == set(model.eval_sum_keys())
    assert (sums["char_edits"], sums["chars"], sums["word_edits"], sums["words"], sums["count"]) == (2, 9, 2, 4, 2)
    m = model.summarize_eval(sums)
    assert m["val_cer"] == pytest.approx(2 / 9) and m["val_wer"] == pytest.approx(2 / 4)
    assert math.isfinite(m["val_loss"]) and m["val_loss"] >= 0


def test_confidence_is_the_transcripts_probability_and_warns_where_the_old_mean_did_not():
    """sequence_confidence = the CTC probability of the greedy transcript: every frame path that
    collapses to it, summed (here by enumerating all 3^6 paths). One frame where a character nearly
    won over blank, or over another character, pulls it down; the mean frame probability predict
    printed before barely moves."""
    import itertools

    logits = one_hot_logits([[0, 1, 1, 0, 0, 2]], 3)[0]  # "ab" with sure frames
    garbled = logits.clone()
    garbled[3, 2] = 9.6  # a blank between a and b nearly a 'b': maybe "abb"
    for lg, temperature in ((logits, 1.0), (garbled, 1.0), (garbled, 2.0)):
        lp = (lg / temperature).log_softmax(-1)
        total = 0.0
        for path in itertools.product(range(3), repeat=6):
            if greedy_decode(torch.tensor([path]), torch.tensor([6]), "ab") == ["ab"]:
                total += float(sum(lp[f, c] for f, c in enumerate(path)).exp())
        assert sequence_confidence(lg.log_softmax(-1), temperature) == pytest.approx(total, rel=1e-4)
    sure, unsure = sequence_confidence(logits.log_softmax(-1)), sequence_confidence(garbled.log_softmax(-1))
    assert sure > 0.99 and unsure < 0.7
    assert float(garbled.log_softmax(-1).max(-1).values.mean().exp()) > 0.85  # the old confidence
    assert sequence_confidence(garbled.log_softmax(-1), 2.0) < unsure < sequence_confidence(garbled.log_softmax(-1), 0.5)


@pytest.mark.parametrize("scale,right,direction", [(0.5, True, "sharpen"), (10.0, False, "soften")])
def test_evaluation_fits_the_confidence_temperature(scale, right, direction):
    """Right transcripts said unsurely: a temperature under 1; wrong ones said surely: over 1. It is a
    buffer: in the state dict (so in checkpoints and exports); a state dict from before has none (1.0)."""
    alphabet = " abc"
    model = FixedOutput(alphabet, [[2, 0, 3, 0, 4, 0], [4, 0, 4, 4, 0, 2]], scale=scale)
    targets = torch.tensor([[2, 3, 4], [4, 4, 2]]) if right else torch.tensor([[3, 3, 3], [2, 2, 2]])
    batch = {"audio": torch.zeros(2, 8), "audio_lens": torch.tensor([8, 8]), "targets": targets,
             "target_lens": torch.tensor([3, 3])}
    metrics = model.summarize_eval({k: float(v) for k, v in model.eval_sums(batch).items()})
    t = metrics["val_conf_temperature"]
    assert (t < 1.0) if direction == "sharpen" else (t > 1.0)
    assert float(model.state_dict()["confidence_temperature"]) == pytest.approx(t)
    old = {k: v for k, v in model.state_dict().items() if k != "confidence_temperature"}
    fresh = FixedOutput(alphabet, model.frames)
    fresh.confidence_temperature.fill_(3.0)
    fresh.load_state_dict(old, strict=True)
    assert float(fresh.confidence_temperature) == 1.0


def tiny_model(**kw) -> CTCSpeech:
    torch.manual_seed(0)
    args = dict(conv_channels=8, conv_strides=[4, 4], n_layer=2, n_head=2, d_model=16, example_samples=800)
    return CTCSpeech(" abcdefghijklmnopqrstuvwxyz'", **{**args, **kw})


def test_registry_shapes_and_loss():
    cfg = load_run_config("tiny-speech")
    model = build_model(cfg.model, cfg.data)
    assert "ctc-speech" in model_kinds() and isinstance(model, CTCSpeech) and model.input_kind == "waveform"
    assert model.example_batch(2)["audio"].shape == (2, int(cfg.data.sample_rate * cfg.data.max_audio_seconds))
    small = tiny_model()
    batch = small.example_batch(3)
    lp, frames = small.log_probs(batch["audio"], batch["audio_lens"])
    assert lp.shape == (3, 50, 29) and frames.tolist() == [50, 50, 50]  # 800 samples / 16 per frame
    assert torch.allclose(lp.exp().sum(-1), torch.ones(3, 50), atol=1e-4)
    loss = small(batch)
    loss.backward()
    assert loss.ndim == 0 and math.isfinite(loss.item())
    assert all(p.grad is not None for p in small.parameters())


def test_padding_and_loudness_do_not_change_the_valid_frames():
    model = tiny_model().eval()
    clip = torch.randn(1, 500)
    short = torch.nn.functional.pad(clip, (0, 300))  # padded to 800 samples
    long_ = torch.nn.functional.pad(clip * 7.0, (0, 1300))  # louder, padded to 1800 samples
    with torch.no_grad():
        a, fa = model.log_probs(short, torch.tensor([500]))
        b, fb = model.log_probs(long_, torch.tensor([500]))
    n = int(fa[0])
    assert n == int(fb[0]) == 31  # (500 + 4 - 8) // 4 + 1 = 125 -> (125 + 4 - 8) // 4 + 1 = 31
    assert torch.allclose(a[0, :n], b[0, :n], atol=1e-4)
    assert len(model.transcribe(short, torch.tensor([500]))) == 1


def test_flops_match_hand_count():
    B = 2
    model = CTCSpeech("ab", conv_channels=4, conv_strides=[2, 2], n_layer=1, n_head=2, d_model=8, example_samples=32)
    batch = model.example_batch(B)
    # Conv: 2 * Cin * Cout * K * Lout per clip. Kernel 2*stride, padding stride//2.
    conv1 = 2 * 1 * 4 * 4 * 16  # 32 samples -> (32 + 2 - 4) // 2 + 1 = 16 frames
    conv2 = 2 * 4 * 4 * 4 * 8  # 16 -> 8 frames: T = 8
    T, d, V = 8, 8, 3
    in_proj = 2 * 4 * d * T
    positions = 2 * d * 15 * T  # depthwise conv: one 15-tap filter per channel
    block_linear = 2 * T * (3 * d * d + d * d + 4 * d * d + 4 * d * d)  # qkv, proj, MLP up and down
    attention = 2 * (2 * T * T * d)  # QK^T and AV over all heads (head_dim * heads = d)
    head = 2 * d * V * T
    non_attn = conv1 + conv2 + in_proj + positions + block_linear + head
    assert forward_flops(model, batch) == B * (non_attn + attention)
    # Backward: 2x forward for convs and linears, but the first conv's input (raw audio) needs no
    # gradient (1x); attention backward is five matmuls of the forward's size (2.5x).
    assert train_flops_per_batch(model, batch) == B * (3 * non_attn - conv1 + attention + int(2.5 * attention))


@pytest.mark.parametrize("stage,precision", [(2, "fp32"), (2, "bf16"), (3, "bf16")])
def test_trains_under_deepspeed_zero(monkeypatch, stage, precision):
    cfg = load_run_config("tiny-speech", [
        f"deepspeed.zero_stage={stage}", f"trainer.precision={precision}", "trainer.lr=0.01",
        "model.conv_channels=8", "model.conv_strides=[4, 4]", "model.d_model=16", "model.n_layer=1",
        "data.max_audio_seconds=0.1"])
    engine, model = make_engine(cfg, monkeypatch)
    batch = model.example_batch(4)
    losses = []
    for _ in range(6):
        loss = engine(batch)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    assert all(map(math.isfinite, losses)) and losses[-1] < losses[0]
    engine.eval()
    with torch.no_grad():
        metrics = model.summarize_eval({k: float(v) for k, v in model.eval_sums(batch).items()})
    assert metrics["val_cer"] >= 0 and metrics["val_wer"] >= 0 and math.isfinite(metrics["val_loss"])


def test_mel_front_end_scores_a_clip_alike_alone_and_padded_and_builds_on_meta():
    """The log-mel features are normalized over the clip's own frames: a clip padded in a batch (as
    in training) and alone (as in predict) give the same log-probabilities (all but the last frames,
    where the STFT and convs see the clip's end, to 1e-3). Built on the meta device (export's
    check), its fixed filterbank is still real; it has no learned weights of its own beyond the convs."""
    torch.manual_seed(0)
    model = CTCSpeech(" abc", 16, [4, 4, 4, 2], 1, 2, 16, example_samples=16000, front_end="mel",
                      sample_rate=8000).eval()
    clip = torch.randn(1, 9000) * 0.1
    with torch.no_grad():
        alone, frames = model.log_probs(clip, torch.tensor([9000]))
        padded, frames_padded = model.log_probs(torch.cat([clip, torch.zeros(1, 7000)], 1), torch.tensor([9000]))
    n = int(frames[0])
    assert int(frames_padded[0]) == n == 29
    assert torch.allclose(alone[0, : n - 8], padded[0, : n - 8], atol=1e-3)
    with torch.device("meta"):
        meta = CTCSpeech(" abc", 16, [4], 1, 2, 16, front_end="mel", sample_rate=8000)
    assert meta.front.filterbank.device.type == "cpu" and meta.front.conv1.weight.device.type == "meta"
    assert not any("filterbank" in k or "window" in k for k in model.state_dict())
    with pytest.raises(ValueError, match="unknown front_end 'x'"):
        CTCSpeech(" abc", front_end="x")
