"""The Phi-3 text models (phi3, phimoe) against transformers' own implementations (float32)."""

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.utils import dequantize_model
from typer.testing import CliRunner

import phi3v_mlx
from phi3v_mlx import cli
from phi3v_mlx import convert as conv
from tests.conftest import TEXT, TEXT_CASES, TEXT_MANIFEST, TEXT_VARIANTS, load_variant
from tests.helpers import check_logit_summaries

TOL = dict(atol=1e-4, rtol=1e-4)
STOPS = {32000, 32007, 2}


def golden(variant, case):
    return np.load(TEXT / "golden" / variant / f"case_{case}.npz")


def input_ids(case):
    return mx.array(np.load(TEXT / "golden" / "inputs" / f"case_{case}.npz")["input_ids"])


@pytest.fixture(params=TEXT_VARIANTS)
def text_variant(request):
    return request.param


@pytest.mark.parametrize("case", TEXT_CASES)
def test_prompt_forward(text_variant, case):
    model, processor = load_variant(text_variant)
    out = golden(text_variant, case)
    ids = input_ids(case)
    assert processor(TEXT_MANIFEST["cases"][case]["text"])["input_ids"].tolist() == ids.tolist()
    hidden = model.language.hidden(model.language.embed(ids))
    np.testing.assert_allclose(np.array(hidden[0]), out["final_hidden"], **TOL)
    logits = np.array(model(ids))[0]
    np.testing.assert_allclose(logits[-1], out["logits"][0], **TOL)
    check_logit_summaries(logits, out, TOL)
    rotation = model.language.rope.rotation(ids.shape[1])
    assert rotation.long == bool(out["rope_long_factors"][0])


@pytest.mark.parametrize("case", TEXT_CASES)
def test_expert_routing(case):
    """Router logits, chosen experts and their (not renormalized) weights, layer by layer."""
    model, _ = load_variant("tiny-phi35-moe")
    out = golden("tiny-phi35-moe", case)
    seen = []
    for layer in model.language.layers:
        moe = layer.block_sparse_moe
        original = type(moe).route

        def recording(x, moe=moe, original=original):
            seen.append((moe.gate(x), *original(moe, x)))
            return seen[-1][1:]

        moe.route = recording
    try:
        model(input_ids(case))
    finally:
        for layer in model.language.layers:
            del layer.block_sparse_moe.route
    for i, (logits, experts, weights) in enumerate(seen):
        np.testing.assert_allclose(np.array(logits[0]), out["router_logits"][i], **TOL)
        np.testing.assert_array_equal(np.array(experts[0]), out["expert_ids"][i])
        np.testing.assert_allclose(np.array(weights[0]), out["expert_weights"][i], **TOL)


@pytest.mark.parametrize("case", TEXT_CASES)
def test_greedy_matches_the_no_cache_reference(text_variant, case):
    model, processor = load_variant(text_variant)
    out = golden(text_variant, case)
    want = out["greedy_tokens"].tolist()
    want = want[: next((i for i, t in enumerate(want) if t in STOPS), len(want))]
    text = TEXT_MANIFEST["cases"][case]["text"]
    result = phi3v_mlx.generate(model, processor, text, max_tokens=len(want))
    assert result.tokens == want
    rope = model.language.rope
    lengths = out["greedy_seq_len"].tolist()
    assert [rope.rotation(n).long for n in lengths] == out["greedy_rope_long_factors"].tolist()
    long_mscale = [rope.threshold is not None and n > rope.threshold for n in lengths]
    assert long_mscale == out["greedy_rope_long_mscale"].astype(bool).tolist()


@pytest.mark.parametrize("variant", ["tiny-phi35-mini", "tiny-phi35-moe"])
def test_cached_decoding_across_the_threshold(variant):
    """Step logits at T = 63, 64, 65 with a KV cache (keys recomputed at the switch) equal the
    no-cache reference, including phimoe's switch at exactly T = 64."""
    model, _ = load_variant(variant)
    out = golden(variant, "d")
    steps = dict(zip(out["greedy_step_logits_steps"].tolist(), out["greedy_step_logits"],
                     strict=True))  # fmt: skip
    cache = model.make_cache()
    logits = model(input_ids("d"), cache=cache)
    for step, token in enumerate(out["greedy_tokens"].tolist()):
        if step in steps:
            np.testing.assert_allclose(np.array(logits[0, -1]), steps[step], **TOL)
        logits = model(mx.array([[token]]), cache=cache)
    assert cache.rope.long


