"""Phi-4-multimodal against the reference goldens (tests/fixtures/phi4mm, from transformers'
Phi4MultimodalForCausalLM with its PEFT adapters): the image processor, the image embeddings,
logits with the adapter each input mix selects, cached greedy decoding across the rope switch,
per-row adapters in a batch, both checkpoint layouts, and prompt text to ids."""

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import BatchKVCache
from PIL import Image

import phi3v_mlx
from phi3v_mlx.cache import RopeState
from phi3v_mlx.generate import SamplingOptions
from phi3v_mlx.models.phi4mm import ModelConfig, load_processor
from phi3v_mlx.models.phi4mm.adapters import using
from phi3v_mlx.models.phi4mm.images import crop_grid
from phi3v_mlx.models.phi4mm.model import to_slots
from phi3v_mlx.processor import PromptError
from tests.test_speech import speech_checkpoint

FIXTURES = Path(__file__).parent / "fixtures" / "phi4mm"
CHECKPOINT = FIXTURES / "models" / "tiny-phi4mm"
MANIFEST = json.loads((FIXTURES / "golden" / "manifest.json").read_text())
TOL = dict(atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def loaded():
    return phi3v_mlx.load(CHECKPOINT, dtype="float32")


@pytest.fixture(scope="module")
def model(loaded):
    return loaded[0]


def golden(case):
    inputs = np.load(FIXTURES / "golden" / "inputs" / f"case_{case}.npz")
    return inputs, np.load(FIXTURES / "golden" / "tiny-phi4mm" / f"case_{case}.npz")


def media(inputs):
    """The model's media inputs from a golden inputs file (pixels channels-last)."""
    out = {}
    if "image_pixel_values" in inputs.files:
        out["pixel_values"] = mx.array(inputs["image_pixel_values"].transpose(0, 1, 3, 4, 2))
        out["image_sizes"] = mx.array(inputs["image_sizes"])
        out["image_attention_mask"] = mx.array(inputs["image_attention_mask"])
    if "audio_input_features" in inputs.files:
        out["audio_features"] = mx.array(inputs["audio_input_features"])
        out["audio_embed_sizes"] = mx.array(inputs["audio_embed_sizes"])
    return out


def open_images(case):
    return [Image.open(FIXTURES / "images" / f"{n}.png") for n in MANIFEST["cases"][case]["images"]]


def assert_processed(out, gold):
    np.testing.assert_array_equal(out["image_sizes"], gold["image_sizes"])
    np.testing.assert_array_equal(out["num_img_tokens"], gold["num_img_tokens"])
    np.testing.assert_array_equal(out["image_attention_mask"], gold["image_attention_mask"])
    pixels = gold["image_pixel_values"].transpose(0, 1, 3, 4, 2)
    for i, (height, width) in enumerate(gold["image_sizes"]):
        real = 1 + (height // 448) * (width // 448)
        np.testing.assert_allclose(out["pixel_values"][i, :real], pixels[i, :real], atol=1e-5)


@pytest.mark.parametrize("name", ["p_rgb_1000x1000_hd4", "p_rgba_520x470_hd36", "p_p_900x200_hd36"])
def test_image_processor_matches_the_reference(loaded, name):
    image, hd = name.rsplit("_hd", 1)
    out = loaded[1].image_processor([Image.open(FIXTURES / "images" / f"{image}.png")], int(hd))
    assert_processed(out, np.load(FIXTURES / "golden" / "processor" / f"{name}.npz"))


@pytest.mark.parametrize("case", ["b", "d", "e"])
def test_case_images_are_processed_as_the_reference(loaded, case):
    assert_processed(loaded[1].image_processor(open_images(case)), golden(case)[0])


def test_crop_grid_rules():
    assert crop_grid(900, 200, 36) == (3, 1)
    assert crop_grid(1000, 1000, 4) == (2, 2)  # (1, 1) and (2, 2) tie on shape: area decides
    assert crop_grid(100, 100, 4) == (1, 1)


def test_preprocess_and_encode_images_as_shared_code_calls_them(loaded):
    model, processor = loaded
    inputs, gold = golden("e")
    assert processor.crops(None) == 36
    pre = processor.preprocess(open_images("e"))
    assert pre.num_tokens == inputs["num_img_tokens"].tolist()
    features = model.encode_images(pre.pixel_values, pre.image_sizes)
    np.testing.assert_allclose(mx.concatenate(features), gold["image_embeds"], **TOL)
    with pytest.raises(ValueError, match="placement"):
        model.encode_images(pre.pixel_values, [size[:2] for size in pre.image_sizes])


def test_text_only_runs_the_base_decoder(model):
    inputs, gold = golden("a")
    assert model.adapter_key({}) is None
    logits = np.array(model(input_ids=mx.array(inputs["input_ids"])))[0]
    np.testing.assert_allclose(logits[-1], gold["logits"][0], **TOL)
    top5 = np.take_along_axis(logits, gold["top5_ids"].astype(np.int64), -1)
    np.testing.assert_allclose(top5, gold["top5_logits"], **TOL)


def hidden_and_last_logits(model, inputs):
    ids = inputs["input_ids"]
    given = media(inputs)
    with using(model.adapter_key(given)):
        h = model.hidden(model.embed(ids, **given))
    return np.array(h[0]), np.array(model.logits(h[:, -1:]))[0, 0]


@pytest.mark.parametrize("case", ["b", "d", "e"])
def test_image_cases_run_the_vision_adapter(model, case):
    inputs, gold = golden(case)
    given = media(inputs)
    assert model.adapter_key(given) == "vision"
    features = model.encode(given)
    assert [len(f) for f in features] == inputs["num_img_tokens"].tolist()
    np.testing.assert_allclose(mx.concatenate(features), gold["image_embeds"], **TOL)
    ids = inputs["input_ids"][0].copy()
    to_slots(ids, 200010, [len(f) for f in features], 0, "image")
    with using("vision"):
        h = model.hidden(model.merge(mx.array(ids[None]), features))
    np.testing.assert_allclose(np.array(h[0]), gold["final_hidden"], **TOL)
    np.testing.assert_allclose(np.array(model.logits(h[:, -1:]))[0, 0], gold["logits"][0], **TOL)


@pytest.mark.parametrize(("case", "adapter"), [("s1", "speech"), ("s3", "vision")])
def test_audio_cases_run_their_adapter_and_projection(model, case, adapter):
    inputs = np.load(FIXTURES / "golden" / "inputs" / f"case_{case}.npz")
    gold = np.load(FIXTURES / "golden" / "tiny-phi4mm" / f"case_{case}.npz")
    assert model.adapter_key(media(inputs)) == adapter
    h, last = hidden_and_last_logits(model, inputs)
    np.testing.assert_allclose(h, gold["final_hidden"], **TOL)
    np.testing.assert_allclose(last, gold["logits"][0], **TOL)


def test_greedy_with_a_cache_across_the_rope_switch(model):
    inputs, gold = golden("b")  # 500 prompt positions: steps 13.. run past 512 (long factors)
    given = media(inputs)
    cache = model.make_cache()
    cache.adapter = model.adapter_key(given)
    h = model.hidden(model.embed(inputs["input_ids"], **given), cache)
    tokens = [int(mx.argmax(model.logits(h[:, -1:])[0, -1]))]
    while len(tokens) < len(gold["greedy_tokens"]):
        logits = model(input_ids=mx.array([tokens[-1:]]), cache=cache)  # the cache's adapter
        tokens.append(int(mx.argmax(logits[0, -1])))
    assert tokens == gold["greedy_tokens"].tolist()


def test_a_cache_keeps_the_adapter_its_media_chose(model):
    inputs = np.load(FIXTURES / "golden" / "inputs" / "case_s1.npz")
    gold = np.load(FIXTURES / "golden" / "tiny-phi4mm" / "case_s1.npz")
    cache = model.make_cache()
    logits = model(input_ids=mx.array(inputs["input_ids"]), cache=cache, **media(inputs))
    assert cache.adapter == "speech"
    np.testing.assert_allclose(np.array(logits[0, -1]), gold["logits"][0], **TOL)
    with pytest.raises(ValueError, match="adapter 'speech'"):
        model(input_ids=mx.array([[1]]), cache=cache, **media(golden("d")[0]))


@pytest.mark.parametrize("case", ["d", "s1"])
def test_generate_runs_the_adapter_of_its_media(loaded, case):
    model, processor = loaded
    inputs = np.load(FIXTURES / "golden" / "inputs" / f"case_{case}.npz")
    gold = np.load(FIXTURES / "golden" / "tiny-phi4mm" / f"case_{case}.npz")
    clips = [
        np.load(FIXTURES / "golden" / "audio_features" / f"{name}.npz")["waveform"]
        for name in MANIFEST["cases"][case].get("audios", [])
    ]
    result = phi3v_mlx.generate(
        model,
        processor,
        input_ids=inputs["input_ids"][0].tolist(),
        images=open_images(case) or None,
        audios=clips or None,
        max_tokens=len(gold["greedy_tokens"]),
        temperature=0.0,
    )
    assert result.tokens == gold["greedy_tokens"].tolist()
    assert result.text == ""  # the fixture has no tokenizer: ids only


def test_batch_rows_get_their_own_adapter(model):
    x = mx.random.normal((1, 7, model.config.hidden_size), key=mx.random.key(0))
    solo = {}
    for key in ("vision", "speech"):
        with using(key):
            solo[key] = model.hidden(x)
    plain = model.hidden(x)
    with using(("speech", None, "vision")):
        batch = model.hidden(mx.concatenate([x, x, x]))
    for row, expected in enumerate([solo["speech"], plain, solo["vision"]]):
        np.testing.assert_allclose(batch[row], expected[0], atol=1e-5)
    assert float(mx.abs(solo["vision"] - plain).max()) > 0.1  # the adapters are not merged


def test_a_batch_step_runs_each_row_with_its_adapter(model):
    rng = np.random.default_rng(5)
    rows = [(rng.integers(1000, 9000, n).astype(np.int32), key)
            for n, key in ((512, "vision"), (40, None), (75, "speech"))]  # fmt: skip
    caches = []
    for ids, key in rows:
        cache = model.make_cache()
        cache.adapter = key
        model.hidden(model.embed_tokens(mx.array(ids[None])), cache)
        caches.append(cache)
    batch = [BatchKVCache.merge([c[i] for c in caches]) for i in range(len(model.layers))]
    batch.append(RopeState.merge([c.rope for c in caches]))
    step = mx.array([[7], [11], [13]])
    logits = np.array(model.batch_logits(model.embed_tokens(step), batch))  # row 0 passes 512
    for row, (ids, key) in enumerate(rows):
        with using(key):
            h = model.hidden(
                model.embed_tokens(mx.array(np.append(ids, step[row, 0].item())[None]))
            )
        np.testing.assert_allclose(
            logits[row, 0], np.array(model.logits(h[:, -1:]))[0, 0], atol=1e-4
        )


def test_a_fine_tuning_adapter_goes_under_the_modality_adapters(model):
    from mlx.utils import tree_flatten

    from phi3v_mlx.adapters import AdapterSettings, add_adapters

    tuned, _ = phi3v_mlx.load(CHECKPOINT, dtype="float32")
    add_adapters(tuned, AdapterSettings())
    trainable = [name for name, _ in tree_flatten(tuned.trainable_parameters())]
    assert trainable and all(".base_layer.lora_" in name for name in trainable)
    x = mx.random.normal((1, 5, model.config.hidden_size), key=mx.random.key(1))
    with using("vision"):  # a new adapter starts at zero: the vision adapter's output, unchanged
        np.testing.assert_allclose(tuned.hidden(x), model.hidden(x), atol=1e-6)


def test_a_4bit_base_keeps_its_adapters_and_the_top_choice():
    import mlx.nn as nn

    quantized, _ = phi3v_mlx.load(CHECKPOINT, dtype="float32")
    nn.quantize(quantized.language, group_size=32, bits=4,
                class_predicate=lambda path, m: isinstance(m, nn.Linear))  # fmt: skip
    qkv = quantized.language.layers[0].self_attn.qkv_proj
    assert isinstance(qkv.base_layer, nn.QuantizedLinear)
    assert qkv.lora_A["vision"].dtype == mx.float32
    inputs, gold = golden("d")
    given = media(inputs)
    with using("vision"):
        h = quantized.hidden(quantized.embed(inputs["input_ids"], **given))
    assert int(mx.argmax(quantized.logits(h[:, -1:])[0, 0])) == int(gold["argmax"][-1])


# The fixture's native names -> the Hub's remote-code names (what its remote code and mlx-vlm's
# converter read): the image and audio parts, and the conformer's layers.
HUB_NAMES = [
    ("image_embed.global_img_feature_extensor", "image_embed.glb_GN"),
    ("image_embed.sub_img_feature_extensor", "image_embed.sub_GN"),
    ("image_embed.img_projection_up.", "image_embed.img_projection.0."),
    ("image_embed.img_projection_down.", "image_embed.img_projection.2."),
    ("audio_embed.up_proj_for_speech.", "audio_embed.audio_projection.speech.0."),
    ("audio_embed.down_proj_for_speech.", "audio_embed.audio_projection.speech.2."),
    ("audio_embed.up_proj_for_vision_speech.", "audio_embed.audio_projection.vision.0."),
    ("audio_embed.down_proj_for_vision_speech.", "audio_embed.audio_projection.vision.2."),
]
HUB_ENCODER_NAMES = [
    (".gate_up_proj.", ".net.0.linear."),
    (".down_proj.", ".net.2."),
    (".self_attn.q_proj.", ".self_attn.linear_q."),
    (".self_attn.k_proj.", ".self_attn.linear_k."),
    (".self_attn.v_proj.", ".self_attn.linear_v."),
    (".self_attn.o_proj.", ".self_attn.linear_out."),
]


def remote_layout(weights):
    """The fixture's tensors (adapters from its folders) as the Hub's remote code names them:
    the adapted decoder layers' own weights as ``base_layer``."""
    out = {}
    for name, value in weights.items():
        encoder = "audio_embed.encoder." in name
        for old, new in HUB_NAMES + (HUB_ENCODER_NAMES if encoder else []):
            name = name.replace(old, new)
        if name.startswith("model.layers.") and "lora_" not in name:
            for target in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"):
                name = name.replace(f".{target}.weight", f".{target}.base_layer.weight")
        out[name] = value
    return out


def test_both_layouts_and_our_own_load_to_the_same_tensors(model):
    from phi3v_mlx.loader import read_weights, weight_files
    from phi3v_mlx.models.phi4mm import Model, extra_weights

    native_config = ModelConfig.from_dict(json.loads((CHECKPOINT / "config.json").read_text()))
    weights = {**read_weights(weight_files(CHECKPOINT)), **extra_weights(CHECKPOINT, native_config)}
    remote = remote_layout(weights)
    assert any(".lora_A.vision." in k for k in remote) and "glb_GN" in "".join(remote)
    values = json.loads((CHECKPOINT / "config.json").read_text())
    remote_config = {k: v for k, v in values.items() if k not in ("vision_config", "audio_config")}
    remote_config.update(
        model_type="phi4mm",
        embd_layer={"image_embd_layer": {"crop_size": 448}, "audio_embd_layer": {}},
        vision_lora={"r": 8, "lora_alpha": 16},
        speech_lora={"r": 10, "lora_alpha": 20},
        audio_processor={"config": {"attention_dim": 32, "attention_heads": 2}},
    )
    config = ModelConfig.from_dict(remote_config)
    assert config.vision_lora.scale == config.speech_lora.scale == 2.0
    assert config.audio_config.hidden_size == 32
    # the tiny checkpoint's vision tower is not SigLIP-400M: give the remote model its size
    config.vision_config = native_config.vision_config
    config.audio_config = native_config.audio_config
    expected = model.sanitize(weights)
    written = model.official_weights(weights)  # what the converter saves
    assert any(".lora_B.speech." in k for k in written)
    assert all(k.startswith("model.") for k in written)
    for tensors in (Model(config).sanitize(remote), model.sanitize(written)):
        assert sorted(tensors) == sorted(expected)
        for name, value in expected.items():
            assert mx.array_equal(tensors[name], value), name


def test_a_checkpoint_without_adapters_refuses_media_but_reads_text():
    from phi3v_mlx.models.phi4mm import Model

    bare = Model(ModelConfig.from_dict(json.loads((CHECKPOINT / "config.json").read_text())))
    assert bare.adapter_key({}) is None
    with pytest.raises(ValueError, match="no vision adapter"):
        bare.adapter_key({"pixel_values": mx.zeros((1,))})
    with pytest.raises(ValueError, match="no speech adapter"):
        bare.adapter_key({"audio_features": mx.zeros((1,))})


def test_splitting_across_ranks_is_refused_in_one_line(model):
    with pytest.raises(ValueError, match="cannot be split across ranks"):
        model.shard(None)


def test_an_mlx_vlm_conversion_is_refused_in_one_line(model):
    with pytest.raises(ValueError, match="mlx-vlm's conversion"):
        model.sanitize({"language_model.model.norm.weight": mx.ones(64)})


def test_remote_config_defaults_to_siglip_400m():
    config = ModelConfig.from_dict(
        {**json.loads((CHECKPOINT / "config.json").read_text()), "model_type": "phi4mm"}
        | {"embd_layer": {"image_embd_layer": {"crop_size": 448}}, "vision_config": None}
    )
    vision = config.vision_config
    assert (vision.hidden_size, vision.num_hidden_layers, vision.layers_used) == (1152, 27, 26)


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    """The checkpoint's processor with the stand-in Phi-4 tokenizer, the image and audio
    placeholders added to its vocabulary and added tokens."""
    folder = speech_checkpoint(tmp_path_factory.mktemp("stand-in") / "tiny-phi4mm")
    config = ModelConfig.from_dict(json.loads((folder / "config.json").read_text()))
    return load_processor(folder, config)


def test_prompt_text_becomes_the_reference_ids(processor):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi!"}]}]
    prompt = processor.apply_chat_template(messages)
    assert prompt == "<|user|><|image_1|>Hi!<|end|><|assistant|>"
    image = Image.open(FIXTURES / "images" / "d_tiny.png")
    out = processor(prompt, images=[image])
    ids = np.array(out["input_ids"])[0]
    count = int(out["num_img_tokens"][0])
    assert (ids == -1).sum() == count == 341
    # the reference tokenizes the prompt whole, each tag replaced by a run of placeholders
    expected = processor.tokenizer.encode(prompt.replace("<|image_1|>", "<|endoftext10|>" * count))
    assert np.where(ids < 0, 200010, ids).tolist() == expected
    assert {200020, 199999} <= processor.stop_ids


def test_a_text_prompt_generates_text(model, processor):
    prompt = processor.apply_chat_template([{"role": "user", "content": "Hello"}])
    result = phi3v_mlx.generate(model, processor, prompt, max_tokens=4, temperature=0.0)
    assert len(result.tokens) == 4
    assert result.text == processor.tokenizer.decode(result.tokens, skip_special_tokens=True)


def test_a_mixed_batch_equals_each_request_alone(model, processor):
    image = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]}]
    )
    text = processor.apply_chat_template([{"role": "user", "content": "Hi"}])
    requests = [
        phi3v_mlx.Request(text),
        phi3v_mlx.Request(image, images=[Image.open(FIXTURES / "images" / "d_tiny.png")]),
        phi3v_mlx.Request(image, images=[Image.open(FIXTURES / "images" / "e_first.png")]),
    ]
    batch = phi3v_mlx.batch_generate(model, processor, requests, max_tokens=3, temperature=0.0)
    for request, result in zip(requests, batch, strict=True):
        alone = phi3v_mlx.generate(
            model, processor, request.prompt, images=list(request.images) or None,
            max_tokens=3, temperature=0.0,
        )  # fmt: skip
        assert result.tokens == alone.tokens


