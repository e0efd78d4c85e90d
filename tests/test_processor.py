"""The processor against the official image processor and prompt goldens, plus its errors."""

import io
import json

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from phi3v_mlx.models.phi3v.images import hd_size, num_image_tokens
from phi3v_mlx.processor import ImageError, PromptError, load_image
from tests.conftest import GOLDEN, IMAGES, open_image

PROCESSOR_GOLDENS = sorted((GOLDEN / "processor").glob("*.npz"))
PROMPTS = json.loads((GOLDEN / "prompts.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("path", PROCESSOR_GOLDENS, ids=lambda p: p.stem)
def test_image_goldens(processor, path):
    gold = np.load(path)
    stem, nc = path.stem.rsplit("_nc", 1)
    inputs = processor("<|image_1|>", images=[open_image(stem)], num_crops=int(nc))
    (h, w) = np.array(inputs["image_sizes"])[0].tolist()
    assert (h, w) == tuple(gold["image_sizes"].reshape(-1))
    assert int((np.array(inputs["input_ids"]) == -1).sum()) == int(gold["num_img_tokens"][0])
    real = (h // 336) * (w // 336) + 1
    want = gold["pixel_values"][0, :real].transpose(0, 2, 3, 1)
    got = np.array(inputs["pixel_values"])
    assert got.shape == want.shape and got.dtype == np.float32
    np.testing.assert_allclose(got[1:], want[1:], atol=1e-6, rtol=0)
    np.testing.assert_allclose(got[:1], want[:1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("i", range(len(PROMPTS)))
def test_prompt_goldens(processor, i):
    case = PROMPTS[i]
    images = [open_image(n) for n in case["images"]]
    inputs = processor(case["prompt"], images=images or None, num_crops=case["num_crops"])
    assert inputs["input_ids"].dtype == mx.int32 and inputs["input_ids"].shape[0] == 1
    assert np.array(inputs["input_ids"])[0].tolist() == case["input_ids"]
    if case.get("image_sizes"):
        assert np.array(inputs["image_sizes"]).tolist() == case["image_sizes"]


def test_text_only_inputs(processor):
    inputs = processor("<|user|>\nHi<|end|>\n<|assistant|>\n")
    assert inputs["pixel_values"] is None and inputs["image_sizes"] is None
    assert np.array(inputs["input_ids"])[0, :2].tolist() == [1, 32010]


def test_num_crops_default_comes_from_preprocessor_config(processor):
    image = open_image("p_rgb_640x480")
    assert processor.images.num_crops == 16
    default = processor("<|image_1|>", images=[image])
    assert np.array(default["image_sizes"]).tolist() == [[1008, 1344]]
    small = processor("<|image_1|>", images=image, num_crops=4)
    assert np.array(small["image_sizes"]).tolist() == [[672, 672]]


def test_image_sources_agree(processor, tmp_path):
    path = IMAGES / "p_rgb_640x480.png"
    image = open_image("p_rgb_640x480")
    sources = [image, str(path), path, path.read_bytes(), np.asarray(image)]
    pixels = [np.array(processor.preprocess([s], 4).pixel_values) for s in sources]
    for p in pixels[1:]:
        np.testing.assert_array_equal(p, pixels[0])


def test_modes_convert_like_pillow(processor):
    for name in ("p_rgba_500x300", "p_p_300x300", "p_l_256x512"):
        image = open_image(name)
        assert image.mode in ("RGBA", "P", "L")
        direct = load_image(image)
        np.testing.assert_array_equal(np.asarray(direct), np.asarray(image.convert("RGB")))
    grey = np.arange(24, dtype=np.uint8).reshape(4, 6)
    assert load_image(grey).mode == "RGB"
    assert load_image(np.zeros((4, 6, 4), np.uint8)).mode == "RGB"


def _with_orientation(image: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif, quality=95)
    return buffer.getvalue()


def test_exif_orientation_is_applied_to_every_input_type(tmp_path, processor):
    """A rotated photo comes out upright whether given as a path, bytes or a PIL image."""
    y, x = np.mgrid[0:20, 0:60]
    image = Image.fromarray(np.stack([x * 4, y * 12, x + y], -1).astype(np.uint8))
    data = _with_orientation(image, 6)  # rotate 90 degrees clockwise to display
    (tmp_path / "rotated.jpg").write_bytes(data)
    sources = [data, tmp_path / "rotated.jpg", str(tmp_path / "rotated.jpg"),
               Image.open(io.BytesIO(data))]  # fmt: skip
    loaded = [np.asarray(load_image(source)) for source in sources]
    assert all(a.shape == (60, 20, 3) for a in loaded)
    for other in loaded[1:]:
        np.testing.assert_array_equal(other, loaded[0])
    stored = np.asarray(Image.open(io.BytesIO(data)))  # the pixels as stored, on their side
    np.testing.assert_array_equal(np.rot90(stored, k=-1), loaded[0])
    pixels = [processor.preprocess([source], 4).pixel_values for source in sources]
    for other in pixels[1:]:
        np.testing.assert_array_equal(other, pixels[0])


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path):
    levels = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)
    Image.fromarray(levels).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    rgb = np.asarray(load_image(tmp_path / "deep.png"))
    assert (rgb == 255).mean() < 0.01
    np.testing.assert_array_equal(rgb[..., 0], np.round(levels / 257).astype(np.uint8))
    np.testing.assert_array_equal(rgb[..., 0], rgb[..., 2])


def test_image_errors(tmp_path):
    with pytest.raises(ImageError, match=r"image 1 \(.*missing.png\): no such file"):
        load_image(tmp_path / "missing.png")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageError, match="empty.png.*cannot be read"):
        load_image(tmp_path / "empty.png")
    (tmp_path / "junk.jpg").write_bytes(b"not an image at all")
    with pytest.raises(ImageError, match="junk.jpg.*cannot be read"):
        load_image(tmp_path / "junk.jpg", index=2)
    data = (IMAGES / "c_wide.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="cut.png"):
        load_image(tmp_path / "cut.png")
    with pytest.raises(ImageError, match="is empty"):
        load_image(np.zeros((0, 5, 3), np.uint8))
    with pytest.raises(ImageError, match="uint8"):
        load_image(np.zeros((5, 5, 3), np.float32))
    with pytest.raises(ImageError, match="over the limit of 1000"):
        load_image(Image.new("RGB", (100, 100)), max_pixels=1000)
    with pytest.raises(ImageError, match="unsupported image type int"):
        load_image(42)


def test_decompression_bomb(tmp_path):
    big = Image.new("1", (20000, 10000))
    big.save(tmp_path / "bomb.png")
    with pytest.raises(ImageError, match="bomb.png.*(too large|over the limit)"):
        load_image(tmp_path / "bomb.png", max_pixels=10_000_000)


def test_prompt_errors(processor):
    image = open_image("p_rgb_336x336")
    with pytest.raises(PromptError, match=r"<\|image_2\|> but 1 image"):
        processor("<|image_1|><|image_2|>", images=[image])
    with pytest.raises(PromptError, match=r"image 2 is given but .*<\|image_2\|>"):
        processor("<|image_1|>", images=[image, image])
    with pytest.raises(PromptError, match=r"<\|image_1\|> but 0 image"):
        processor("<|image_1|> hello")
    with pytest.raises(ValueError, match="num_crops"):
        processor("<|image_1|>", images=[image], num_crops=0)


def test_chat_template_numbers_images_across_turns(processor):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": "And its colour?"},
        {"role": "assistant", "content": "Black."},
        {"role": "user", "content": [{"type": "text", "text": "Compare:"}, {"type": "image"}]},
    ]
    assert processor.apply_chat_template(messages) == (
        "<|system|>\nBe brief.<|end|>\n"
        "<|user|>\n<|image_1|>\nWhat is it?<|end|>\n"
        "<|assistant|>\nA cat.<|end|>\n"
        "<|user|>\nAnd its colour?<|end|>\n"
        "<|assistant|>\nBlack.<|end|>\n"
        "<|user|>\nCompare:<|image_2|>\n<|end|>\n<|assistant|>\n"
    )
    assert not processor.apply_chat_template(messages[:3], add_generation_prompt=False).endswith(
        "<|assistant|>\n"
    )
    with pytest.raises(PromptError, match="unknown message part"):
        processor.apply_chat_template([{"role": "user", "content": [{"type": "video"}]}])


def test_chat_template_matches_prompt_golden(processor):
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]}
    ]
    assert processor.apply_chat_template(messages) == PROMPTS[0]["prompt"]


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    width=st.integers(1, 2000),
    height=st.integers(1, 2000),
    mode=st.sampled_from(["RGB", "RGBA", "L", "P", "1", "I;16", "CMYK"]),
    num_crops=st.integers(1, 20),
)
def test_random_images_keep_the_formula(processor, width, height, mode, num_crops):
    image = Image.new(mode, (width, height))
    pre = processor.preprocess([image], num_crops)
    (h, w) = pre.image_sizes[0]
    rows, cols = h // 336, w // 336
    assert h % 336 == 0 and w % 336 == 0 and rows * cols <= max(num_crops, 1)
    assert pre.pixel_values.shape == (rows * cols + 1, 336, 336, 3)
    assert pre.num_tokens == [num_image_tokens(h, w)]
    assert pre.num_tokens[0] == (rows * cols + 1) * 144 + 1 + (rows + 1) * 12
    new_w, new_h, transposed = hd_size(width, height, num_crops)
    padded = -(-new_h // 336) * 336
    assert transposed == (width < height)
    assert (h, w) == ((new_w, padded) if transposed else (padded, new_w))
    assert np.isfinite(pre.pixel_values).all()
