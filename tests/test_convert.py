"""The converter: quantized and plain MLX checkpoints, streaming, atomic, with a fidelity report."""

import json
import os
import shutil
import signal
import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map
from typer.testing import CliRunner

import phi3v_mlx
from phi3v_mlx import cli
from phi3v_mlx import convert as conv
from phi3v_mlx.config import ConfigError
from phi3v_mlx.loader import LoadError
from tests.conftest import FIXTURES, MANIFEST, MEASURED, MODELS, case_inputs, golden, open_image
from tests.helpers import mlx_vlm_with_tiny_tower

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
def test_quantized_agreement_with_reference(converted, variant):
    q8 = argmax_agreement(converted[variant, 8], variant)
    q4 = argmax_agreement(converted[variant, 4], variant)
    MEASURED.append(
        f"{variant}: top-1 agreement with the reference, 8-bit {q8:.1%}, 4-bit {q4:.1%}"
    )
    assert q8 >= 0.95
    assert q4 > 0.3


def test_output_layout_and_config(converted):
    """The layout mlx-vlm reads and writes: official names, every CLIP tensor, OHWI patches."""
    path = converted["tiny-phi35v", 4]
    config = json.loads((path / "config.json").read_text())
    block = {"group_size": 64, "bits": 4, "mode": "affine"}
    assert config["quantization"] == block and config["quantization_config"] == block
    assert config["torch_dtype"] == "bfloat16" and config["model_type"] == "phi3_v"
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json",
                 "generation_config.json", "processor_config.json", "README.md"):  # fmt: skip
        assert (path / name).is_file(), name
    index = json.loads((path / "model.safetensors.index.json").read_text())
    weights = mx.load(str(path / "model.safetensors"))
    assert set(index["weight_map"]) == set(weights)
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in weights.values())
    source = {}
    for shard in sorted((MODELS / "tiny-phi35v").glob("*.safetensors")):
        source.update(mx.load(str(shard)))
    assert {n for n in weights if not n.endswith((".scales", ".biases"))} == set(source)
    assert weights["model.layers.0.self_attn.qkv_proj.weight"].dtype == mx.uint32
    assert "model.embed_tokens.scales" in weights and "lm_head.scales" in weights
    vision = "model.vision_embed_tokens."
    assert weights[f"{vision}img_projection.0.weight"].dtype == mx.bfloat16  # vision kept 16-bit
    clip = f"{vision}img_processor.vision_model."
    assert weights[f"{clip}embeddings.patch_embedding.weight"].shape == (32, 14, 14, 3)
    assert (
        f"{clip}post_layernorm.weight" in weights
        and f"{clip}encoder.layers.2.mlp.fc1.weight" in weights
    )
    assert "pip install -e ." in (path / "README.md").read_text()
    model, _ = phi3v_mlx.load(path)
    assert isinstance(model.language.layers[1].mlp.down_proj, nn.QuantizedLinear)
    assert not isinstance(model.vision.clip.layers[0].mlp.fc1, nn.QuantizedLinear)
    assert len(model.vision.clip.layers) == 2  # the unused CLIP layer is not loaded


def test_quantize_vision_reads_images(tmp_path):
    """--quantize-vision quantizes the CLIP and projector linears (per-module entries under the
    official paths), never the position table, and the model reads an image."""
    path = tmp_path / "qv"
    conv.convert(MODELS / "tiny-phi3v", path, quantize=True, q_bits=8, q_group_size=128,
                 quantize_vision=True, check=False, log=lambda _: None)  # fmt: skip
    quant = json.loads((path / "config.json").read_text())["quantization"]
    assert quant["group_size"] == 128 and quant["bits"] == 8
    # The decoder is 64 wide and the CLIP tower 32: those layers need smaller groups.
    assert quant["model.layers.0.self_attn.qkv_proj"] == {"group_size": 64, "bits": 8}
    clip = "model.vision_embed_tokens.img_processor.vision_model."
    assert quant[f"{clip}encoder.layers.2.self_attn.q_proj"] == {"group_size": 32, "bits": 8}
    assert not [k for k in quant if "position_embedding" in k or "patch" in k]
    model, processor = phi3v_mlx.load(path, dtype="float32")
    assert isinstance(model.vision.clip.layers[0].self_attn.q_proj, nn.QuantizedLinear)
    assert model.vision.clip.layers[0].self_attn.q_proj.group_size == 32
    assert isinstance(model.vision.projection.linear_2, nn.QuantizedLinear)
    assert not isinstance(model.vision.clip.embeddings.position_embedding, nn.QuantizedEmbedding)
    reference, _ = phi3v_mlx.load(MODELS / "tiny-phi3v", dtype="float32")
    inputs = case_inputs(processor, "b")
    got, want = model.embed(**inputs), reference.embed(**inputs)
    assert float(mx.abs(got - want).max()) < 0.05 * float(mx.abs(want).max())
    case = MANIFEST["cases"]["b"]
    images = [open_image(n) for n in case["images"]]
    result = phi3v_mlx.generate(
        model, processor, case["text"], images, case["num_crops"], max_tokens=3
    )
    assert len(result.tokens) == 3


