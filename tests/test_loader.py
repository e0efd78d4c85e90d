"""Loading checkpoints: dtypes, the Hub path, quantized weights and clear errors."""

import json
import shutil

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

import phi3v_mlx
from phi3v_mlx import loader
from phi3v_mlx.config import ConfigError
from phi3v_mlx.loader import LoadError
from tests.conftest import MODELS, TEXT

TINY = MODELS / "tiny-phi3v"


@pytest.fixture
def checkpoint(tmp_path):
    """A writable copy of the tiny checkpoint."""
    path = tmp_path / "ckpt"
    shutil.copytree(TINY, path)
    for file in path.iterdir():
        file.chmod(0o644)
    return path


def test_keeps_checkpoint_dtype_and_casts_on_request():
    model, processor = phi3v_mlx.load(TINY)
    dtypes = {v.dtype for _, v in tree_flatten(model.parameters())}
    assert dtypes == {mx.bfloat16}
    model32, _ = phi3v_mlx.load(str(TINY), dtype="float32")
    assert {v.dtype for _, v in tree_flatten(model32.parameters())} == {mx.float32}
    assert processor.images.num_crops == 16
    # Weights were upcast exactly.
    a = np.array(model.language.norm.weight.astype(mx.float32))
    np.testing.assert_array_equal(a, np.array(model32.language.norm.weight))


def test_vision_tower_keeps_only_used_layers():
    model, _ = phi3v_mlx.load(TINY)
    assert len(model.vision.clip.layers) == 2  # layer_idx -2 of 3 layers
    names = {k for k, _ in tree_flatten(model.parameters())}
    assert not any("post_layernorm" in k for k in names)


def test_bad_dtype():
    with pytest.raises(LoadError, match="dtype 'int8'"):
        phi3v_mlx.load(TINY, dtype="int8")
    with pytest.raises(LoadError, match="is not one of"):
        phi3v_mlx.load(TINY, dtype=mx.int32)


def test_mlx_dtypes_are_accepted():
    model, _ = phi3v_mlx.load(TINY, dtype=mx.float16)
    assert {v.dtype for _, v in tree_flatten(model.parameters())} == {mx.float16}


def test_missing_config(checkpoint):
    (checkpoint / "config.json").unlink()
    with pytest.raises(ConfigError, match="no config.json"):
        phi3v_mlx.load(checkpoint)


def test_other_model_type(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    config["model_type"] = "llama"
    (checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="'llama' is not one phi3v-mlx runs"):
        phi3v_mlx.load(checkpoint)


def test_missing_shard(checkpoint):
    (checkpoint / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(LoadError, match="missing weight file .*model-00002-of-00002"):
        phi3v_mlx.load(checkpoint)


def test_truncated_shard(checkpoint):
    shard = checkpoint / "model-00001-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:100_000])
    with pytest.raises(LoadError, match="model-00001-of-00002.safetensors is truncated"):
        phi3v_mlx.load(checkpoint)
    shard.write_bytes(b"abc")
    with pytest.raises(LoadError, match="truncated or not a safetensors"):
        phi3v_mlx.load(checkpoint)


def _rewrite_shard(checkpoint, change):
    shard = checkpoint / "model-00002-of-00002.safetensors"
    weights = mx.load(str(shard))
    change(weights)
    mx.save_safetensors(str(shard), weights)


def test_missing_tensor(checkpoint):
    _rewrite_shard(checkpoint, lambda w: w.pop("model.norm.weight"))
    with pytest.raises(LoadError, match="lacks tensor 'language.norm.weight'"):
        phi3v_mlx.load(checkpoint)


def test_unexpected_tensor(checkpoint):
    _rewrite_shard(checkpoint, lambda w: w.update({"model.extra.weight": mx.zeros((2,))}))
    with pytest.raises(LoadError, match="unexpected tensor 'language.extra.weight'"):
        phi3v_mlx.load(checkpoint)


def test_misshaped_tensor(checkpoint):
    _rewrite_shard(checkpoint, lambda w: w.update({"model.norm.weight": mx.zeros((65,))}))
    with pytest.raises(LoadError, match=r"'language.norm.weight'.*\[65\].*\[64\]"):
        phi3v_mlx.load(checkpoint)


def test_missing_tokenizer(checkpoint):
    (checkpoint / "tokenizer.json").unlink()
    with pytest.raises(LoadError, match="no tokenizer.json"):
        phi3v_mlx.load(checkpoint)


def test_not_a_folder(tmp_path):
    with pytest.raises(LoadError, match="no model folder"):
        phi3v_mlx.load(tmp_path / "nowhere")
    (tmp_path / "file").write_text("x")
    with pytest.raises(LoadError, match="is not a folder"):
        phi3v_mlx.load(tmp_path / "file")


def test_hub_id_goes_through_snapshot_download(monkeypatch):
    calls = []

    def fake_download(repo_id, allow_patterns):
        calls.append((repo_id, allow_patterns))
        return str(TINY)

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_download)
    model, _ = phi3v_mlx.load("microsoft/Phi-3-vision-128k-instruct")
    assert calls == [("microsoft/Phi-3-vision-128k-instruct", loader.HUB_PATTERNS)]
    assert "*.safetensors" in loader.HUB_PATTERNS and "*.json" in loader.HUB_PATTERNS
    assert isinstance(model, phi3v_mlx.DecoderModel)


def test_hub_failure_is_one_line(monkeypatch):
    def failing(repo_id, allow_patterns):
        raise OSError("network unreachable\nmore detail")

    monkeypatch.setattr("huggingface_hub.snapshot_download", failing)
    with pytest.raises(LoadError, match="cannot download some/repo.*network unreachable .*--model"):
        phi3v_mlx.load("some/repo")


def test_quantized_checkpoint_loads(tmp_path):
    """An mlx-lm style quantized checkpoint: quantized layers found by their scales."""
    model, _ = phi3v_mlx.load(TINY, dtype="float32")
    nn.quantize(model.language, group_size=32, bits=8)
    path = tmp_path / "q8"
    shutil.copytree(TINY, path, ignore=shutil.ignore_patterns("*.safetensors*"))
    mx.save_safetensors(str(path / "model.safetensors"), dict(tree_flatten(model.parameters())))
    config = json.loads((path / "config.json").read_text())
    config["quantization"] = {"group_size": 32, "bits": 8}
    (path / "config.json").write_text(json.dumps(config))
    loaded, _ = phi3v_mlx.load(path)
    assert isinstance(loaded.language.layers[0].self_attn.qkv_proj, nn.QuantizedLinear)
    assert isinstance(loaded.language.embed_tokens, nn.QuantizedEmbedding)
    assert not isinstance(loaded.vision.projection.linear_1, nn.QuantizedLinear)
    ids = mx.array([[1, 32010, 29871, 13, 10994, 29892]])
    np.testing.assert_allclose(np.array(loaded(ids)), np.array(model(ids)), atol=1e-5)


def test_a_processor_loads_from_a_folder_named_by_a_string():
    folder = TEXT / "models" / "tiny-phi4-mini"
    assert loader.load_processor(str(folder)).stop_ids == loader.load_processor(folder).stop_ids
