"""The converter: quantized and plain MLX checkpoints, streaming, atomic, with a fidelity report."""

import json
import shutil

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from typer.testing import CliRunner

import phi3v_mlx
from phi3v_mlx import cli
from phi3v_mlx import convert as conv
from phi3v_mlx.config import ConfigError
from phi3v_mlx.loader import LoadError
from tests.conftest import FIXTURES, MODELS, case_inputs, golden

MLX_VLM = FIXTURES / "mlx_vlm"


def head_weight(model):
    """The LM head as a float matrix (dequantized), for fast logits in numpy."""
    head = model.language.lm_head
    if isinstance(head, nn.QuantizedLinear):
        return np.array(
            mx.dequantize(head.weight, head.scales, head.biases, head.group_size, head.bits)
        )
    return np.array(head.weight)


def argmax_agreement(path, variant):
    """Share of golden-case positions whose argmax equals the float32 reference's."""
    model, processor = phi3v_mlx.load(path, dtype="float32")
    weight = head_weight(model)
    agree = total = 0
    for case in ("a", "b", "e", "f_long"):  # 2,847 positions, with and without images
        hidden = model.language.hidden(model.embed(**case_inputs(processor, case)))
        argmax = (np.array(hidden)[0] @ weight.T).argmax(-1)
        want = golden(variant, case)["argmax"]
        agree += int((argmax == want).sum())
        total += len(want)
    return agree / total


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Both variants converted to 8 and 4 bits (no fidelity run: tested separately)."""
    root = tmp_path_factory.mktemp("converted")
    out = {}
    for variant in ("tiny-phi3v", "tiny-phi35v"):
        for bits in (8, 4):
            path = root / f"{variant}-{bits}"
            conv.convert(MODELS / variant, path, quantize=True, q_bits=bits, check=False,
                         log=lambda _: None)  # fmt: skip
            out[variant, bits] = path
    return out


@pytest.mark.parametrize("variant", ["tiny-phi3v", "tiny-phi35v"])
def test_quantized_agreement_with_reference(converted, variant, capsys):
    q8 = argmax_agreement(converted[variant, 8], variant)
    q4 = argmax_agreement(converted[variant, 4], variant)
    with capsys.disabled():
        print(f"\n{variant}: top-1 agreement with the reference, 8-bit {q8:.1%}, 4-bit {q4:.1%}")
    assert q8 >= 0.95
    assert q4 > 0.3


def test_output_layout_and_config(converted):
    path = converted["tiny-phi35v", 4]
    config = json.loads((path / "config.json").read_text())
    assert config["quantization"] == {"group_size": 64, "bits": 4, "mode": "affine"}
    assert config["torch_dtype"] == "bfloat16" and config["model_type"] == "phi3_v"
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json",
                 "generation_config.json", "processor_config.json", "README.md"):  # fmt: skip
        assert (path / name).is_file(), name
    index = json.loads((path / "model.safetensors.index.json").read_text())
    weights = mx.load(str(path / "model.safetensors"))
    assert set(index["weight_map"]) == set(weights)
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in weights.values())
    assert weights["language.layers.0.self_attn.qkv_proj.weight"].dtype == mx.uint32
    assert "language.embed_tokens.scales" in weights and "language.lm_head.scales" in weights
    assert weights["vision.projection.linear_1.weight"].dtype == mx.bfloat16  # vision kept 16-bit
    assert weights["vision.clip.embeddings.patch_embedding.weight"].shape == (32, 14, 14, 3)
    assert not [k for k in weights if "post_layernorm" in k or "clip.layers.2." in k]
    model, _ = phi3v_mlx.load(path)
    assert isinstance(model.language.layers[1].mlp.down_proj, nn.QuantizedLinear)
    assert not isinstance(model.vision.clip.layers[0].mlp.fc1, nn.QuantizedLinear)


def test_quantize_vision_and_per_module_entries(tmp_path):
    path = tmp_path / "qv"
    conv.convert(MODELS / "tiny-phi3v", path, quantize=True, q_bits=8, q_group_size=128,
                 quantize_vision=True, check=False, log=lambda _: None)  # fmt: skip
    quant = json.loads((path / "config.json").read_text())["quantization"]
    assert quant["group_size"] == 128 and quant["bits"] == 8
    # The decoder is 64 wide and the CLIP tower 32: those layers need smaller groups.
    assert quant["language.layers.0.self_attn.qkv_proj"] == {"group_size": 64, "bits": 8}
    assert quant["vision.clip.layers.0.self_attn.q_proj"] == {"group_size": 32, "bits": 8}
    model, _ = phi3v_mlx.load(path)
    assert isinstance(model.vision.clip.layers[0].self_attn.q_proj, nn.QuantizedLinear)
    assert model.vision.clip.layers[0].self_attn.q_proj.group_size == 32
    assert isinstance(model.vision.projection.linear_2, nn.QuantizedLinear)


def test_dequantize_round_trip(converted, tmp_path):
    source = converted["tiny-phi3v", 8]
    path = tmp_path / "deq"
    conv.convert(source, path, dequantize=True, dtype="float32", log=lambda _: None)
    assert "quantization" not in json.loads((path / "config.json").read_text())
    plain, _ = phi3v_mlx.load(path)
    quantized, _ = phi3v_mlx.load(source, dtype="float32")
    layer = quantized.language.layers[0].self_attn.qkv_proj
    want = mx.dequantize(layer.weight, layer.scales, layer.biases, layer.group_size, layer.bits)
    np.testing.assert_array_equal(
        np.array(plain.language.layers[0].self_attn.qkv_proj.weight), np.array(want)
    )
    ids = mx.array([[1, 32010, 29871, 13, 10994, 29892]])
    np.testing.assert_allclose(np.array(plain(ids)), np.array(quantized(ids)), atol=1e-5)
    back = tmp_path / "requantized"
    conv.convert(path, back, quantize=True, q_bits=8, check=False, log=lambda _: None)
    assert isinstance(phi3v_mlx.load(back)[0].language.lm_head, nn.QuantizedLinear)


def test_plain_conversion_and_small_shards(tmp_path):
    path = tmp_path / "f16"
    conv.convert(MODELS / "tiny-phi35v", path, dtype="float16", shard_bytes=2**20,
                 log=lambda _: None)  # fmt: skip
    index = json.loads((path / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) >= 4 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    model, _ = phi3v_mlx.load(path)
    source, _ = phi3v_mlx.load(MODELS / "tiny-phi35v", dtype="float16")
    ids = mx.array([[1, 32010, 29871, 13, 10994, 29892]])
    np.testing.assert_array_equal(np.array(model(ids)), np.array(source(ids)))


def test_refuses_non_empty_target_unless_forced(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(conv.ConvertError, match="not empty.*--force"):
        conv.convert(MODELS / "tiny-phi3v", target, log=lambda _: None)
    assert (target / "keep.txt").read_text() == "mine"
    conv.convert(MODELS / "tiny-phi3v", target, force=True, log=lambda _: None)
    assert not (target / "keep.txt").exists() and (target / "model.safetensors").is_file()


def test_failure_mid_write_leaves_nothing(tmp_path, monkeypatch):
    original, written = conv.save_safetensors, []

    def failing(path, tensors, fmt, on_written):
        if written:
            raise OSError("disk full")
        written.append(path)
        original(path, tensors, fmt, on_written)

    monkeypatch.setattr(conv, "save_safetensors", failing)
    with pytest.raises(OSError, match="disk full"):
        conv.convert(MODELS / "tiny-phi3v", tmp_path / "out", shard_bytes=2**20, log=lambda _: None)
    assert written and list(tmp_path.iterdir()) == []


def test_errors(tmp_path):
    with pytest.raises(conv.ConvertError, match="q-bits"):
        conv.convert(MODELS / "tiny-phi3v", tmp_path / "a", quantize=True, q_bits=7)
    with pytest.raises(conv.ConvertError, match="q-group-size"):
        conv.convert(MODELS / "tiny-phi3v", tmp_path / "a", quantize=True, q_group_size=48)
    with pytest.raises(conv.ConvertError, match="exclude"):
        conv.convert(MODELS / "tiny-phi3v", tmp_path / "a", quantize=True, dequantize=True)
    with pytest.raises(LoadError, match="no model folder"):
        conv.convert(tmp_path / "missing", tmp_path / "a")
    source = tmp_path / "src"
    shutil.copytree(MODELS / "tiny-phi3v", source)
    for f in source.iterdir():
        f.chmod(0o644)
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "model_type": "llava"}))
    with pytest.raises(ConfigError, match="'llava'"):
        conv.convert(source, tmp_path / "a")
    (source / "config.json").write_text(json.dumps(config))
    (source / "model-00002-of-00002.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(
        LoadError, match="model-00002-of-00002.safetensors (is truncated|has a corrupt header)"
    ):
        conv.convert(source, tmp_path / "a")
    assert not (tmp_path / "a").exists()


def test_fidelity_report(converted):
    report = conv.fidelity(MODELS / "tiny-phi3v", converted["tiny-phi3v", 8], dtype="float32")
    assert report.positions > 100 and 0.9 <= report.top1_agreement <= 1
    assert 0 <= report.mean_kl < 1e-3
    assert report.converted_bytes < report.source_bytes
    text = str(report)
    assert "top-1 agreement" in text and "mean KL" in text and "GB ->" in text
    worse = conv.fidelity(MODELS / "tiny-phi3v", converted["tiny-phi3v", 4], dtype="float32")
    assert worse.mean_kl > report.mean_kl


def test_cli_and_upload_are_wired(tmp_path, monkeypatch):
    calls = []

    class FakeApi:
        def create_repo(self, repo_id, exist_ok):
            calls.append(("create", repo_id, exist_ok))

        def upload_folder(self, folder_path, repo_id, repo_type):
            calls.append(
                (
                    "upload",
                    sorted(p.name for p in __import__("pathlib").Path(folder_path).iterdir()),
                    repo_id,
                )
            )

    monkeypatch.setattr("huggingface_hub.HfApi", FakeApi)
    result = CliRunner().invoke(
        cli.app,
        ["convert", "--hf-path", str(MODELS / "tiny-phi3v"), "--mlx-path", str(tmp_path / "q"),
         "-q", "--q-bits", "8", "--upload-repo", "me/tiny-q8"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "Fidelity on" in result.stderr and "top-1 agreement" in result.stderr
    assert calls[0] == ("create", "me/tiny-q8", True)
    assert calls[1][0] == "upload" and "model.safetensors" in calls[1][1]
    no_check = CliRunner().invoke(
        cli.app,
        ["convert", "--hf-path", str(MODELS / "tiny-phi3v"), "--mlx-path", str(tmp_path / "q"),
         "-q", "--no-check", "--force"],
    )  # fmt: skip
    assert no_check.exit_code == 0 and "Fidelity" not in no_check.stderr


def test_top_level_convert_script(tmp_path, monkeypatch, capsys):
    import runpy

    out = str(tmp_path / "o")
    args = ["convert.py", "--hf-path", str(MODELS / "tiny-phi3v"), "--mlx-path", out,
            "--q-bits", "9", "-q"]  # fmt: skip
    monkeypatch.setattr("sys.argv", args)
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(FIXTURES.parents[1] / "convert.py"), run_name="__main__")
    assert done.value.code == 1
    assert (
        capsys.readouterr().err.strip() == "error: --q-bits must be one of 2, 3, 4, 5, 6, 8, got 9"
    )


def test_reads_mlx_vlm_checkpoints(tmp_path):
    """Checkpoints written by mlx-vlm's converter load and compute the same numbers."""
    reference, _ = phi3v_mlx.load(MODELS / "tiny-phi3v")
    bf16, processor = phi3v_mlx.load(MLX_VLM / "tiny-phi3v-bf16")
    inputs = case_inputs(processor, "b")
    got, want = bf16.embed(**inputs), reference.embed(**inputs)  # image features included
    np.testing.assert_array_equal(
        np.array(got.astype(mx.float32)), np.array(want.astype(mx.float32))
    )
    q4, processor = phi3v_mlx.load(MLX_VLM / "tiny-phi3v-q4")
    assert isinstance(q4.language.embed_tokens, nn.QuantizedEmbedding)
    ours = tmp_path / "ours-q4"
    conv.convert(MODELS / "tiny-phi3v", ours, quantize=True, check=False, log=lambda _: None)
    mine, _ = phi3v_mlx.load(ours)
    ids = processor("<|user|>\nHello<|end|>\n<|assistant|>\n")["input_ids"]
    np.testing.assert_array_equal(
        np.array(q4(ids).astype(mx.float32)), np.array(mine(ids).astype(mx.float32))
    )
    result = phi3v_mlx.generate(q4, processor, "<|user|>\nHi<|end|>\n<|assistant|>\n", max_tokens=3)
    assert len(result.tokens) == 3