def test_quantized_position_table_loads(tmp_path):
    """A checkpoint that stores CLIP's position table quantized (as mlx-vlm may) reads images."""
    path = tmp_path / "qpos"
    conv.convert(MODELS / "tiny-phi3v", path, quantize=True, q_bits=8, check=False,
                 log=lambda _: None)  # fmt: skip
    weights = mx.load(str(path / "model.safetensors"))
    name = "model.vision_embed_tokens.img_processor.vision_model.embeddings.position_embedding"
    weights[f"{name}.weight"], weights[f"{name}.scales"], weights[f"{name}.biases"] = mx.quantize(
        weights[f"{name}.weight"], 32, 8
    )
    mx.save_safetensors(str(path / "model.safetensors"), weights, {"format": "mlx"})
    index = path / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"] = dict.fromkeys(weights, "model.safetensors")
    index.write_text(json.dumps(data))
    config = json.loads((path / "config.json").read_text())
    config["quantization"][name] = {"group_size": 32, "bits": 8}
    (path / "config.json").write_text(json.dumps(config))
    model, processor = phi3v_mlx.load(path, dtype="float32")
    assert isinstance(model.vision.clip.embeddings.position_embedding, nn.QuantizedEmbedding)
    reference, _ = phi3v_mlx.load(MODELS / "tiny-phi3v", dtype="float32")
    inputs = case_inputs(processor, "b")
    got, want = model.embed(**inputs), reference.embed(**inputs)
    assert float(mx.abs(got - want).max()) < 0.05 * float(mx.abs(want).max())


def test_mixed_precision_entries_under_official_paths(converted, tmp_path):
    """mlx-vlm / mlx-lm write per-module entries under the official module paths."""
    path = tmp_path / "mixed"
    shutil.copytree(converted["tiny-phi3v", 4], path)
    weights = mx.load(str(path / "model.safetensors"))
    reference, _ = phi3v_mlx.load(MODELS / "tiny-phi3v", dtype="float32")
    config = json.loads((path / "config.json").read_text())
    modules = {
        "model.layers.0.mlp.down_proj": reference.language.layers[0].mlp.down_proj,
        "lm_head": reference.language.lm_head,
    }
    for module, dense in modules.items():
        weights[f"{module}.weight"], weights[f"{module}.scales"], weights[f"{module}.biases"] = (
            mx.quantize(dense.weight.astype(mx.bfloat16), 32, 8)
        )
        config["quantization"][module] = {"group_size": 32, "bits": 8}
    mx.save_safetensors(str(path / "model.safetensors"), weights, {"format": "mlx"})
    (path / "config.json").write_text(json.dumps(config))
    model, _ = phi3v_mlx.load(path)
    assert model.language.layers[0].mlp.down_proj.bits == 8
    assert model.language.lm_head.bits == 8 and model.language.lm_head.group_size == 32
    assert model.language.layers[1].mlp.down_proj.bits == 4
    ids = mx.array([[1, 32010, 29871, 13, 10994, 29892]])
    assert model(ids).shape == (1, 6, 32064)
    plain = tmp_path / "plain"
    conv.convert(path, plain, dequantize=True, dtype="float32", log=lambda _: None)
    dense, _ = phi3v_mlx.load(plain)
    head = model.language.lm_head
    scales, biases = head.scales.astype(mx.float32), head.biases.astype(mx.float32)
    want = mx.dequantize(head.weight, scales, biases, 32, 8)
    np.testing.assert_array_equal(np.array(dense.language.lm_head.weight), np.array(want))


