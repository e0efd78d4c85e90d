"""generate() and stream_generate(): golden greedy tokens, stop tokens, UTF-8 streaming."""

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.generate import generate_step

import phi3v_mlx
from phi3v_mlx.generate import StepModel
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


def test_kv_bits_with_max_kv_size_is_refused(model35):
    model, processor = model35
    with pytest.raises(ValueError, match="kv_bits and max_kv_size exclude each other"):
        phi3v_mlx.generate(model, processor, "hi", kv_bits=4, max_kv_size=64)


def test_mlx_lm_feeds_the_prompt_as_step_model_expects(model35):
    """StepModel leans on generate_step feeding a prompt's positions before the last in one
    call (whose result it does not read), then the last one alone, then sampled ids. If mlx-lm
    changes that, this fails: the versions are pinned in pyproject.toml for that reason."""
    model, processor = model35
    ids = processor("<|user|>\nWhat is this?<|end|>\n<|assistant|>\n")["input_ids"][0]
    embeddings = model.embed(ids[None])[0]
    calls = []

    class Recording(StepModel):
        def __call__(self, inputs, cache=None, input_embeddings=None):
            out = super().__call__(inputs, cache, input_embeddings)
            rows = None if input_embeddings is None else input_embeddings.shape[1]
            calls.append((inputs.shape[1], rows, out is None))
            return out

    steps = generate_step(ids, Recording(model, len(ids)), max_tokens=3,
                          prompt_cache=model.make_cache(), input_embeddings=embeddings)  # fmt: skip
    tokens = [token for token, _ in steps]
    n = len(ids)
    assert calls[:2] == [(n - 1, n - 1, True), (1, 1, False)]
    assert all(call == (1, None, False) for call in calls[2:]) and len(tokens) == 3
    assert tokens == phi3v_mlx.generate(model, processor, ids.tolist(), max_tokens=3).tokens


def test_installed_mlx_versions_are_the_tested_ones():
    from importlib.metadata import requires, version

    from packaging.requirements import Requirement

    pinned = {}
    for line in requires("phi3v-mlx"):
        requirement = Requirement(line)
        if requirement.name in ("mlx", "mlx-lm") and not requirement.marker:
            pinned[requirement.name] = requirement
        elif requirement.name == "mlx" and requirement.marker.evaluate():
            pinned["mlx"] = requirement
    assert set(pinned) == {"mlx", "mlx-lm"}
    for name, requirement in pinned.items():
        assert "<" in str(requirement.specifier), f"{name} has no upper bound"
        assert requirement.specifier.contains(version(name)), (name, version(name))


def test_progress_reports_work_done(model35):
    """Each prefill chunk is reported once computed; 100% comes with the first token."""
    model, processor = model35
    prompt = "<|user|>\n" + "word " * 300 + "<|end|>\n<|assistant|>\n"
    total = len(processor(prompt)["input_ids"][0])
    head = scripted(model, [])
    reports = []
    try:
        chunks = phi3v_mlx.stream_generate(
            model, processor, prompt, max_tokens=2, prefill_step_size=64,
            progress=lambda done, n: reports.append((done, n, head.calls)),
        )  # fmt: skip
        first = next(chunks)
        list(chunks)
    finally:
        model.language.lm_head = head.head
    steps = [done for done, _, _ in reports]
    assert steps == list(range(64, total - 1, 64))[: len(steps) - 1] + [total]
    assert all(n == total for _, n, _ in reports)
    assert all(calls == 0 for _, _, calls in reports[:-1])  # no logits before the last chunk
    assert reports[-1][2] >= 1 and first.token is not None


def test_a_prompt_over_the_context_is_refused_before_pixel_work(model35, monkeypatch):
    model, processor = model35
    from phi3v_mlx.models.phi3v import images as processor_module

    def no_pixels(*args):
        raise AssertionError("the image was resized")

    monkeypatch.setattr(processor_module, "hd_image", no_pixels)
    image = open_image("b_small")
    bound = processor.images.max_num_crops
    assert bound == (32768 - 1) // 156 - 1
    with pytest.raises(ValueError, match=f"num_crops 1000 is over {bound}"):
        phi3v_mlx.generate(model, processor, "<|user|>\n<|image_1|>\nHi", [image], 1000)
    prompt = "<|user|>\n<|image_1|>\n" + "word " * 8000 + "<|end|>\n"
    with pytest.raises(ValueError, match="over the model's context of 32,768"):
        phi3v_mlx.generate(model, processor, prompt, [image], bound)


def test_any_integer_seed_is_a_seed(model35):
    """-1 (what chat UIs send) and seeds past 64 bits are reduced modulo 2**64, not refused."""
    from phi3v_mlx.generate import SamplingOptions

    assert SamplingOptions(seed=-1).seed == 2**64 - 1
    assert SamplingOptions(seed=2**64 + 5).seed == 5
    model, processor = model35
    prompt = "<|user|>\nTell me a story.<|end|>\n<|assistant|>\n"
    kw = dict(max_tokens=6, temperature=1.0)
    minus_one = phi3v_mlx.generate(model, processor, prompt, seed=-1, **kw)
    assert (
        minus_one.tokens
        == phi3v_mlx.generate(model, processor, prompt, seed=2**64 - 1, **kw).tokens
    )
    assert phi3v_mlx.generate(model, processor, prompt, seed=2**64 + 5, **kw).tokens == (
        phi3v_mlx.generate(model, processor, prompt, seed=5, **kw).tokens
    )
