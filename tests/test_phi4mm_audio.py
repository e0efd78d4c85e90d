"""Phi-4-multimodal speech path: audio input, log-mel features and the conformer encoder against
the reference's goldens (tests/fixtures/phi4mm, see its README "Speech path")."""

import io
import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import soundfile

from phi3v_mlx.models.phi4mm import conformer
from phi3v_mlx.models.phi4mm.audio import AudioError, load_audio
from phi3v_mlx.models.phi4mm.conformer import AudioConfig, AudioEmbedding
from phi3v_mlx.models.phi4mm.features import AudioFeatureExtractor, mel_filter_bank

PHI4MM = Path(__file__).parent / "fixtures" / "phi4mm"
AUDIO = PHI4MM / "audio"
FEATURES = PHI4MM / "golden" / "audio_features"
GOLDEN = PHI4MM / "golden" / "tiny-phi4mm"
CHECKPOINT = PHI4MM / "models" / "tiny-phi4mm"
MANIFEST = json.loads((PHI4MM / "golden" / "manifest.json").read_text(encoding="utf-8"))
CLIPS = sorted(p.stem for p in AUDIO.glob("*.wav"))
SPEECH_CASES = [c for c in ("s1", "s2", "s3", "s4", "s6") if (GOLDEN / f"case_{c}.npz").exists()]


def assert_close(got, want, tol=1e-4):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape
    err = np.abs(got - want)
    assert np.all(err <= tol + tol * np.abs(want)), f"max error {err.max():.2e}"


def checkpoint_weights() -> dict:
    weights = {}
    for shard in sorted(CHECKPOINT.glob("*.safetensors")):
        weights.update(mx.load(str(shard)))
    return weights


@pytest.fixture(scope="module")
def config() -> dict:
    return json.loads((CHECKPOINT / "config.json").read_text())


@pytest.fixture(scope="module")
def audio_embed(config) -> AudioEmbedding:
    module = AudioEmbedding(AudioConfig.from_model_config(config), config["hidden_size"])
    weights = conformer.sanitize(checkpoint_weights())
    module.load_weights([(k, v.astype(mx.float32)) for k, v in weights.items()], strict=True)
    return module


def case_features(case: str):
    """The golden feature-extractor outputs a speech case feeds the model."""
    clips = MANIFEST["cases"][case]["audios"]
    gold = np.load(FEATURES / ("batch_s2.npz" if len(clips) > 1 else f"{clips[0]}.npz"))
    mask = gold["audio_attention_mask"] if len(clips) > 1 else None
    return gold["audio_input_features"], gold["audio_embed_sizes"], mask


# ------------------------------------------------------------------ features


def test_mel_filter_bank_is_the_reference_one():
    assert_close(mel_filter_bank(), np.load(FEATURES / "mel_filters.npz")["mel_filters"], 1e-12)


@pytest.mark.parametrize("clip", CLIPS)
def test_features_of_each_file(clip):
    gold = np.load(FEATURES / f"{clip}.npz")
    waveform = load_audio(AUDIO / f"{clip}.wav")
    np.testing.assert_array_equal(waveform, gold["waveform"])  # resampled as the fixtures' caller
    out = AudioFeatureExtractor()([AUDIO / f"{clip}.wav"])
    assert_close(out["audio_features"], gold["audio_input_features"])
    np.testing.assert_array_equal(out["audio_embed_sizes"], gold["audio_embed_sizes"])
    assert out["audio_attention_mask"] is None


def test_8khz_array_with_its_rate_matches_the_resampled_golden():
    gold = np.load(FEATURES / "speech8k_2p1s.npz")
    out = AudioFeatureExtractor()([gold["waveform_file"]], sampling_rate=8000)
    assert_close(out["audio_features"], gold["audio_input_features"])
    pair = AudioFeatureExtractor()((gold["waveform_file"], 8000))
    np.testing.assert_array_equal(pair["audio_features"], out["audio_features"])


def test_two_clips_are_padded_and_framed_as_one_batch():
    gold = np.load(FEATURES / "batch_s2.npz")
    waves = np.split(gold["waveforms"], np.cumsum(gold["lengths"])[:-1])
    out = AudioFeatureExtractor()(list(waves), sampling_rate=16000)
    assert_close(out["audio_features"], gold["audio_input_features"])
    np.testing.assert_array_equal(out["audio_embed_sizes"], gold["audio_embed_sizes"])
    np.testing.assert_array_equal(out["audio_attention_mask"], gold["audio_attention_mask"])
    short = out["audio_features"][1]
    valid = int(gold["audio_attention_mask"][1].sum())
    assert np.abs(short[valid:]).sum() > 0  # frames past the clip that still overlap it


