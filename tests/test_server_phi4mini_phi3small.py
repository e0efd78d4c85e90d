"""Phi-4-mini and Phi-3-small through the server (answers equal generate() at temperature 0)
and through an 8-bit conversion that reloads and passes the converter's fidelity check."""

import json

import mlx.nn as nn
import numpy as np
import pytest

import phi3v_mlx
from phi3v_mlx import convert as conv
from phi3v_mlx.loader import load_model
from phi3v_mlx.processor import checkpoint_stop_ids
from phi3v_mlx.server.store import MIN_REUSE
from tests.conftest import TEXT, load_variant
from tests.test_server import client, live_server, reference

VARIANTS = ["tiny-phi4-mini", "tiny-phi3-small"]
SHORT = [{"role": "user", "content": "Why is the sky blue? Answer briefly."}]
# Over 1,088 tokens: Phi-3-small's block-sparse layers leave blocks out (beyond 16 local ones).
LONG = [{"role": "user", "content": "Repeat after me: " + "lighthouse keeper " * 600}]


@pytest.fixture(scope="module", params=VARIANTS)
def served(request):
    with live_server(request.param) as base:
        yield request.param, base


@pytest.mark.parametrize("messages", [SHORT, LONG], ids=["short", "long"])
def test_answers_equal_generate_streamed_or_not(served, messages):
    variant, base = served
    want = reference(messages, [], 12, variant=variant)
    assert want.text
    api = client(base)
    answer = api.chat.completions.create(
        model="tiny", messages=messages, max_tokens=12, temperature=0
    )
    assert answer.choices[0].message.content == want.text
    assert answer.choices[0].finish_reason == want.finish_reason
    assert answer.usage.prompt_tokens == want.prompt_tokens
    assert answer.usage.completion_tokens == want.generation_tokens
    stream = api.chat.completions.create(
        model="tiny",
        messages=messages,
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == want.finish_reason
    reused = chunks[-1].usage.prompt_tokens_details.cached_tokens  # the same prompt again
    assert reused > 0 if want.prompt_tokens >= MIN_REUSE else reused == 0


@pytest.fixture(scope="module")
def eight_bit(tmp_path_factory):
    """Each variant converted to 8 bits (group 64) with the fidelity check, and its report."""
    out = {}
    for variant in VARIANTS:
        path = tmp_path_factory.mktemp("q8") / variant
        report = conv.convert(
            TEXT / "models" / variant, path, quantize=True, q_bits=8, log=lambda _: None
        )
        out[variant] = path, report
    return out


@pytest.mark.parametrize("variant", VARIANTS)
def test_an_8bit_conversion_reloads_and_passes_the_check(eight_bit, variant):
    path, report = eight_bit[variant]
    assert report.positions > 50
    # Random tiny models have near-even logits: top-1 flips where 8 bits move them slightly.
    assert report.top1_agreement >= 0.85 and 0 <= report.mean_kl < 1e-4
    assert report.converted_bytes < report.source_bytes
    config = json.loads((path / "config.json").read_text())
    assert config["quantization"]["bits"] == 8
    files = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    assert "lm_head.weight" not in files and "model.embed_tokens.scales" in files
    model = load_model(path, "float32")
    assert isinstance(model.language.embed_tokens, nn.QuantizedEmbedding)
    assert "lm_head" not in model.language  # the quantized table serves as the head
    reference_model, processor = load_variant(variant)
    assert checkpoint_stop_ids(path, model.config.eos_token_id) == processor.stop_ids
    prompt = processor.apply_chat_template(SHORT)
    ids = processor(prompt)["input_ids"]
    got, want = np.array(model(ids))[0, -1], np.array(reference_model(ids))[0, -1]
    assert np.corrcoef(got, want)[0, 1] > 0.999
    answer = phi3v_mlx.generate(model, processor, prompt, max_tokens=4)
    assert answer.generation_tokens > 0
