"""Phi-4-reasoning-vision (phi4-siglip) against the reference's goldens: the NaFlex processor, the
antialiased position grid, vision features, logits, cached greedy decoding, the chat template
with its reasoning modes, and the reasoning split."""

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

import phi3v_mlx
from phi3v_mlx.config import ConfigError
from phi3v_mlx.models.phi4rv import ModelConfig, ReasoningStream, split_reasoning
from phi3v_mlx.models.phi4rv.images import ImageProcessor, size_for_patches
from phi3v_mlx.models.phi4rv.model import MediaError, batches, expand_placeholders
from phi3v_mlx.models.phi4rv.processor import Processor
from phi3v_mlx.models.phi4rv.vision import antialias_weights

ROOT = Path(__file__).parent / "fixtures" / "phi4rv"
CHECKPOINT = ROOT / "models" / "tiny-phi4rv"
MANIFEST = json.loads((ROOT / "golden" / "manifest.json").read_text(encoding="utf-8"))
CASES = sorted(MANIFEST["cases"])
IMAGE_CASES = [c for c in CASES if MANIFEST["cases"][c]["images"]]
PX_KEYS = ("pixel_values", "pixel_attention_mask", "spatial_shapes", "num_image_tokens")
ATOL = RTOL = 1e-4


def open_image(name: str) -> Image.Image:
    image = Image.open(ROOT / "images" / f"{name}.png")
    image.load()
    return image


def case_inputs(case: str) -> tuple[np.ndarray, dict[str, mx.array]]:
    inputs = np.load(ROOT / "golden" / "inputs" / f"case_{case}.npz")
    media = {k: mx.array(inputs[k]) for k in PX_KEYS if k in inputs.files}
    return inputs["input_ids"][0].astype(np.int64), media


def golden(case: str) -> dict[str, np.ndarray]:
    return dict(np.load(ROOT / "golden" / "tiny-phi4rv" / f"case_{case}.npz"))


def assert_close(got, want, atol=ATOL, rtol=RTOL):
    np.testing.assert_allclose(np.asarray(got, np.float64), want, atol=atol, rtol=rtol)


@pytest.fixture(scope="module")
def loaded():
    return phi3v_mlx.load(CHECKPOINT, dtype="float32")


# --- processor ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(MANIFEST["images"]))
def test_image_processor_matches_reference(loaded, name):
    _, processor = loaded
    want = np.load(ROOT / "golden" / "processor" / f"{name}.npz")
    got = processor.image_processor([open_image(name)])
    for key in ("spatial_shapes", "num_image_tokens", "pixel_attention_mask"):
        assert np.asarray(got[key]).tolist() == want[key].tolist(), key
    assert_close(got["pixel_values"], want["pixel_values"], atol=1e-5, rtol=0)
    info = MANIFEST["images"][name]
    size = ImageProcessor().target_size(*info["size_wh"])
    assert list(size) == info["resized_wh"]


def test_batch_of_images_keeps_each_grid(loaded):
    _, processor = loaded
    names = MANIFEST["cases"]["c"]["images"]
    got = processor.image_processor([open_image(n) for n in names])
    inputs = np.load(ROOT / "golden" / "inputs" / "case_c.npz")
    for key in PX_KEYS:
        assert_close(got[key], inputs[key], atol=1e-5, rtol=0)


def test_naflex_size_is_not_the_floor():
    # The binary search's result, as the README gives it (height, width).
    assert size_for_patches(1000, 300, 16, 62 * 18) == (960, 288)
    assert size_for_patches(200, 640, 16, 12 * 40) == (192, 624)
    processor = ImageProcessor()
    assert processor.target_size(1920, 1080) == (1280, 720)
    assert processor.target_size(40, 30) == (288, 224)
    assert processor.target_size(500, 375) == (496, 368)


def test_chat_template_renders_the_cases_prompts(loaded):
    _, processor = loaded
    for case in CASES:
        info = MANIFEST["cases"][case]
        thinking = {"": "auto", "<think>": "on"}[info["suffix"]]
        messages = [{"role": "user", "content": info["user_content"]}]
        assert processor.apply_chat_template(messages, thinking=thinking) == info["prompt"]