def test_progress_reports_every_frame_once():
    calls = []
    out = AudioFeatureExtractor()(
        [AUDIO / "speech16k_41s.wav"], progress=lambda d, t: calls.append((d, t))
    )
    frames = out["audio_features"].shape[1]
    assert len(calls) > 1 and calls[-1] == (frames, frames)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)


# ------------------------------------------------------------------ audio input


def test_channels_are_averaged_and_formats_read(tmp_path):
    wave = np.load(FEATURES / "speech16k_1p0s.npz")["waveform"]
    stereo = np.stack([wave, np.zeros_like(wave)], axis=1)
    np.testing.assert_allclose(load_audio((stereo, 16000)), wave / 2, atol=1e-7)
    np.testing.assert_allclose(load_audio((stereo.T, 16000)), wave / 2, atol=1e-7)
    soundfile.write(tmp_path / "clip.flac", stereo, 16000, subtype="PCM_16")
    np.testing.assert_allclose(load_audio(tmp_path / "clip.flac"), wave / 2, atol=1 / 32768)
    soundfile.write(tmp_path / "clip.ogg", wave, 16000, format="OGG", subtype="VORBIS")
    buffer = io.BytesIO()
    soundfile.write(buffer, wave, 16000, format="WAV", subtype="PCM_16")
    np.testing.assert_array_equal(load_audio(buffer.getvalue()), wave)
    assert load_audio(str(tmp_path / "clip.ogg")).shape == wave.shape
    soundfile.write(tmp_path / "clip.mp3", stereo, 44_100, format="MP3")
    assert abs(load_audio(tmp_path / "clip.mp3").shape[0] - len(wave) * 160 / 441) < 1200


def test_int16_samples_are_scaled_as_soundfile_reads_them():
    pcm, rate = soundfile.read(AUDIO / "speech16k_1p0s.wav", dtype="int16")
    wave = np.load(FEATURES / "speech16k_1p0s.npz")["waveform"]
    np.testing.assert_array_equal(load_audio((pcm, rate)), wave)


def test_other_rates_are_resampled_to_16khz():
    t = np.arange(48_000) / 48_000
    tone = np.sin(2 * np.pi * 440 * t).astype(np.float32)
    out = load_audio((tone, 48_000))
    expected = np.sin(2 * np.pi * 440 * np.arange(16_000) / 16_000)
    assert out.dtype == np.float32 and out.shape == (16_000,)
    assert np.abs(out[200:-200] - expected[200:-200]).max() < 1e-3
    assert load_audio((tone[:44_100], 44_100)).shape == (16_000,)


BAD_KINDS = ["empty file", "corrupt file", "corrupt bytes", "missing file", "folder", "too short",
             "too short at 8 kHz", "too long", "array without rate", "not finite", "wrong type",
             "3-D array"]  # fmt: skip


def bad_inputs(tmp_path: Path) -> dict:
    """Each kind of bad audio input: (source, load_audio options, words its error holds)."""
    (tmp_path / "empty.wav").write_bytes(b"")
    (tmp_path / "notes.mp3").write_text("not audio at all\n" * 20)
    return {
        "empty file": (tmp_path / "empty.wav", {}, "empty"),
        "corrupt file": (tmp_path / "notes.mp3", {}, "cannot decode audio file"),
        "corrupt bytes": (b"RIFF\x00\x00garbage" * 10, {}, "cannot decode"),
        "missing file": (tmp_path / "absent.wav", {}, "no such audio file"),
        "folder": (tmp_path, {}, "folder"),
        "too short": ((np.zeros(399, np.float32), 16000), {}, "shorter than one 25 ms"),
        "too short at 8 kHz": ((np.zeros(199, np.float32), 8000), {}, "shorter than one 25 ms"),
        "too long": ((np.zeros(32_000, np.float32), 16000), {"max_seconds": 1.0}, "over the limit"),
        "array without rate": (np.zeros(1000, np.float32), {}, "needs its sampling rate"),
        "not finite": ((np.full(1000, np.nan, np.float32), 16000), {}, "NaN"),
        "wrong type": (3.5, {}, "unsupported audio type"),
        "3-D array": ((np.zeros((2, 2, 500), np.float32), 16000), {}, "must be [samples]"),
    }


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_input_is_one_line(tmp_path, kind):
    inputs = bad_inputs(tmp_path)
    assert list(inputs) == BAD_KINDS
    source, options, words = inputs[kind]
    with pytest.raises(AudioError) as error:
        load_audio(source, **options)
    message = str(error.value)
    assert words in message and "\n" not in message


def test_too_long_file_is_refused_before_decoding(tmp_path):
    soundfile.write(tmp_path / "long.wav", np.zeros(48_000, np.float32), 16000)
    with pytest.raises(AudioError, match="3.0 s long, over the limit of 2 s"):
        AudioFeatureExtractor(max_seconds=2)([tmp_path / "long.wav"])


