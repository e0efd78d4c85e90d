"""Phi-4-mini (phi3 with partial rotary, tied embeddings, a 200k vocabulary) against transformers'
Phi3ForCausalLM (float32), and its prompt, stop ids and conversion paths."""

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import phi3v_mlx
from phi3v_mlx import convert as conv
from phi3v_mlx.config import ConfigError
from phi3v_mlx.models.phi3 import TextConfig
from tests.conftest import TEXT, TEXT_MANIFEST, load_variant
from tests.helpers import check_logit_summaries

VARIANT = "tiny-phi4-mini"
META = TEXT_MANIFEST["variants_own_inputs"][VARIANT]
CASES = list(META["cases"])
TOL = dict(atol=1e-4, rtol=1e-4)


def golden(case):
    return np.load(TEXT / "golden" / VARIANT / f"case_{case}.npz")


def input_ids(case):
    path = TEXT / "golden" / "inputs" / VARIANT / f"case_{case}.npz"
    return mx.array(np.load(path)["input_ids"].astype(np.int32))


@pytest.mark.parametrize("case", CASES)
def test_prompt_forward(case):
    model, processor = load_variant(VARIANT)
    out = golden(case)
    ids = input_ids(case)
    assert processor(META["cases"][case]["text"])["input_ids"].tolist() == ids.tolist()
    logits = np.array(model(ids))[0]
    np.testing.assert_allclose(logits[-1], out["logits"][0], **TOL)
    check_logit_summaries(logits, out, TOL)
    assert model.language.rope.rotation(ids.shape[1]).long == bool(out["rope_long_factors"][0])


def test_step_logits_across_the_rope_threshold():
    model, _ = load_variant(VARIANT)
    out = golden("d")
    sequence = input_ids("d")[0].tolist() + out["greedy_tokens"].tolist()
    for step, want in zip(out["greedy_step_logits_steps"], out["greedy_step_logits"], strict=True):
        length = int(out["greedy_seq_len"][step])
        got = np.array(model(mx.array([sequence[:length]])))[0, -1]
        np.testing.assert_allclose(got, want, **TOL)


@pytest.mark.parametrize("case", CASES)
def test_greedy_with_the_cache_matches_the_no_cache_reference(case):
    model, processor = load_variant(VARIANT)
    want = golden(case)["greedy_tokens"].tolist()
    stops = set(META["stop_ids"])
    if any(t in stops for t in want):
        want = want[: min(want.index(t) for t in stops if t in want)]
    text = phi3v_mlx.generate(
        model, processor, META["cases"][case]["text"], max_tokens=len(want), temperature=0.0
    )
    ids = phi3v_mlx.generate(
        model, processor, input_ids=input_ids(case)[0].tolist(), max_tokens=len(want)
    )
    assert text.tokens == want and ids.tokens == want


def test_stop_ids_come_from_the_checkpoint():
    _, processor = load_variant(VARIANT)
    assert processor.stop_ids == {200020, 199999}
    assert 32007 not in processor.stop_ids  # an ordinary token in this vocabulary


def test_chat_template_and_tools_in_the_system_message():
    _, processor = load_variant(VARIANT)
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    )
    assert prompt == META["cases"]["a"]["text"]
    tools = json.dumps([{"name": "get_weather", "parameters": {}}])
    prompt = processor.apply_chat_template(
        [{"role": "system", "content": "You help.", "tools": tools},
         {"role": "user", "content": "Weather?"}]
    )  # fmt: skip
    assert prompt.startswith(f"<|system|>You help.<|tool|>{tools}<|/tool|><|end|><|user|>")


def test_partial_rotary_and_tied_embeddings():
    model, _ = load_variant(VARIANT)
    assert model.config.rotary_dims == 12 and model.language.rope.short.shape == (6,)
    assert "lm_head" not in model.language
    values = json.loads((TEXT / "models" / VARIANT / "config.json").read_text())
    with pytest.raises(ConfigError, match="short_factor needs 8 values"):  # factor dropped
        TextConfig.from_dict({**values, "partial_rotary_factor": 1.0})
    with pytest.raises(ConfigError, match="partial_rotary_factor"):
        TextConfig.from_dict({**values, "partial_rotary_factor": 0.7})


def test_a_4bit_conversion_keeps_the_tied_head_quantized(tmp_path):
    out = tmp_path / "phi4-mini-4bit"
    conv.convert(str(TEXT / "models" / VARIANT), str(out), quantize=True, q_group_size=32)
    files = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert "lm_head.weight" not in files
    model, processor = phi3v_mlx.load(out, dtype="float32")
    assert isinstance(model.language.embed_tokens, nn.QuantizedEmbedding)
    reference, _ = load_variant(VARIANT)
    ids = input_ids("a")
    got, want = np.array(model(ids))[0].ravel(), np.array(reference(ids))[0].ravel()
    assert np.corrcoef(got, want)[0, 1] > 0.95  # the quantized table serves as the head
    assert processor.stop_ids == {200020, 199999}