def test_thinking_modes_and_system_messages(loaded):
    _, processor = loaded
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": "Sure?"},
    ]
    auto = processor.apply_chat_template(messages)
    assert auto.endswith(
        "<|im_start|>user<|im_sep|>Sure?<|im_end|>\n<|im_start|>assistant<|im_sep|>\n"
    )
    assert "<|im_start|>user<|im_sep|>Be brief.\n\n<image>\nWhat?<|im_end|>\n" in auto
    assert "<|im_start|>assistant<|im_sep|>\nA cat.<|im_end|>\n" in auto
    assert processor.apply_chat_template(messages, thinking="on") == auto + "<think>"
    assert processor.apply_chat_template(messages, thinking="off") == auto + "<|dummy_84|>"
    no_prompt = processor.apply_chat_template(messages, add_generation_prompt=False, thinking="on")
    assert not no_prompt.endswith(("<think>", "<|im_sep|>\n"))
    with pytest.raises(ValueError, match="thinking"):
        processor.apply_chat_template(messages, thinking="yes")


class CharTokenizer:
    """A stand-in tokenizer: one id per character, a BOS first."""

    bos_token_id = 1

    def encode(self, text: str) -> list[int]:
        return [1] + [ord(c) for c in text]


def test_prompt_tags_become_slots_and_agree_with_placeholder_ids(loaded):
    _, processor = loaded
    text = Processor(
        CharTokenizer(), processor.image_processor, processor.chat_template, {7}, 32768
    )
    images = [open_image("c_first"), open_image("c_second")]
    inputs = text("ab<image>\nc<image>", images=images)
    ids = np.asarray(inputs["input_ids"])[0].tolist()
    assert ids == [1, 97, 98] + [-1] * 768 + [10, 99] + [-2] * 252
    from_ids = text([1, 97, 98, -200, 10, 99, -200], images)
    assert np.asarray(from_ids["input_ids"]).tolist() == [ids]
    for key in PX_KEYS:
        assert np.array_equal(np.asarray(inputs[key]), np.asarray(from_ids[key]))
    with pytest.raises(ValueError, match="1 <image> tag"):
        text("a<image>", images=images)
    with pytest.raises(ValueError, match="context"):
        Processor(CharTokenizer(), processor.image_processor, "", set(), 100)(
            "x<image>", images[:1]
        )


SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|im_sep|>", "<think>"]