# ------------------------------------------------------------------ encoder


@pytest.mark.parametrize("case", SPEECH_CASES)
def test_encoder_matches_the_reference(audio_embed, case):
    gold = np.load(GOLDEN / f"case_{case}.npz")
    features, sizes, mask = case_features(case)
    encoder = audio_embed.encoder
    conv_out = encoder.embed(encoder.encoder_embedding(mx.array(features)))
    assert_close(conv_out, gold["audio_conv_out"])
    assert_close(encoder(features, mask), gold["audio_encoder_hidden"])
    vision = bool(MANIFEST["cases"][case]["images"])  # image + audio: the vision-speech projection
    embeds = audio_embed(features, sizes, mask, vision=vision)
    assert [e.shape[0] for e in embeds] == list(sizes)
    assert_close(mx.concatenate(embeds), gold["audio_embeds"])


def test_other_projection_and_missing_mask_differ(audio_embed):
    """The checks above can fail: the wrong projection or a dropped batch mask moves the output."""
    gold = np.load(GOLDEN / "case_s2.npz")
    features, sizes, mask = case_features("s2")
    vision = mx.concatenate(audio_embed(features, sizes, mask, vision=True))
    unmasked = mx.concatenate(audio_embed(features, sizes, None))
    assert np.abs(np.array(vision) - gold["audio_embeds"]).max() > 1e-2
    assert np.abs(np.array(unmasked) - gold["audio_embeds"]).max() > 1e-2


def test_long_audio_in_groups_of_chunks_is_the_same(config, audio_embed):
    features, sizes, _ = case_features("s6")
    gold = np.load(GOLDEN / "case_s6.npz")["audio_encoder_hidden"]
    small = AudioEmbedding(AudioConfig.from_model_config(config), config["hidden_size"], 1)
    small.update(audio_embed.parameters())
    calls = []
    hidden = small.encoder(features, progress=lambda d, t: calls.append((d, t)))
    assert_close(hidden, gold)
    assert calls == [(500, 513), (513, 513)]
    encoder = small.encoder
    whole = np.array(encoder.embed(encoder.encoder_embedding(mx.array(features))))
    for start, stop in [(0, 7), (1, 9), (250, 500), (499, 513)]:
        assert_close(encoder.subsample(features, start, stop), whole[:, start:stop], 1e-6)


# ------------------------------------------------------------------ weights and config


def to_remote(name: str) -> str:
    """A native tensor name as the Hub's remote code names it."""
    for native, remote in [
        (".gate_up_proj.", ".net.0.linear."),
        (".down_proj.", ".net.2."),
        (".q_proj.", ".linear_q."),
        (".k_proj.", ".linear_k."),
        (".v_proj.", ".linear_v."),
        (".o_proj.", ".linear_out."),
        ("up_proj_for_speech.", "audio_projection.speech.0."),
        ("down_proj_for_speech.", "audio_projection.speech.2."),
        ("up_proj_for_vision_speech.", "audio_projection.vision.0."),
        ("down_proj_for_vision_speech.", "audio_projection.vision.2."),
    ]:
        name = name.replace(native, remote)
    return name


def test_sanitize_reads_both_layouts_and_its_own_output():
    weights = {
        k: v for k, v in checkpoint_weights().items() if k.startswith(conformer.CHECKPOINT_PREFIX)
    }
    native = conformer.sanitize(
        {**weights, "model.layers.0.mlp.down_proj.weight": mx.zeros((2, 2))}
    )
    assert len(native) == len(weights)
    remote = conformer.sanitize({to_remote(k): v for k, v in weights.items()})
    assert remote.keys() == native.keys()
    again = conformer.sanitize({conformer.CHECKPOINT_PREFIX + k: v for k, v in native.items()})
    for name, value in native.items():
        assert mx.array_equal(remote[name], value) and mx.array_equal(again[name], value), name


def test_remote_code_config_gives_the_same_audio_config(config):
    remote = dict(config["audio_config"])
    remote["attention_dim"] = remote.pop("hidden_size")
    remote["attention_heads"] = remote.pop("num_attention_heads")
    remote["linear_units"] = remote.pop("intermediate_size")
    remote["nemo_conv_settings"] = {"conv_channels": remote.pop("nemo_conv_channels")}
    remote["relative_attention_bias_args"] = {
        "type": "t5",
        "t5_bias_max_distance": remote.pop("bias_max_distance"),
    }
    remote_config = {
        "audio_processor": {"name": "cascades", "config": remote},
        "embd_layer": {"audio_embd_layer": {"downsample_rate": 1}},
    }
    assert AudioConfig.from_model_config(remote_config) == AudioConfig.from_model_config(config)