def test_reads_and_converts_the_older_internal_layout(tmp_path):
    """Checkpoints written by earlier phi3v-mlx releases (this package's tensor names)."""
    model, _ = phi3v_mlx.load(MODELS / "tiny-phi3v")
    old = tmp_path / "old"
    shutil.copytree(MODELS / "tiny-phi3v", old, ignore=shutil.ignore_patterns("*.safetensors*"))
    mx.save_safetensors(str(old / "model.safetensors"), dict(tree_flatten(model.parameters())))
    ids = mx.array([[1, 32010, 29871, 13, 10994, 29892]])

    def logits(m):
        return np.array(m(ids).astype(mx.float32))

    np.testing.assert_array_equal(logits(phi3v_mlx.load(old)[0]), logits(model))
    new = tmp_path / "new"
    conv.convert(old, new, log=lambda _: None)
    assert "model.layers.0.mlp.down_proj.weight" in mx.load(str(new / "model.safetensors"))
    np.testing.assert_array_equal(logits(phi3v_mlx.load(new)[0]), logits(model))


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
    assert len(files) >= 3 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
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
    with pytest.raises(conv.ConvertError, match="holds no model"):
        conv.convert(MODELS / "tiny-phi3v", target, force=True, log=lambda _: None)
    assert (target / "keep.txt").read_text() == "mine"
    (target / "keep.txt").unlink()
    conv.convert(MODELS / "tiny-phi3v", target, log=lambda _: None)
    (target / "extra.txt").write_text("old")
    conv.convert(MODELS / "tiny-phi3v", target, force=True, log=lambda _: None)
    assert not (target / "extra.txt").exists() and (target / "model.safetensors").is_file()
    a_file = tmp_path / "file"
    a_file.write_text("data")
    with pytest.raises(conv.ConvertError, match="is a file"):
        conv.convert(MODELS / "tiny-phi3v", a_file, force=True, log=lambda _: None)
    assert a_file.read_text() == "data"


def test_failed_check_publishes_nothing(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise ValueError("broadcast error")

    monkeypatch.setattr(conv, "fidelity", broken)
    with pytest.raises(ValueError, match="broadcast"):
        conv.convert(MODELS / "tiny-phi3v", tmp_path / "out", quantize=True, log=lambda _: None)
    assert list(tmp_path.iterdir()) == []


def test_stale_partial_folders_are_removed(tmp_path):
    stale = tmp_path / ".out.partial-999999999"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"x" * 100)
    live = tmp_path / f".other.partial-{os.getpid()}"
    live.mkdir()
    conv.convert(MODELS / "tiny-phi3v", tmp_path / "out", log=lambda _: None)
    assert not stale.exists() and live.exists()


def test_sigterm_mid_conversion_leaves_nothing(tmp_path):
    """A terminated conversion removes its partial folder (the writer is slowed down)."""
    script = f"""
import time, sys
sys.path.insert(0, {str(FIXTURES.parents[1])!r})
from phi3v_mlx import convert as conv
original = conv.save_safetensors
def slow(*args):
    print("writing", flush=True)
    time.sleep(60)
conv.save_safetensors = slow
conv.convert({str(MODELS / "tiny-phi3v")!r}, {str(tmp_path / "out")!r}, log=lambda _: None)
"""
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    assert [p.name for p in tmp_path.iterdir()] == [f".out.partial-{proc.pid}"]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143
    assert list(tmp_path.iterdir()) == []


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


def test_mlx_vlm_loads_our_output(converted, monkeypatch):
    """Our 4-bit output is an mlx-vlm checkpoint: it loads there and gives our logits."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    mlx_vlm = mlx_vlm_with_tiny_tower(monkeypatch)
    path = converted["tiny-phi3v", 4]
    theirs, _ = mlx_vlm.load(str(path))
    theirs.update(tree_map(lambda x: x.astype(mx.float32) if x.dtype == mx.bfloat16 else x,
                           theirs.parameters()))  # fmt: skip
    ours, processor = phi3v_mlx.load(path, dtype="float32")
    ids = processor("<|user|>\nWhat is the capital of France?<|end|>\n<|assistant|>\n")["input_ids"]
    np.testing.assert_allclose(np.array(theirs(ids).logits), np.array(ours(ids)), atol=1e-4)


def test_failed_upload_is_one_line_and_keeps_the_output(tmp_path, monkeypatch, capsys):
    class OfflineApi:
        def create_repo(self, repo_id, exist_ok):
            raise OSError("Failed to resolve 'huggingface.co'\n" + "stack frame\n" * 100)

    monkeypatch.setattr("huggingface_hub.HfApi", OfflineApi)
    out = tmp_path / "q"
    args = ["phi3v", "convert", "--hf-path", str(MODELS / "tiny-phi3v"), "--mlx-path", str(out),
            "--upload-repo", "me/tiny"]  # fmt: skip
    monkeypatch.setattr("sys.argv", args)
    with pytest.raises(SystemExit) as done:
        cli.main()
    err = capsys.readouterr().err.strip().splitlines()
    assert done.value.code == 1
    assert err[-1] == (
        f"error: upload to me/tiny failed (Failed to resolve 'huggingface.co'); the converted "
        f"model is kept at {out}"
    )
    assert (out / "model.safetensors").is_file()