def test_image_and_audio_tags_become_their_slots(processor):
    messages = [
        {
            "role": "user",
            "content": [{"type": "audio"}, {"type": "image"}, {"type": "text", "text": "?"}],
        }
    ]
    prompt = processor.apply_chat_template(messages)
    assert prompt.startswith("<|user|><|audio_1|><|image_1|>?")
    image = Image.open(FIXTURES / "images" / "d_tiny.png")
    out = processor(prompt, images=image, audios=FIXTURES / "audio" / "speech16k_1p0s.wav")
    ids = np.array(out["input_ids"])[0]
    assert ids[0] == 200021 and (ids[1:14] == -2).all() and (ids[14:355] == -1).all()
    assert out["audio_embed_sizes"].tolist() == [13] and out["audio_attention_mask"] is None


def test_id_prompts_and_tag_errors(processor):
    inputs, _ = golden("d")
    image = Image.open(FIXTURES / "images" / "d_tiny.png")
    out = processor(inputs["input_ids"][0].tolist(), images=[image])
    expected = np.where(inputs["input_ids"][0] == 200010, -1, inputs["input_ids"][0])
    np.testing.assert_array_equal(np.array(out["input_ids"])[0], expected)
    short = inputs["input_ids"][0].tolist()
    short.remove(200010)
    with pytest.raises(ValueError, match="has 340 image placeholder tokens"):
        processor(short, images=[image])
    with pytest.raises(PromptError, match="in order"):
        processor("<|user|><|image_2|>x<|end|>", images=[image])
    with pytest.raises(PromptError, match="0 audio"):
        processor("<|user|><|audio_1|>x<|end|>")


