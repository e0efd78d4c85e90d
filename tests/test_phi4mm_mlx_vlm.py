"""mlx-vlm's conversion of Phi-4-multimodal, made here by mlx-vlm's own converter from the tiny
checkpoint laid out as the Hub's remote code: refused in one line naming the option, loaded when
asked with one line on what differs from the reference; its decoder holds the base plus both
adapters (scale * B A each), its audio path is the checkpoint's, images are refused."""

import json
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from PIL import Image

import phi3v_mlx
from phi3v_mlx import cli
from phi3v_mlx.generate import chat_prompt
from phi3v_mlx.loader import load_model, read_weights, weight_files
from phi3v_mlx.models.phi4mm import ModelConfig, extra_weights
from phi3v_mlx.models.phi4mm.adapters import ADAPTERS, TARGETS, using
from tests.test_phi4mm import remote_layout
from tests.test_speech import speech_checkpoint

FIXTURES = Path(__file__).parent / "fixtures" / "phi4mm"
CHECKPOINT = FIXTURES / "models" / "tiny-phi4mm"
IMAGE = FIXTURES / "images" / "d_tiny.png"
CLIP = FIXTURES / "audio" / "speech16k_1p0s.wav"


def hub_checkpoint(folder: Path) -> Path:
    """The tiny checkpoint as the Hub's main branch lays it out (adapters inside the decoder as
    base_layer / lora_A.vision ..., the adapter folders beside), in float32, with the stand-in
    tokenizer."""
    tokenizer = speech_checkpoint(folder.parent / "tokenizer")
    values = json.loads((CHECKPOINT / "config.json").read_text())
    config = ModelConfig.from_dict(values)
    weights = {**read_weights(weight_files(CHECKPOINT)), **extra_weights(CHECKPOINT, config)}
    hub = {name: value.astype(mx.float32) for name, value in remote_layout(weights).items()}
    folder.mkdir(parents=True)
    mx.save_safetensors(str(folder / "model.safetensors"), hub)
    audio = values.pop("audio_config")
    values.update(
        model_type="phi4mm",
        dtype="float32",
        torch_dtype="float32",
        mm_hidden_size=values["vision_config"]["hidden_size"],
        embd_layer={"image_embd_layer": {"crop_size": 448}, "audio_embd_layer": {}},
        vision_lora={"r": config.vision_lora.r, "lora_alpha": config.vision_lora.lora_alpha},
        speech_lora={"r": config.speech_lora.r, "lora_alpha": config.speech_lora.lora_alpha},
        audio_processor={"config": {
            "attention_dim": audio["hidden_size"], "attention_heads": audio["num_attention_heads"],
            "num_blocks": audio["num_blocks"], "linear_units": audio["intermediate_size"],
            "ext_pw_out_channel": audio["ext_pw_out_channel"],
            "depthwise_seperable_out_channel": audio["depthwise_separable_out_channel"],
            "conv_channels": audio["nemo_conv_channels"],
            "nemo_conv_settings": {"conv_channels": audio["nemo_conv_channels"]},
            "t5_bias_max_distance": audio["bias_max_distance"],
            "relative_attention_bias_args": {"type": "t5",
                                             "t5_bias_max_distance": audio["bias_max_distance"]},
        }},
    )  # fmt: skip
    (folder / "config.json").write_text(json.dumps(values))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tokenizer / name, folder)
    for name in ("generation_config.json", "preprocessor_config.json"):
        shutil.copy(CHECKPOINT / name, folder)
    for name in ("vision-lora", "speech-lora"):
        shutil.copytree(CHECKPOINT / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    return hub_checkpoint(tmp_path_factory.mktemp("hub") / "Phi-4-multimodal-instruct")


def mlx_vlm_convert(hub: Path, out: Path, **options) -> Path:
    """mlx-vlm's converter on ``hub`` (its processor, which needs the remote code, replaced by
    the tokenizer: the converter only saves it)."""
    import mlx_vlm.utils
    from mlx_vlm.convert import convert
    from transformers import PreTrainedTokenizerFast

    def tokenizer(path, **options):
        return PreTrainedTokenizerFast.from_pretrained(str(path))

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(mlx_vlm.utils, "load_processor", tokenizer)
        convert(str(hub), str(out), **options)
    return out


@pytest.fixture(scope="module")
def converted(hub, tmp_path_factory):
    return mlx_vlm_convert(hub, tmp_path_factory.mktemp("mlx-vlm") / "converted")


@pytest.fixture(scope="module")
def merged(converted):
    return phi3v_mlx.load(converted, dtype="float32", allow_merged_adapters=True)


@pytest.fixture(scope="module")
def reference():
    return phi3v_mlx.load(CHECKPOINT, dtype="float32")[0]


def adapted_linears(model):
    for i, layer in enumerate(model.language.layers):
        for block, name in TARGETS:
            yield f"language.layers.{i}.{block}.{name}", getattr(getattr(layer, block), name)


def folded(linear) -> mx.array:
    """A modality-adapted linear's weight with both adapters added: base + scale * B A each."""
    weight = linear.base_layer.weight
    for name in ADAPTERS:
        weight = weight + linear.scale[name] * (linear.lora_B[name] @ linear.lora_A[name])
    return weight


def test_the_converter_writes_what_we_expect(converted):
    names = set(mx.load(str(converted / "model.safetensors")))
    assert "language_model.model.layers.0.self_attn.qkv_proj.weight" in names
    assert not any("lora_" in n or "base_layer" in n or "GN" in n for n in names)
    assert (converted / "vision-lora").is_dir()  # copied beside: already merged, to be ignored


def test_refused_in_one_line_naming_the_option(converted):
    with pytest.raises(ValueError) as error:
        phi3v_mlx.load(converted)
    message = str(error.value)
    assert "mlx-vlm's conversion" in message and "allow_merged_adapters=True" in message
    assert "--allow-merged-adapters" in message and "\n" not in message


def test_loaded_when_asked_with_one_line_on_what_differs(converted, capfd):
    model = load_model(converted, allow_merged_adapters=True)
    lines = capfd.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("note: mlx-vlm's conversion"), lines
    assert "merged" in lines[0] and "text-only and audio prompts" in lines[0]
    assert "image prompts are refused" in lines[0]
    assert not model.adapter_configs and "image_embed" not in model


def test_the_decoder_holds_the_base_plus_both_adapters(merged, reference):
    model, _ = merged
    ours = dict(adapted_linears(model))
    x = mx.random.normal((3, ours["language.layers.0.self_attn.qkv_proj"].weight.shape[1]),
                         key=mx.random.key(0))  # fmt: skip
    for name, linear in adapted_linears(reference):
        merged_linear = ours[name]
        assert isinstance(merged_linear, nn.Linear), name
        expected = folded(linear)
        assert not mx.allclose(expected, linear.base_layer.weight, atol=1e-4), name
        np.testing.assert_allclose(merged_linear.weight, expected, atol=1e-6, err_msg=name)
        x = mx.random.normal((3, linear.base_layer.weight.shape[1]), key=mx.random.key(1))
        both = linear.base_layer(x) + sum(linear.delta(x, adapter) for adapter in ADAPTERS)
        np.testing.assert_allclose(merged_linear(x), both, atol=1e-5, err_msg=name)


def test_every_other_tensor_is_the_checkpoints(merged, reference):
    ours = dict(tree_flatten(merged[0].parameters()))
    theirs = dict(tree_flatten(reference.parameters()))
    adapted = {f"{name}.weight" for name, _ in adapted_linears(reference)}
    assert set(ours) - set(theirs) == adapted
    assert {n for n in set(theirs) - set(ours) if not n.startswith("image_embed.")} == {
        n for n in theirs if ".base_layer." in n or ".lora_" in n
    }
    for name in set(ours) - adapted:
        assert mx.array_equal(ours[name], theirs[name]), name


def fold_adapters(model):
    """``model`` (the unmerged reference) with both adapters added into its base weights."""
    for _, linear in adapted_linears(model):
        linear.base_layer.weight = folded(linear)
    return model


@pytest.fixture(scope="module")
def folded_reference():
    return fold_adapters(phi3v_mlx.load(CHECKPOINT, dtype="float32")[0])


def test_text_generation_is_the_adapters_folded_in(merged, folded_reference):
    model, processor = merged
    prompt = chat_prompt(processor, "Hello, how are you?")
    result = phi3v_mlx.generate(model, processor, prompt, max_tokens=6)
    assert len(result.tokens) == 6
    want = phi3v_mlx.generate(folded_reference, processor, prompt, max_tokens=6)
    assert result.tokens == want.tokens and result.text == want.text


def test_audio_runs_with_the_merged_weights_and_the_speech_projection(merged, folded_reference):
    model, processor = merged
    inputs = processor(chat_prompt(processor, "What is said?", audios=1), audios=[CLIP])
    media = {k: v for k, v in inputs.items() if k != "input_ids"}
    assert model.adapter_key(media) is None
    logits = model(input_ids=inputs["input_ids"], **media)
    with using(None):  # the folded reference: no adapter on top, the same audio embeddings
        want = folded_reference.language(folded_reference.embed(inputs["input_ids"], **media))
    np.testing.assert_allclose(logits, want, atol=1e-4)
    result = phi3v_mlx.generate(model, processor, chat_prompt(processor, "Hi", audios=1),
                                audios=[CLIP], max_tokens=3)  # fmt: skip
    assert len(result.tokens) == 3


def test_image_prompts_are_refused_in_one_line(merged):
    model, processor = merged
    image = Image.open(IMAGE)
    for audios in ([], [CLIP]):
        prompt = chat_prompt(processor, "What is it?", images=1, audios=len(audios))
        with pytest.raises(ValueError) as error:
            phi3v_mlx.generate(model, processor, prompt, images=[image], audios=audios or None,
                               max_tokens=2)  # fmt: skip
        assert "no image separators (glb_GN, sub_GN" in str(error.value)
        assert "\n" not in str(error.value)
    pre = processor.preprocess([image])
    with pytest.raises(ValueError, match="no image separators"):
        model.encode_images(pre.pixel_values, pre.image_sizes)


def test_a_batch_of_text_and_audio_equals_each_alone_and_images_are_refused(merged):
    model, processor = merged
    requests = [
        {"prompt": chat_prompt(processor, "Hello"), "max_tokens": 4},
        {"prompt": chat_prompt(processor, "What is said?", audios=1), "audios": [CLIP],
         "max_tokens": 4},
    ]  # fmt: skip
    results = phi3v_mlx.batch_generate(model, processor, requests)
    for request, result in zip(requests, results, strict=True):
        alone = phi3v_mlx.generate(model, processor, request["prompt"], max_tokens=4,
                                   audios=request.get("audios"))  # fmt: skip
        assert result.tokens == alone.tokens
    image = {"prompt": chat_prompt(processor, "What is it?", images=1), "images": [IMAGE]}
    with pytest.raises(ValueError, match="request 2: this checkpoint has no image separators"):
        phi3v_mlx.batch_generate(model, processor, [requests[0], image])


def test_the_cli_refuses_then_loads_with_the_flag(merged, converted, capfd, monkeypatch):
    model, processor = merged
    base = ["generate", "--model", str(converted), "--dtype", "float32", "-p", "Hello",
            "--max-tokens", "4"]  # fmt: skip
    for extra, code in (([], 1), (["--allow-merged-adapters"], 0)):
        monkeypatch.setattr("sys.argv", ["phi3v", *base, *extra])
        with pytest.raises(SystemExit) as exit_info:
            cli.main()
        assert exit_info.value.code == code
        out, err = capfd.readouterr()
        lines = err.splitlines()
        assert len(lines) == 1, lines
        if code:
            assert lines[0].startswith("error: this is mlx-vlm's conversion")
            assert "--allow-merged-adapters" in lines[0]
        else:
            assert lines[0].startswith("note: mlx-vlm's conversion")
            want = phi3v_mlx.generate(model, processor, chat_prompt(processor, "Hello"),
                                      max_tokens=4)  # fmt: skip
            assert out == want.text + "\n"


@pytest.mark.parametrize(
    "options", [{"q_bits": 4, "q_group_size": 64}, {"quant_predicate": "mixed_3_6"}]
)
def test_a_quantized_conversion_loads_when_asked(hub, merged, tmp_path, options):
    out = mlx_vlm_convert(hub, tmp_path / "quantized", quantize=True, **options)
    quantization = json.loads((out / "config.json").read_text())["quantization"]
    model, processor = load_model(out, allow_merged_adapters=True), merged[1]
    modules = dict(model.named_modules())
    full = dict(merged[0].named_modules())
    layers = [(key, value) for key, value in quantization.items() if isinstance(value, dict)]
    for key, value in layers or [("language_model.model.layers.0.self_attn.qkv_proj", {})]:
        name = model.internal_name(f"{key}.")
        if name is None:  # the image tower's projection: not loaded
            assert key.startswith("mm_projector.")
            continue
        module = modules[name[:-1]]
        bits = value.get("bits", quantization["bits"])
        assert isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)), key
        assert module.bits == bits, key
        weight = mx.dequantize(module.weight, module.scales, module.biases, 64, bits)
        exact = full[name[:-1]].weight
        bound = 2 * float(mx.abs(exact).max()) / (2**bits - 1)  # one quantization step
        assert float(mx.abs(weight - exact).max()) <= bound, key
    for audios in ([], [CLIP]):
        prompt = chat_prompt(processor, "Hello", audios=len(audios))
        result = phi3v_mlx.generate(model, processor, prompt, audios=audios or None, max_tokens=3)
        assert len(result.tokens) == 3