def byte_tokenizer_checkpoint(folder: Path) -> Path:
    """The tiny checkpoint's configs beside a byte-level tokenizer (one id per byte, then the
    chat's special tokens): a checkpoint folder whose processor has a real tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    for name in ("config.json", "generation_config.json", "chat_template.jinja"):
        (folder / name).write_bytes((CHECKPOINT / name).read_bytes())
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    tokenizer.save(str(folder / "tokenizer.json"))
    settings = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(settings), encoding="utf-8")
    return folder


def test_processor_with_a_tokenizer(tmp_path):
    from phi3v_mlx.models.phi4rv import load_processor

    folder = byte_tokenizer_checkpoint(tmp_path)
    processor = load_processor(folder, ModelConfig.from_file(folder))
    special = dict(zip(SPECIAL_TOKENS, range(256, 256 + len(SPECIAL_TOKENS)), strict=True))
    assert processor.stop_ids == {100265, special["<|im_end|>"], special["<|endoftext|>"]}
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}]
    prompt = processor.apply_chat_template(messages, thinking="on")
    inputs = processor(prompt, images=[open_image("c_second")])
    ids = np.asarray(inputs["input_ids"])[0].tolist()
    assert ids[0] == special["<|im_start|>"] and ids[-1] == special["<think>"]
    image = ids.index(-1)
    assert ids[image - 1] == special["<|im_sep|>"] and ids.count(-1) == 252
    after = ids[image + 252 : image + 256]
    assert processor.tokenizer.decode(after[:3]) == "\nHi" and after[3] == special["<|im_end|>"]


def test_shared_generate_chat_session_and_batch_with_images(tmp_path):
    folder = byte_tokenizer_checkpoint(tmp_path)
    for name in (
        "model.safetensors.index.json",
        *(p.name for p in CHECKPOINT.glob("*.safetensors")),
    ):
        (folder / name).symlink_to(CHECKPOINT / name)
    model, processor = phi3v_mlx.load(folder, dtype="float32")

    def expected(prompt: str, images: list) -> list[int]:
        cache = model.make_cache()
        h = model.hidden(model.embed(**processor(prompt, images=images)), cache)
        return greedy(model, model.logits(h[:, -1:]), cache, 3)

    image, pair = open_image("c_second"), [open_image("p_tiny"), open_image("c_second")]
    turn = "<|im_start|>user<|im_sep|>{}<|im_end|>\n<|im_start|>assistant<|im_sep|>\n"
    one, two = turn.format("<image>\nHi"), turn.format("<image><image>\nWhich?") + "<think>"
    want = [expected(one, [image]), expected(two, pair)]
    assert phi3v_mlx.generate(model, processor, one, images=[image], max_tokens=3).tokens == want[0]
    requests = [{"prompt": one, "images": [image]}, {"prompt": two, "images": pair}]
    batch = phi3v_mlx.batch_generate(model, processor, requests, max_tokens=3)
    assert [r.tokens for r in batch] == want
    session = phi3v_mlx.ChatSession(model, processor)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}]
    prompt = processor.apply_chat_template(messages)
    assert session.send("Hi", images=[image], max_tokens=3).tokens == expected(prompt, [image])


def test_checkpoint_without_tokenizer_takes_ids_only(loaded):
    _, processor = loaded
    assert processor.tokenizer is None
    assert processor.stop_ids == {100265}
    with pytest.raises(ValueError, match="as ids"):
        processor("hello")


# --- model -------------------------------------------------------------------------------------


def test_antialias_weights():
    # Growing: plain bilinear with half-pixel centres and clamped edges.
    grow = antialias_weights(16, 23)
    src = np.clip((np.arange(23) + 0.5) * 16 / 23 - 0.5, 0, 15)
    plain = np.zeros((23, 16))
    low = np.floor(src).astype(int)
    high = np.minimum(low + 1, 15)
    np.add.at(plain, (np.arange(23), low), 1 - (src - low))
    np.add.at(plain, (np.arange(23), high), src - low)
    np.testing.assert_allclose(grow, plain, atol=1e-12)
    # Shrinking 16 -> 10 (scale 1.6): a triangle 1.6 wide each side, cut at the edge, normalised.
    shrink = antialias_weights(16, 10)
    np.testing.assert_allclose(shrink[0, :2], np.array([0.8125, 0.5625]) / 1.375, atol=1e-12)
    np.testing.assert_allclose(shrink[1, 1:4], np.array([0.4375, 0.9375, 0.3125]) / 1.6875)
    assert np.count_nonzero(shrink[:2]) == 5
    np.testing.assert_allclose(shrink.sum(1), 1.0, atol=1e-12)
    np.testing.assert_allclose(antialias_weights(16, 16), np.eye(16), atol=1e-12)


@pytest.mark.parametrize("case", IMAGE_CASES)
def test_vision_features_and_projection(loaded, case):
    model, _ = loaded
    _, media = case_inputs(case)
    want = golden(case)
    grids = [tuple(g) for g in np.asarray(media["spatial_shapes"]).tolist()]
    width = max(r * c for r, c in grids)
    features = model.vision(media["pixel_values"][:, :width], grids)
    real = mx.concatenate([features[i, : r * c] for i, (r, c) in enumerate(grids)])
    assert_close(real, want["vision_features"])
    assert_close(model.projector(real), want["image_embeds"])


def greedy(model, logits: mx.array, cache, steps: int) -> list[int]:
    tokens = []
    for _ in range(steps):
        token = int(mx.argmax(logits[0, -1]).item())
        tokens.append(token)
        logits = model.logits(model.hidden(model.embed_tokens(mx.array([[token]])), cache))
    return tokens


@pytest.mark.parametrize("case", CASES)
def test_processor_ids_logits_and_cached_greedy(loaded, case):
    model, processor = loaded
    ids, media = case_inputs(case)
    want = golden(case)
    # The processor from the placeholder ids and the images: the reference's layout, expanded.
    images = [open_image(n) for n in MANIFEST["cases"][case]["images"]] or None
    inputs = processor(ids.tolist(), images)
    expanded = np.load(ROOT / "golden" / "inputs" / f"case_{case}.npz")["expanded_ids"][0]
    slots = np.asarray(inputs["input_ids"])[0]
    assert np.array_equal(slots < 0, expanded == -200)
    assert np.array_equal(slots[slots >= 0], expanded[expanded >= 0])
    for key in media:
        assert_close(inputs[key], np.asarray(media[key]), atol=1e-5, rtol=0)
    # One forward over the prompt (the -200 ids expanded by the model) into a cache.
    embeddings = model.embed(mx.array(ids[None]), **media)
    assert embeddings.shape[1] == int(want["seq_len"][0])
    cache = model.make_cache()
    h = model.hidden(embeddings, cache)
    positions = np.unique(np.linspace(0, h.shape[1] - 1, 16).astype(int))
    logits = np.asarray(model.logits(h[:, mx.array(positions)]))[0].astype(np.float64)
    top = np.take_along_axis(logits, want["top5_ids"][positions].astype(np.int64), -1)
    assert_close(top, want["top5_logits"][positions])
    peak = logits.max(-1, keepdims=True)
    lse = np.log(np.exp(logits - peak).sum(-1)) + peak[:, 0]
    assert_close(lse, want["logsumexp"][positions])
    assert_close(logits[-1], want["logits"][0])
    # Greedy decoding through the cache, positions counted over the expanded prompt.
    tokens = want["greedy_tokens"].tolist()
    assert greedy(model, model.logits(h[:, -1:]), cache, len(tokens)) == tokens


def test_placeholders_must_match_the_images(loaded):
    model, _ = loaded
    ids, media = case_inputs("c")
    with pytest.raises(MediaError, match="2 image placeholder"):
        expand_placeholders(ids, [768])
    with pytest.raises(ValueError, match="but 0 image"):
        model(mx.array(ids[None]))
    bad = dict(media, num_image_tokens=mx.array([768, 250]))
    with pytest.raises(MediaError, match="num_image_tokens"):
        model.encode(bad)


def test_batches_bound_padded_patches():
    assert batches([3600, 252, 768], 4 * 3600) == [range(0, 3)]
    assert batches([3600] * 5, 4 * 3600) == [range(0, 4), range(4, 5)]
    assert batches([100, 9000, 100], 10000) == [range(0, 1), range(1, 2), range(2, 3)]
    assert batches([], 10) == []


def test_sanitize_maps_hub_names_and_drops_unused(loaded):
    model, _ = loaded
    prefix = "model.vision_tower.vision_tower.vision_model."
    weights = {
        f"{prefix}encoder.layers.1.mlp.fc1.weight": mx.zeros(1),
        f"{prefix}encoder.layers.2.mlp.fc1.weight": mx.zeros(1),
        f"{prefix}post_layernorm.weight": mx.zeros(1),
        f"{prefix}head.probe": mx.zeros(1),
        "model.mm_projector.2.bias": mx.zeros(1),
        "model.layers.0.self_attn.qkv_proj.weight": mx.zeros(1),
        "lm_head.weight": mx.zeros(1),
    }
    assert sorted(model.sanitize(weights)) == [
        "language.layers.0.self_attn.qkv_proj.weight",
        "language.lm_head.weight",
        "projector.layers.2.bias",
        "vision.encoder.layers.1.mlp.fc1.weight",
    ]


def test_config_reads_the_checkpoint_and_refuses_others():
    values = json.loads((CHECKPOINT / "config.json").read_text(encoding="utf-8"))
    config = ModelConfig.from_dict(values)
    assert config.text.rope_theta == 500000 and not config.text.tie_word_embeddings
    assert config.vision_config.patch_size == 16 and config.vision_config.position_grid == 16
    assert (config.head_dim, config.num_hidden_layers, config.projector_depth) == (16, 2, 2)
    with pytest.raises(ConfigError, match="NaFlex"):
        ModelConfig.from_dict({**values, "mm_vision_tower": "google/siglip-so400m-patch14-384"})
    with pytest.raises(ConfigError, match="mm_projector_type"):
        ModelConfig.from_dict({**values, "mm_projector_type": "resampler"})


# --- reasoning split ---------------------------------------------------------------------------

SPLITS = [
    ("<think>\nLet me count.\n</think>\n\nThere are 5.", False, ("Let me count.", "There are 5.")),
    ("Let me count. </think> 5", True, ("Let me count.", "5")),
    ("<|dummy_84|>There are 5.", False, ("", "There are 5.")),
    ("There are 5.", False, ("", "There are 5.")),
    ("<think> still thinking  ", False, ("still thinking", "")),
    ("a < b, so </thinking> is not a tag", True, ("a < b, so </thinking> is not a tag", "")),
]


@pytest.mark.parametrize(("text", "thinking", "want"), SPLITS)
def test_split_reasoning(text, thinking, want):
    assert split_reasoning(text, thinking=thinking) == want


@pytest.mark.parametrize(("text", "thinking", "want"), SPLITS)
def test_streamed_split_equals_whole(text, thinking, want):
    for size in range(1, 9):
        stream = ReasoningStream(thinking)
        reasoning = answer = ""
        for start in range(0, len(text), size):
            r, a = stream.feed(text[start : start + size])
            reasoning, answer = reasoning + r, answer + a
        r, a = stream.finish()
        assert (reasoning + r, answer + a) == want, size


def test_stream_says_when_the_thought_is_open():
    stream = ReasoningStream(thinking=True)
    stream.feed("pondering")
    assert stream.thinking
    stream.feed("</think>done")
    assert not stream.thinking
