"""The model against the official implementation's outputs (tiny checkpoints, float32)."""

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import QuantizedKVCache

from phi3v_mlx.cache import PromptCache
from tests.conftest import CASES, MANIFEST, case_inputs, expected_greedy, golden
from tests.helpers import check_logit_summaries, wide_head_model

TOL = dict(atol=1e-4, rtol=1e-4)
IMAGE_CASES = [c for c in CASES if MANIFEST["cases"][c].get("images")]


def greedy(model, inputs, steps, cache=None):
    """Plain greedy decoding over the KV cache, the prompt in one forward."""
    cache = model.make_cache() if cache is None else cache
    logits = model.language(model.embed(**inputs), cache, last_only=True)
    tokens = []
    for _ in range(steps):
        tokens.append(int(mx.argmax(logits[0, -1]).item()))
        logits = model(mx.array([[tokens[-1]]]), cache=cache)
    return tokens


@pytest.mark.parametrize("case", IMAGE_CASES)
def test_clip_features_and_image_embeddings(loaded, variant, case):
    model, processor = loaded
    out = golden(variant, case)
    inputs = case_inputs(processor, case)
    sizes = np.array(inputs["image_sizes"]).tolist()
    starts = np.cumsum([0] + [(h // 336) * (w // 336) + 1 for h, w in sizes])
    for (image, crop), want in zip(
        out["clip_patch_features_index"], out["clip_patch_features"], strict=True
    ):
        pixels = inputs["pixel_values"][int(starts[image] + crop)][None]
        np.testing.assert_allclose(np.array(model.vision.clip(pixels))[0], want, **TOL)
    embeds = mx.concatenate(model.encode_images(inputs["pixel_values"], inputs["image_sizes"]))
    np.testing.assert_allclose(np.array(embeds), out["image_embeds"], **TOL)
    ids = np.array(inputs["input_ids"])[0]
    np.testing.assert_array_equal(np.nonzero(ids < 0)[0], out["image_positions"])


@pytest.mark.parametrize("case", CASES)
def test_hidden_states_and_logits(loaded, variant, case):
    """Final hidden states, then per-position logit summaries (lm_head applied in numpy: fast)."""
    model, processor = loaded
    out = golden(variant, case)
    hidden = np.array(model.language.hidden(model.embed(**case_inputs(processor, case))))[0]
    np.testing.assert_allclose(hidden[out["final_hidden_positions"]], out["final_hidden"], **TOL)
    logits = hidden @ np.array(model.language.lm_head.weight).T
    check_logit_summaries(logits, out, TOL)
    if "logits" in out.files:
        np.testing.assert_allclose(logits[out["logits_positions"]], out["logits"], **TOL)


def test_model_call_returns_full_logits(loaded, variant):
    model, processor = loaded
    out = golden(variant, "a")
    logits = np.array(model(**case_inputs(processor, "a")))
    assert logits.shape == (1, len(out["argmax"]), 32064)
    np.testing.assert_allclose(logits[0, -1], out["logits"][0], **TOL)
    np.testing.assert_array_equal(logits[0].argmax(-1), out["argmax"])


@pytest.mark.parametrize("case", CASES)
def test_greedy_over_kv_cache(loaded, variant, case):
    model, processor = loaded
    want = expected_greedy(variant, case)
    assert greedy(model, case_inputs(processor, case), len(want)) == want


def test_crossing_the_threshold_rebuilds_once_with_long_factors(loaded, variant):
    """f_cross: the step feeding position 1024 re-encodes everything with the long factors."""
    model, processor = loaded
    out = golden(variant, "f_cross")
    threshold = model.config.original_max_position_embeddings
    cache = model.make_cache()
    logits = model.language(model.embed(**case_inputs(processor, "f_cross")), cache, True)
    steps = dict(
        zip(out["greedy_step_logits_steps"].tolist(), out["greedy_step_logits"], strict=True)
    )
    if not out["decode_cache_dropped"].any():
        # The Phi-3-vision-128k code keeps short-factor keys past the threshold; its logits after
        # the crossing are not those of one forward, so only the step before it is comparable.
        steps = {k: v for k, v in steps.items() if out["decode_fed_pos_last"][k] < threshold}
    for step in range(len(out["greedy_tokens"])):
        if step in steps:
            np.testing.assert_allclose(np.array(logits[0, -1]), steps[step], **TOL)
        offset = cache[0].offset
        token = int(mx.argmax(logits[0, -1]).item())
        logits = model(mx.array([[token]]), cache=cache)
        assert cache.rope.long == (offset + 1 > threshold)
        assert cache[0].offset == offset + 1


def test_chunked_prefill_equals_one_forward(loaded, variant):
    """A prompt past the threshold prefilled in chunks uses the long factors everywhere."""
    model, processor = loaded
    ids = case_inputs(processor, "f_long")["input_ids"]
    want = expected_greedy(variant, "f_long")[0]
    for announce in (True, False):
        cache = model.make_cache()
        cache.rope.expected = ids.shape[1] if announce else 0
        for start in range(0, ids.shape[1] - 1, 300):
            model.language(model.embed(ids[:, start : min(start + 300, ids.shape[1] - 1)]), cache)
        logits = model(ids[:, -1:], cache=cache)
        assert cache.rope.long and cache.offset == ids.shape[1]
        assert int(mx.argmax(logits[0, -1])) == want


def test_trim_below_threshold_returns_to_short_factors(loaded, variant):
    model, processor = loaded
    ids = case_inputs(processor, "f_long")["input_ids"]
    cache = model.make_cache()
    model.language(model.embed(ids), cache, True)
    assert cache.rope.long
    assert cache.trim_to(1000)
    logits = model(ids[:, 1000:1001], cache=cache)
    assert not cache.rope.long
    want = model.language(model.embed(ids[:, :1001]), last_only=True)
    np.testing.assert_allclose(np.array(logits[0, -1]), np.array(want[0, -1]), **TOL)


def test_rebuild_returns_only_the_given_rows(loaded):
    """Crossing the threshold re-feeds the cached positions but returns the new rows only."""
    model, processor = loaded
    ids = case_inputs(processor, "f_long")["input_ids"]
    threshold = model.config.original_max_position_embeddings
    cache = model.make_cache()
    embeddings = model.embed(ids)[:, :threshold]
    model.language.hidden(embeddings[:, :-3], cache)
    out = model.language.hidden(embeddings[:, -3:], cache)
    assert out.shape[1] == 3 and not cache.rope.long
    more = model.language.hidden(model.language.embed(mx.array([[5, 6]])), cache)
    assert more.shape[1] == 2 and cache.rope.long and cache.offset == threshold + 2
    whole = model.language.hidden(
        mx.concatenate([embeddings, model.language.embed(mx.array([[5, 6]]))], axis=1)
    )
    np.testing.assert_allclose(np.array(more), np.array(whole[:, -2:]), **TOL)


def test_quantized_kv_cache():
    """mlx-lm's QuantizedKVCache goes through the quantized attention path (head_dim 64 model)."""
    model = wide_head_model()
    ids = mx.array([[1] + list(range(100, 400))])
    layers = len(model.layers)
    plain = model.make_cache()
    quant = PromptCache(
        [QuantizedKVCache(group_size=32, bits=8) for _ in range(layers)], model.make_cache().rope
    )
    for cache in (plain, quant):
        model(ids, cache=cache)
    a = np.array(model(mx.array([[7]]), cache=plain))[0, -1]
    b = np.array(model(mx.array([[7]]), cache=quant))[0, -1]
    assert isinstance(quant[0], QuantizedKVCache) and quant[0].offset == ids.shape[1] + 1
    assert np.abs(a - b).max() < 2e-2 * np.abs(a).max()


def test_image_slot_errors(loaded):
    model, processor = loaded
    inputs = case_inputs(processor, "b")
    ids = np.array(inputs["input_ids"])
    pixels, sizes = inputs["pixel_values"], inputs["image_sizes"]
    with pytest.raises(ValueError, match="image 2"):
        model.embed(mx.array(np.where(ids < 0, -2, ids)), pixels, sizes)
    with pytest.raises(ValueError, match="run of"):
        model.embed(mx.array(ids[:, 5:]), pixels, sizes)
    with pytest.raises(ValueError, match="crops"):
        model.embed(inputs["input_ids"], pixels[:3], sizes)
    with pytest.raises(ValueError, match="no image slots"):
        model.merge(mx.array([[1, 2, 3]]), [mx.zeros((5, 64))])
