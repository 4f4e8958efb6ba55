"""Speech: the eSpeak NG corpus generator, audio decoding, manifests through Ray Data (bad items,
strict mode, S3), the built-in spoken-digits source and `predict` on an audio file.

Test clips are sines whose frequency encodes the clip, so a decoded row can be traced to its file.
"""

from __future__ import annotations

import io
import json
import wave

import numpy as np
import pytest
import soundfile as sf
import torch

from e2e_dist.config import CTCSpeechConfig, DataConfig, StorageConfig, load_run_config
from e2e_dist.data import speech, synth_speech
from e2e_dist.data.common import DataError
from e2e_dist.data.registry import build_data
from e2e_dist.errors import UserError

ALPHABET = CTCSpeechConfig().alphabet
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def sine(freq: float, seconds: float, sr: int) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def wav_bytes(x: np.ndarray, sr: int, fmt: str = "WAV") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, sr, format=fmt, subtype="PCM_16")
    return buf.getvalue()


def dominant_hz(x: np.ndarray, sr: int) -> float:
    spectrum = np.abs(np.fft.rfft(x))
    return float(np.fft.rfftfreq(len(x), 1 / sr)[spectrum.argmax()])


# ------------------------------------------------------------------------------ generator
def test_corpus_generator_writes_playable_wavs_and_a_manifest(tmp_path):
    manifest = synth_speech.make_speech_corpus(tmp_path / "c", n_utterances=6, seed=3)
    lines = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert len(lines) == 6 and len({(r["voice"], r["speed"], r["pitch"]) for r in lines}) > 1
    for r in lines:
        assert 1 <= len(r["text"].split()) <= 3 and all(w in WORDS for w in r["text"].split())
        x, sr = sf.read(manifest.parent / r["audio"], dtype="float32")
        assert sr == 22050 and 0.3 < len(x) / sr < 3.0 and np.abs(x).max() <= 1.0
        # Speech, not just the added noise: the loudest 50 ms is far above the quietest.
        frames = np.sqrt(np.mean(x[: len(x) // 1102 * 1102].reshape(-1, 1102) ** 2, axis=1))
        assert frames.max() > 5 * frames.min()
    # Same seed, same corpus (everything random is planned from one generator).
    again = synth_speech.make_speech_corpus(tmp_path / "d", n_utterances=6, seed=3)
    assert again.read_text() == manifest.read_text()
    assert (again.parent / lines[0]["audio"]).read_bytes() == (manifest.parent / lines[0]["audio"]).read_bytes()
    with pytest.raises(synth_speech.SynthesisError, match="not empty"):
        synth_speech.make_speech_corpus(tmp_path / "c", n_utterances=2)
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary folders left behind


def test_no_clip_of_a_corpus_is_longer_than_its_limit(tmp_path):
    """Three words at 80 wpm run past 1.5 s: spoken faster until they fit, and the manifest says so."""
    manifest = synth_speech.make_speech_corpus(tmp_path / "c", n_utterances=4, seed=5, min_words=3, max_words=3,
                                               speeds=(80, 80), max_seconds=1.5)
    lines = [json.loads(line) for line in manifest.read_text().splitlines()]
    for r in lines:
        info = sf.info(manifest.parent / r["audio"])
        assert info.duration <= 1.5, r
    assert all(r["speed"] > 80 for r in lines)  # every one had to speed up


def test_augmenting_never_lengthens_a_clip_already_over_the_limit():
    from e2e_dist.data.speech_augment import augment_clip

    x = np.random.default_rng(0).normal(0, 0.1, 2100).astype(np.float32)  # over a limit of 2000 samples
    for seed in range(20):
        assert len(augment_clip(x, np.random.default_rng(seed), 1000, max_samples=2000)) <= len(x)


def test_missing_espeak_is_a_one_line_user_error(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(UserError, match="espeak-ng not found.*apt-get install espeak-ng"):
        synth_speech.make_speech_corpus(tmp_path / "x", n_utterances=1)


# ------------------------------------------------------------------------------ decoding
def test_decode_audio_resamples_mixes_down_and_reads_flac():
    x = sine(440.0, 1.0, 22050)
    y = speech.decode_audio(wav_bytes(x, 22050), 8000)
    assert y.dtype == np.float32 and abs(len(y) - 8000) <= 1 and abs(dominant_hz(y, 8000) - 440.0) < 2
    stereo = speech.decode_audio(wav_bytes(np.stack([x, x], axis=1), 22050), 22050)
    assert stereo.ndim == 1 and np.allclose(stereo, x, atol=1e-3)
    flac = speech.decode_audio(wav_bytes(sine(300.0, 0.5, 16000), 16000, fmt="FLAC"), 16000)
    assert len(flac) == 8000 and abs(dominant_hz(flac, 16000) - 300.0) < 3


def test_truncated_and_garbage_audio_are_rejected():
    good = wav_bytes(sine(440.0, 0.5, 16000), 16000)
    assert speech.wav_truncation(good) is None
    half = good[: len(good) // 2]
    assert "truncated WAV" in speech.wav_truncation(half)
    with pytest.raises(ValueError, match="truncated WAV"):
        speech.decode_audio(half, 16000)
    with pytest.raises(ValueError):
        speech.decode_audio(b"RIFF....WAVEnonsense", 16000)
    with pytest.raises(ValueError):
        speech.decode_audio(b"\x00" * 100, 16000)


def test_transcripts_are_normalized_and_encoded():
    text, dropped = speech.normalize_transcript("  Three,  ONE four!", ALPHABET)
    assert text == "three one four" and dropped == {",", "!"}
    ids = speech.encode_transcript("ab c", ALPHABET)
    assert ids == [ALPHABET.index("a") + 1, ALPHABET.index("b") + 1, ALPHABET.index(" ") + 1, ALPHABET.index("c") + 1]


# ------------------------------------------------------------------------------ manifests via Ray
FREQS = [200.0 + 40 * i for i in range(10)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """10 good clips (WAV 16 kHz, WAV 22.05 kHz and FLAC, 0.3-1.2 s) + a truncated WAV, a missing
    file, a malformed line, and a transcript with no alphabet character."""
    root = tmp_path_factory.mktemp("speech")
    (root / "audio").mkdir()
    lines = []
    for i, f in enumerate(FREQS):
        sr, fmt, ext = [(16000, "WAV", "wav"), (22050, "WAV", "wav"), (16000, "FLAC", "flac")][i % 3]
        (root / "audio" / f"c{i}.{ext}").write_bytes(wav_bytes(sine(f, 0.3 + 0.1 * i, sr), sr, fmt))
        lines.append({"audio": f"audio/c{i}.{ext}", "text": WORDS[i]})
    (root / "audio" / "cut.wav").write_bytes(wav_bytes(sine(999.0, 1.0, 16000), 16000)[:9000])
    lines.append({"audio": "audio/cut.wav", "text": "cut"})
    lines.append({"audio": "audio/gone.wav", "text": "gone"})
    no_chars = json.dumps({"audio": "audio/c0.wav", "text": "?!"})
    text = "\n".join(json.dumps(r) for r in lines) + "\n{not json\n" + no_chars
    (root / "manifest.jsonl").write_text(text + "\n")
    return root


def scfg(manifest, **kw) -> DataConfig:
    return DataConfig(**{"source": "speech-manifest", "paths": [str(manifest)], "sample_rate": 8000,
                         "max_audio_seconds": 1.0, "val_fraction": 0.3, **kw})


def all_rows(bundle) -> list[dict]:
    out = []
    for split in (bundle.train, bundle.val):
        for b in split.dataset().iter_batches(batch_size=4, batch_format="numpy"):
            t = bundle.collate({k: v[b["valid"]] for k, v in b.items()})
            for j in range(len(t["audio"])):
                out.append({k: v[j] for k, v in t.items()})
    return out


def test_manifest_through_ray_skips_bad_items_with_messages(ray_local, corpus, caplog):
    with caplog.at_level("WARNING", logger="e2e_dist.data"):
        bundle = build_data(scfg(corpus / "manifest.jsonl"))
    log = caplog.text
    assert "gone.wav" in log and "manifest.jsonl:12" in log  # missing file, named with its manifest line
    assert "manifest.jsonl:13" in log and "manifest.jsonl:14" in log  # malformed line; no usable characters
    assert bundle.stats["train_rows"] + bundle.stats["val_rows"] == 11  # 10 good + the truncated one (found later)
    rows = all_rows(bundle)
    assert len(rows) == 10  # the truncated WAV was skipped while decoding
    seen = set()
    for r in rows:
        n = int(r["audio_lens"])
        assert r["audio"].shape == (8000,) and not r["audio"][n:].any()  # zero padding after the valid part
        i = int(np.argmin([abs(dominant_hz(r["audio"][:n].numpy(), 8000) - f) for f in FREQS]))
        assert abs(n - round((0.3 + 0.1 * i) * 8000)) <= 1 or (n == 8000 and 0.3 + 0.1 * i > 1.0)  # cut at 1 s
        text = "".join(ALPHABET[k - 1] for k in r["targets"][: int(r["target_lens"])].tolist())
        assert text == WORDS[i] and not r["targets"][int(r["target_lens"]):].any()
        seen.add(i)
    assert seen == set(range(10))


def test_decode_clips_warns_about_the_truncated_file(corpus, caplog):
    batch = {"uri": np.array([str(corpus / "audio" / "cut.wav"), str(corpus / "audio" / "c0.wav")], dtype=object),
             "size": np.array([9000, (corpus / "audio" / "c0.wav").stat().st_size]),
             "text": np.array(["cut", "zero"], dtype=object)}
    kw = dict(sample_rate=8000, max_samples=8000, max_chars=5, alphabet=ALPHABET, storage=None)
    with caplog.at_level("WARNING", logger="e2e_dist.data"):
        out = speech.decode_clips(batch, strict=False, **kw)
    assert "cut.wav" in caplog.text and "truncated WAV" in caplog.text
    assert out["valid"].tolist() == [False, True] and len(out["audio"]) == 2  # the bad clip keeps its row
    with pytest.raises(DataError, match="cut.wav: truncated WAV"):
        speech.decode_clips(batch, strict=True, **kw)


def test_strict_mode_stops_on_the_first_bad_item(ray_local, corpus, tmp_path):
    with pytest.raises(DataError, match=r"manifest.jsonl:13: not a JSON object") as e:
        build_data(scfg(corpus / "manifest.jsonl", strict=True))
    assert "\n" not in str(e.value)
    lines = (corpus / "manifest.jsonl").read_text().splitlines()
    absolute = [line.replace('"audio/', f'"{corpus}/audio/') for line in lines]
    (tmp_path / "missing.jsonl").write_text("\n".join(absolute[:10] + absolute[11:12]))  # good + gone.wav
    with pytest.raises(DataError, match=r"missing.jsonl:11: audio file missing or empty: .*gone.wav"):
        build_data(scfg(tmp_path / "missing.jsonl", strict=True))
    # Only the truncated file is wrong: the driver-side scan decodes everything and names it.
    (tmp_path / "cut.jsonl").write_text("\n".join(absolute[:11]))
    with pytest.raises(DataError, match="cut.wav: truncated WAV") as e:
        build_data(scfg(tmp_path / "cut.jsonl", strict=True))
    assert "\n" not in str(e.value)


def test_s3_manifest_with_relative_paths(ray_local, s3_server, s3_bucket, corpus, caplog):
    import boto3

    client = boto3.client("s3", endpoint_url=s3_server.url, region_name="us-east-1")
    bucket = s3_bucket.removeprefix("s3://")
    for i in (0, 1, 2, 3):
        name = f"c{i}." + ("flac" if i % 3 == 2 else "wav")
        client.put_object(Bucket=bucket, Key=f"ds/audio/{name}", Body=(corpus / "audio" / name).read_bytes())
    lines = [{"audio": f"audio/c{i}." + ("flac" if i % 3 == 2 else "wav"), "text": WORDS[i]} for i in range(5)]
    client.put_object(Bucket=bucket, Key="ds/manifest.jsonl", Body="\n".join(map(json.dumps, lines)).encode())
    with caplog.at_level("WARNING", logger="e2e_dist.data"):
        bundle = build_data(scfg(f"{s3_bucket}/ds/manifest.jsonl", val_fraction=0.2),
                            storage_cfg=StorageConfig(endpoint_url=s3_server.url))
    assert f"{s3_bucket}/ds/audio/c4.wav" in caplog.text  # listed in the manifest, not in the bucket
    texts = sorted("".join(ALPHABET[k - 1] for k in r["targets"][: int(r["target_lens"])].tolist())
                   for r in all_rows(bundle))
    assert texts == sorted(WORDS[:4])


def test_spoken_digits_source_generates_once_and_reads_through_the_manifest(ray_local, tmp_path, monkeypatch):
    monkeypatch.setattr(speech, "SPOKEN_DIGITS_UTTERANCES", 12)
    cfg = load_run_config("tiny-speech", [f"data.paths=[{tmp_path / 'sd'}]", "data.val_fraction=0.2"])
    bundle = build_data(cfg.data, model_cfg=cfg.model)
    n_train = bundle.stats["train_clips"]
    assert n_train + bundle.stats["val_rows"] == 12 and bundle.stats["train_rows"] == cfg.data.variants * n_train
    manifest = tmp_path / "sd" / "manifest.jsonl"
    before = manifest.stat().st_mtime_ns
    build_data(cfg.data, model_cfg=cfg.model)
    assert manifest.stat().st_mtime_ns == before  # generated once
    texts = [json.loads(line)["text"] for line in manifest.read_text().splitlines()]
    rows = all_rows(bundle)
    assert len(rows) == cfg.data.variants * n_train + bundle.stats["val_rows"]
    for r in rows:
        assert r["audio"].shape == (int(cfg.data.sample_rate * cfg.data.max_audio_seconds),)
        decoded = "".join(ALPHABET[k - 1] for k in r["targets"][: int(r["target_lens"])].tolist())
        assert decoded in texts
    # The copies of one clip are augmented differently (speed, silence, volume, noise)
    copies = rows[: cfg.data.variants]
    assert len({int(r["audio_lens"]) for r in copies} | {float(r["audio"].abs().max()) for r in copies}) > 1
    # Only training voices speak in the built-in corpus: eSpeak's training variants and Flite's voices
    # whose speakers Festival (held out) does not have
    train_variants, held = speech_voices(cfg)
    lines = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert {r["voice"].split("+")[1] for r in lines if r["engine"] == "espeak-ng"} <= train_variants
    assert {r["voice"] for r in lines if r["engine"] != "espeak-ng"} <= {"flite:awb", "flite:rms"}


def speech_voices(cfg) -> tuple[set[str], set[str]]:
    from e2e_dist.data.synth_speech import split_variants

    train, held = split_variants(cfg.data.held_out, cfg.data.seed)
    return {v.lstrip("+") for v in train}, {v.lstrip("+") for v in held}


def test_clip_augmentation_is_seeded_and_keeps_every_word() -> None:
    import numpy as np

    from e2e_dist.data.speech_augment import augment_clip, change_speed

    x = np.sin(np.arange(12000) / 7.0).astype(np.float32) * 0.5
    a = augment_clip(x, np.random.default_rng(3), 8000, 16000)
    assert np.array_equal(a, augment_clip(x, np.random.default_rng(3), 8000, 16000))  # a resume hears the same
    outs = [augment_clip(x, np.random.default_rng(s), 8000, 16000) for s in range(30)]
    assert all(len(o) <= 16000 and np.abs(o).max() <= 1 for o in outs)
    assert len({len(o) for o in outs}) > 10  # speeds and silences differ
    assert len(change_speed(x, 1.25)) == 9600 and len(change_speed(x, 0.8)) == 15000
    # A clip slowed past the limit keeps its words at the original speed (no word is cut off).
    long = np.ones(15500, np.float32) * 0.1
    assert all(len(augment_clip(long, np.random.default_rng(s), 8000, 16000)) <= 16000 for s in range(20))


def test_make_speech_held_out_voices_at_one_speed(tmp_path, capsys):
    from e2e_dist import cli

    cfg = load_run_config("tiny-speech")
    train, held = speech_voices(cfg)
    assert held and train and not held & train and len(held) == round(0.25 * (len(held) + len(train)))
    out_dir = tmp_path / "held"
    assert cli.main(["data", "make-speech", str(out_dir), "-n", "6", "--voices", "held-out", "--speed", "200"]) == 0
    assert "judge a model on it" in capsys.readouterr().out
    rows = [json.loads(line) for line in (out_dir / "manifest.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and {r["speed"] for r in rows} == {200} and {r["voice"].split("+")[1] for r in rows} <= held
    with pytest.raises(SystemExit):
        cli.main(["data", "make-speech", str(tmp_path / "x"), "--speed", "5"])
    assert "--speed" in capsys.readouterr().err


def test_predict_transcribes_an_audio_file(tmp_path, corpus):
    from e2e_dist.models.registry import build_model
    from e2e_dist.predict import predict
    from tests.helpers.exports import write_export

    cfg = load_run_config("tiny-speech", ["model.d_model=16", "model.n_layer=1", "model.conv_channels=8"])
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.data).eval()
    path = write_export(tmp_path / "speech.safetensors", cfg, model)
    clip = corpus / "audio" / "c1.wav"  # 22.05 kHz: predict resamples like training did
    out = predict(str(path), str(clip))
    x = torch.from_numpy(speech.decode_audio(clip.read_bytes(), cfg.data.sample_rate))[None]
    # the model's characters; predict may add a space at a pause where the model emitted none
    # (e2e_dist/audio_segments.py), so spaces are not compared
    said = model.transcribe(x, torch.tensor([x.shape[1]]))[0]
    assert isinstance(out, str) and out.replace(" ", "") == said.replace(" ", "")
    with pytest.raises(UserError, match="cut.wav.*truncated WAV"):
        predict(str(path), str(corpus / "audio" / "cut.wav"))
    # A clip far shorter than any word (here 50 samples) is padded with silence, not a traceback.
    short = tmp_path / "short.wav"
    with wave.open(str(short), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(cfg.data.sample_rate)
        w.writeframes(b"\x10\x00" * 50)
    assert isinstance(predict(str(path), str(short)), str)


def test_make_speech_writes_what_train_tiny_speech_reads(ray_local, tmp_path, capsys):
    """One corpus flow: `data make-speech DIR` (default size = the built-in corpus's), then
    `train tiny-speech --set data.paths=[DIR]` reads that corpus, not a new one."""
    from e2e_dist import cli

    assert cli.SPOKEN_DIGITS_UTTERANCES == speech.SPOKEN_DIGITS_UTTERANCES
    data_verb = cli.build_parser()._subparsers._group_actions[0].choices["data"]
    make_speech = data_verb._subparsers._group_actions[0].choices["make-speech"]
    assert f"(default: {speech.SPOKEN_DIGITS_UTTERANCES})" in " ".join(make_speech.format_help().split())
    out_dir = tmp_path / "spoken"
    assert cli.main(["data", "make-speech", str(out_dir), "-n", "10"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[-1] == f"train on it: e2e-dist train tiny-speech --set data.paths=[{out_dir}]"
    cfg = load_run_config("tiny-speech", [printed[-1].split("--set ")[1], "data.val_fraction=0.2"])
    bundle = build_data(cfg.data, model_cfg=cfg.model)
    assert bundle.stats["train_clips"] + bundle.stats["val_rows"] == 10


def test_other_synthesizers_speak_their_share_and_an_espeak_only_plan_is_unchanged():
    from e2e_dist.data.synthesizers import FLITE

    before = synth_speech.plan_corpus(50, seed=4)
    assert synth_speech.plan_corpus(50, seed=4, voices=(), voice_share=0.5) == before  # no extra draws
    plans = synth_speech.plan_corpus(400, seed=4, voices=FLITE[:2], voice_share=0.4)
    others = [p for p in plans if p.voice.startswith("flite:")]
    assert 0.33 < len(others) / 400 < 0.47 and {p.voice for p in others} == {"flite:awb", "flite:rms"}
    assert {p.voice for p in synth_speech.plan_corpus(20, seed=4, variants=(), voices=FLITE[:1])} == {"flite:awb"}


@pytest.mark.skipif(__import__("shutil").which("festival") is None,
                    reason="festival not installed (.ci/install-speech-deps.sh)")
def test_make_speech_held_out_synthesizers(tmp_path, capsys):
    from e2e_dist import cli

    out_dir = tmp_path / "fest"
    assert cli.main(["data", "make-speech", str(out_dir), "-n", "3", "--voices", "held-out-synthesizers"]) == 0
    assert "festival:kal_diphone" in capsys.readouterr().out
    rows = [json.loads(line) for line in (out_dir / "manifest.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and {r["engine"] for r in rows} == {"festival"}
    for r in rows:
        assert sf.info(out_dir / r["audio"]).duration > 0.3