def test_sliding_window_masks_beyond_it_and_nothing_below(tmp_path):
    """A 2-layer model with window 8 sees 2 * 7 positions back from the last one."""
    path = tmp_path / "windowed"
    shutil.copytree(TEXT / "models" / "tiny-phi3-4k", path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "sliding_window": 8}))
    windowed, _ = phi3v_mlx.load(path, dtype="float32")
    plain, _ = load_variant("tiny-phi3-4k")
    ids = np.arange(1000, 1030)[None]

    def last(model, change_at=None):
        changed = ids.copy()
        if change_at is not None:
            changed[0, change_at] = 5
        return np.array(model(mx.array(changed)))[0, -1]

    np.testing.assert_array_equal(np.array(windowed(mx.array(ids[:, :8]))),
                                  np.array(plain(mx.array(ids[:, :8]))))  # fmt: skip
    assert np.abs(last(windowed, 14) - last(windowed)).max() == 0
    assert np.abs(last(windowed, 15) - last(windowed)).max() > 1e-3
    assert np.abs(last(plain, 0) - last(plain)).max() > 1e-3
    cache = windowed.make_cache()
    windowed(mx.array(ids[:, :20]), cache=cache)
    for t in range(20, 30):
        step = windowed(mx.array(ids[:, t : t + 1]), cache=cache)
    np.testing.assert_allclose(np.array(step)[0, -1], last(windowed), atol=1e-5)


def test_a_text_model_takes_no_images(tmp_path):
    model, processor = load_variant("tiny-phi35-mini")
    image = np.zeros((40, 40, 3), np.uint8)
    with pytest.raises(ValueError, match="text model"):
        phi3v_mlx.generate(model, processor, "<|user|>\nHi<|end|>\n<|assistant|>\n", [image])
    session = phi3v_mlx.ChatSession(model, processor)
    with pytest.raises(ValueError, match="text model"):
        session.send("What is this?", images=[image])
    assert session.messages == []
    first = session.send("Hello!", max_tokens=4)
    second = session.send("And then?", max_tokens=4)
    prompt = processor.apply_chat_template(session.messages[:-1])
    assert second.tokens == phi3v_mlx.generate(model, processor, prompt, max_tokens=4).tokens
    assert first.text and second.prompt_tokens < len(processor(prompt)["input_ids"][0])
    folder = str(TEXT / "models" / "tiny-phi35-mini")
    runner = CliRunner()
    bad = runner.invoke(cli.app, ["generate", "--model", folder, "-p", "Hi", "--image",
                                  str(TEXT.parent / "images" / "b_small.png")])  # fmt: skip
    assert bad.exit_code != 0 and "text model" in str(bad.exception)
    good = runner.invoke(cli.app, ["generate", "--model", folder, "-p", "Hi", "-m", "4",
                                   "--dtype", "float32"])  # fmt: skip
    text = processor.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert good.stdout == phi3v_mlx.generate(model, processor, text, max_tokens=4).text + "\n"


@pytest.mark.parametrize("variant", ["tiny-phi3-4k", "tiny-phi35-moe"])
def test_conversion_round_trips_with_mlx_lm(variant, tmp_path):
    """Our 8-bit output loads in mlx-lm; mlx-lm's 4-bit output loads here, every quantized
    module (experts, router) wired as written."""
    from mlx_lm import convert as lm_convert
    from mlx_lm import load as lm_load

    source = TEXT / "models" / variant
    ours = tmp_path / "ours"
    report = conv.convert(source, ours, quantize=True, q_bits=8, log=lambda _: None)
    assert report.top1_agreement > 0.8 and report.positions > 40
    reference, _ = load_variant(variant)
    model, _ = phi3v_mlx.load(ours, dtype="float32")
    ids = input_ids("c")
    agree = (np.array(model(ids)).argmax(-1) == np.array(reference(ids)).argmax(-1)).mean()
    assert agree > 0.8
    theirs, _ = lm_load(str(ours))
    assert theirs(ids).shape == (1, ids.shape[1], 32064)
    quantized = tmp_path / "mlx-lm-q4"
    lm_convert(str(source), mlx_path=str(quantized), quantize=True, q_bits=4)
    loaded, _ = phi3v_mlx.load(quantized, dtype="float32")
    expanded, _ = phi3v_mlx.load(quantized, dtype="float32")
    dequantize_model(expanded)
    np.testing.assert_allclose(np.array(loaded(ids)), np.array(expanded(ids)), atol=1e-3)
