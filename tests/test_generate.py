"""generate() and stream_generate(): golden greedy tokens, stop tokens, UTF-8 streaming."""

import mlx.core as mx
import numpy as np
import pytest

import phi3v_mlx
from tests.conftest import CASES, MANIFEST, golden_inputs, load_variant, open_image
from tests.helpers import scripted, wide_head_model


def case_prompt(case):
    meta = MANIFEST["cases"][case]
    if meta.get("text") is None:
        return golden_inputs(case)["input_ids"].reshape(-1).tolist(), None, None
    return meta["text"], [open_image(n) for n in meta["images"]] or None, meta["num_crops"]


@pytest.mark.parametrize("case", CASES)
def test_greedy_matches_reference(loaded, variant, case):
    from tests.conftest import expected_greedy

    model, processor = loaded
    prompt, images, num_crops = case_prompt(case)
    want = expected_greedy(variant, case)
    result = phi3v_mlx.generate(
        model, processor, prompt, images=images, num_crops=num_crops, max_tokens=len(want)
    )
    assert result.tokens == want
    assert result.generation_tokens == len(want) and result.finish_reason == "length"
    assert result.prompt_tokens == MANIFEST["cases"][case]["seq_len"]
    assert result.text == processor.tokenizer.decode(want)
    assert result.prompt_tps > 0 and result.peak_memory > 0


def test_token_id_prompt_with_images(loaded, variant):
    model, processor = loaded
    text, images, num_crops = case_prompt("b")
    ids = np.array(processor(text, images, num_crops)["input_ids"])[0].tolist()
    by_text = phi3v_mlx.generate(model, processor, text, images, num_crops, max_tokens=4)
    by_ids = phi3v_mlx.generate(model, processor, ids, images, num_crops, max_tokens=4)
    assert by_ids.tokens == by_text.tokens


@pytest.fixture(scope="module")
def model35():
    """Behaviour tests that do not depend on the variant run on Phi-3.5 only."""
    return load_variant("tiny-phi35v")


def _run_script(model, processor, script, **kw):
    head = scripted(model, script)
    try:
        chunks = list(phi3v_mlx.stream_generate(model, processor, "<|user|>\nhi<|end|>\n", **kw))
    finally:
        model.language.lm_head = head.head
    return chunks


@pytest.mark.parametrize("stop", [32007, 32000, 2])
def test_stop_tokens_end_the_answer_and_never_show(model35, stop):
    model, processor = model35
    tok = processor.tokenizer
    words = tok.encode("Hello world", add_special_tokens=False)
    chunks = _run_script(model, processor, [*words, stop, *words], max_tokens=20)
    text = "".join(c.text for c in chunks)
    assert text == "Hello world"
    assert chunks[-1].finish_reason == "stop" and chunks[-1].token == stop
    assert [c.token for c in chunks[:-1]] == words
    assert all(c.finish_reason is None for c in chunks[:-1])


def test_special_and_unknown_tokens_are_not_printed(model35):
    model, processor = model35
    tok = processor.tokenizer
    words = tok.encode("ok", add_special_tokens=False)
    script = [32001, *words, 32010, 1, 32050, 0, *words, 32007]
    chunks = _run_script(model, processor, script, max_tokens=20)
    text = "".join(c.text for c in chunks)
    assert text == "ok ok"
    assert "<|" not in text and "<s>" not in text


def test_utf8_streaming_across_byte_fallback_tokens(model35):
    model, processor = model35
    sentence = "Hé 你好 🙂 мир"
    ids = processor.tokenizer.encode(sentence, add_special_tokens=False)
    assert any(processor.tokenizer.convert_ids_to_tokens(i).startswith("<0x") for i in ids)
    chunks = _run_script(model, processor, [*ids, 32007], max_tokens=50)
    for chunk in chunks:
        chunk.text.encode("utf-8")
        assert "\ufffd" not in chunk.text
    assert "".join(c.text for c in chunks) == sentence
    head = scripted(model, [*ids, 32007])  # the non-streaming path agrees
    try:
        result = phi3v_mlx.generate(model, processor, "<|user|>\nhi<|end|>\n", max_tokens=50)
        assert result.text == sentence
    finally:
        model.language.lm_head = head.head


def test_length_limit_and_zero_tokens(model35):
    model, processor = model35
    result = phi3v_mlx.generate(model, processor, "<|user|>\nhi<|end|>\n", max_tokens=3)
    assert len(result.tokens) == 3 and result.finish_reason == "length"
    empty = phi3v_mlx.generate(model, processor, "<|user|>\nhi<|end|>\n", max_tokens=0)
    assert empty.tokens == [] and empty.text == ""


def test_sampling_is_seeded(model35):
    model, processor = model35
    kw = dict(max_tokens=8, temperature=1.0, top_p=0.9, min_p=0.05, repetition_penalty=1.1)
    a = phi3v_mlx.generate(model, processor, "<|user|>\nhi<|end|>\n", seed=3, **kw)
    b = phi3v_mlx.generate(model, processor, "<|user|>\nhi<|end|>\n", seed=3, **kw)
    assert a.tokens == b.tokens


def test_bad_options(model35):
    model, processor = model35
    for bad in (dict(temperature=-1), dict(top_p=0), dict(max_tokens=-2), dict(kv_bits=7)):
        with pytest.raises(ValueError):
            phi3v_mlx.generate(model, processor, "hi", **bad)
    with pytest.raises(ValueError, match="head size divisible by 32"):
        phi3v_mlx.generate(model, processor, "hi", kv_bits=8, max_tokens=2)
    with pytest.raises(ValueError, match="empty"):
        phi3v_mlx.generate(model, processor, [])


def test_kv_bits_and_max_kv_size(processor):
    model = wide_head_model()
    prompt = "<|user|>\n" + "word " * 60 + "<|end|>\n<|assistant|>\n"
    plain = phi3v_mlx.generate(model, processor, prompt, max_tokens=6)
    quant = phi3v_mlx.generate(model, processor, prompt, max_tokens=6, kv_bits=8)
    assert len(quant.tokens) == 6 and quant.tokens[0] == plain.tokens[0]
    rotating = phi3v_mlx.generate(model, processor, prompt, max_tokens=6, max_kv_size=32)
    assert len(rotating.tokens) == 6


def test_verbose_prints_answer_and_statistics(model35, capsys):
    model, processor = model35
    result = phi3v_mlx.generate(
        model, processor, "<|user|>\nhi<|end|>\n", max_tokens=3, verbose=True
    )
    out = capsys.readouterr().out
    assert out.startswith(result.text)
    assert "Prompt: " in out and "tokens-per-sec" in out and "Peak memory:" in out
    assert isinstance(mx.get_peak_memory(), int)