def test_a_4bit_conversion_keeps_the_adapters_16bit_and_reloads(tmp_path):
    import mlx.nn as nn

    from phi3v_mlx.convert import convert

    out = tmp_path / "phi4mm-4bit"
    convert(str(CHECKPOINT), str(out), quantize=True, q_group_size=32, check=False)
    config = json.loads((out / "config.json").read_text())
    assert config["vision_lora"]["r"] > 0 and config["speech_lora"]["r"] > 0
    model, _ = phi3v_mlx.load(out, dtype="float32")
    qkv = model.language.layers[0].self_attn.qkv_proj
    assert isinstance(qkv.base_layer, nn.QuantizedLinear)
    assert set(qkv.lora_A) == {"vision", "speech"}
    assert not any(isinstance(m, nn.QuantizedLinear) for _, m in model.image_embed.named_modules())
    inputs, gold = golden("d")
    logits = model(input_ids=inputs["input_ids"], **media(inputs))
    assert int(mx.argmax(logits[0, -1])) == int(gold["argmax"][-1])


def test_prompt_pieces_ride_with_rows_of_other_adapters(model, processor, monkeypatch):
    """In an interleaved engine, an image prompt (vision adapter) and a recording (speech
    adapter) arriving while a text answer (no adapter) decodes are read in the decoding steps'
    forwards, each position with its own adapter, and every answer is generate()'s."""
    together = []
    original = type(model.language).mixed

    def counting(self, embeddings, *args):
        together.append(embeddings.shape[1])
        return original(self, embeddings, *args)

    monkeypatch.setattr(type(model.language), "mixed", counting)
    clip = FIXTURES / "audio" / "speech16k_1p0s.wav"
    image = Image.open(FIXTURES / "images" / "d_tiny.png")

    def chat(*parts):
        return processor.apply_chat_template([{"role": "user", "content": [*parts, {
            "type": "text", "text": "What is it?"}]}])  # fmt: skip

    talk = phi3v_mlx.Request(chat(), options={"max_tokens": 30})
    arriving = [phi3v_mlx.Request(chat({"type": "image"}), images=[image]),
                phi3v_mlx.Request(chat({"type": "audio"}), audios=[clip])]  # fmt: skip
    options = SamplingOptions(max_tokens=4, prefill_step_size=64, temperature=0.0)
    engine = phi3v_mlx.BatchEngine(model, processor, batch_size=4, interleave=True)
    running = engine.submit(talk, SamplingOptions(max_tokens=30, temperature=0.0))
    while not engine.step():
        pass
    rows = [engine.submit(request, options) for request in arriving]
    ended = {}
    while engine.pending():
        ended.update({e.row: e.result for e in engine.step() if e.result is not None})
    engine.close()
    assert len(together) >= 6  # the image prompt alone is 6 pieces of 64
    for row, request, limit in zip([running, *rows], [talk, *arriving], [30, 4, 4], strict=True):
        alone = phi3v_mlx.generate(
            model, processor, request.prompt, images=list(request.images) or None,
            audios=list(request.audios) or None, max_tokens=limit, prefill_step_size=64,
            temperature=0.0,
        )  # fmt: skip
        assert ended[row].tokens == alone.tokens, row
