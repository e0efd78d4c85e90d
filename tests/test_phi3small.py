"""Phi-3-small: the tiny checkpoint against the official code's goldens, the block-sparse pattern,
chunked and cached attention against dense references."""

import base64
import json
import shutil
import sys

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import BatchKVCache, QuantizedKVCache

import phi3v_mlx
from phi3v_mlx.cache import RopeState
from phi3v_mlx.config import ConfigError
from phi3v_mlx.models.phi3small import Model, ModelConfig, load_processor
from phi3v_mlx.models.phi3small.sparse import SparsePattern, block_sparse_attention
from phi3v_mlx.models.phi3small.tokenizer import RANKS_FILE, TokenizerError
from tests.conftest import TEXT

FOLDER = TEXT / "models" / "tiny-phi3-small"
GOLDEN = TEXT / "golden" / "tiny-phi3-small"
INPUTS = TEXT / "golden" / "inputs" / "tiny-phi3-small"
TOL = dict(atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def tiny() -> Model:
    model = Model(ModelConfig.from_file(FOLDER))
    weights = {}
    for file in sorted(FOLDER.glob("*.safetensors")):
        weights.update(mx.load(str(file)))
    weights = {k: v.astype(mx.float32) for k, v in model.sanitize(weights).items()}
    model.load_weights(list(weights.items()))
    mx.eval(model.parameters())
    return model


def case(name: str):
    ids = np.load(INPUTS / f"case_{name}.npz")["input_ids"].astype(np.int32)
    return ids, np.load(GOLDEN / f"case_{name}.npz")


def random_model(**changes) -> Model:
    """A random model like the tiny one, with small blocks so that short sequences are sparse."""
    values = json.loads((FOLDER / "config.json").read_text())
    values.update(vocab_size=512, num_hidden_layers=2, **changes)
    mx.random.seed(0)
    model = Model(ModelConfig.from_dict(values))
    mx.eval(model.parameters())
    return model


@pytest.mark.parametrize("name", ["a", "b"])
def test_prompt_logits_match_official(tiny, name):
    ids, gold = case(name)
    logits = np.array(tiny(mx.array(ids)))[0]
    top = logits.max(-1, keepdims=True)
    lse = np.log(np.exp(logits - top).sum(-1)) + top[:, 0]
    np.testing.assert_allclose(lse, gold["logsumexp"], **TOL)
    chosen = np.take_along_axis(logits, gold["top5_ids"].astype(np.int64), -1)
    np.testing.assert_allclose(chosen, gold["top5_logits"], **TOL)
    masked = gold["logits"][0] <= -1e30
    assert masked.sum() == 91 and np.all(logits[-1][masked] <= -1e30)
    np.testing.assert_allclose(logits[-1][~masked], gold["logits"][0][~masked], **TOL)


@pytest.mark.parametrize("name", ["a", "b"])
def test_cached_greedy_matches_official(tiny, name):
    ids, gold = case(name)
    want = gold["greedy_tokens"].tolist()
    cache = tiny.make_cache()
    h = tiny.hidden(tiny.embed_tokens(mx.array(ids)), cache)
    got = []
    for _ in want:
        token = int(tiny.logits(h[:, -1:]).argmax(-1).item())
        got.append(token)
        h = tiny.hidden(tiny.embed_tokens(mx.array([[token]])), cache)
    assert got == want


def test_vertical_blocks_follow_the_head_offset():
    config = ModelConfig.from_file(FOLDER)
    pattern = SparsePattern.from_config(config)
    block = pattern.block
    # 4 heads, stride 8: the head offset is int(8 / 4) = 2.
    queries = mx.array([30 * block])
    keys = mx.arange(31) * block
    seen = np.array(pattern.allowed(queries, keys))[:, 0]
    local = set(range(15, 31))
    expected = {0: {7}, 1: {5, 13}, 2: {3, 11}, 3: {1, 9}}
    for head, vertical in expected.items():
        assert set(np.flatnonzero(seen[head])) == local | vertical
    # The real model's 32 heads: offset 1, so head h's vertical blocks are (-(h + 1)) mod 8.
    real = SparsePattern.from_config(
        ModelConfig.from_dict(
            {
                **config.__dict__,
                "num_attention_heads": 32,
                "hidden_size": 512,
                "num_key_value_heads": 8,
            }
        )
    )
    assert real.residues[:9] == (7, 6, 5, 4, 3, 2, 1, 0, 7)
    # Within a block a query sees only the keys at or before it.
    inside = np.array(pattern.allowed(mx.array([block + 3]), mx.arange(block, 2 * block)))
    assert inside[:, 0].sum(-1).tolist() == [4, 4, 4, 4]


def reference_attention(q, k, v, scale, heads, block, local, stride):
    """Dense softmax attention under the official block rule, in float64 numpy."""
    T = q.shape[2]
    step = max(1, stride // heads)
    i = np.arange(T)[:, None]
    j = np.arange(T)[None]
    out = np.zeros(q.shape)
    for h in range(heads):
        vertical = (j // block + h * step + 1) % stride == 0
        mask = (j <= i) & ((i // block - j // block < local) | vertical)
        kv = h // (heads // k.shape[1])
        scores = q[0, h] @ k[0, kv].T * scale
        scores = np.where(mask, scores, -np.inf)
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        out[0, h] = (weights / weights.sum(-1, keepdims=True)) @ v[0, kv]
    return out


@pytest.mark.parametrize(
    "block, local, stride, heads", [(64, 16, 8, 4), (16, 4, 4, 8), (16, 3, 8, 2)]
)
def test_chunked_sparse_attention_equals_dense_reference(block, local, stride, heads):
    T, kv_heads, dims = 1200, 2, 16
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((1, n, T, dims)) for n in (heads, kv_heads, kv_heads))
    pattern = SparsePattern(
        block,
        local,
        stride,
        tuple(-(h * max(1, stride // heads) + 1) % stride for h in range(heads)),
    )
    parts = []
    for start in list(range(0, T, 256)):
        end = min(T, start + 256)
        q32, k32, v32 = (mx.array(x, dtype=mx.float32) for x in (q, k, v))
        parts.append(
            block_sparse_attention(
                q32[:, :, start:end], k32[:, :, :end], v32[:, :, :end], start, 0.25, pattern
            )
        )
    chunked = np.array(mx.concatenate(parts, axis=2))
    whole = np.array(
        block_sparse_attention(
            *(mx.array(x, dtype=mx.float32) for x in (q, k, v)), 0, 0.25, pattern
        )
    )
    want = reference_attention(q, k, v, 0.25, heads, block, local, stride)
    np.testing.assert_allclose(chunked, want, atol=2e-5)
    np.testing.assert_allclose(whole, want, atol=2e-5)
    for p in (T - 70, T - 1):  # decode steps
        step = block_sparse_attention(
            *(mx.array(x[:, :, : p + 1], dtype=mx.float32) for x in (q, k, v)), 0, 0.25, pattern
        )[:, :, -1:]
        single = block_sparse_attention(
            mx.array(q[:, :, p : p + 1], dtype=mx.float32),
            *(mx.array(x[:, :, : p + 1], dtype=mx.float32) for x in (k, v)),
            p,
            0.25,
            pattern,
        )
        np.testing.assert_allclose(np.array(single), want[:, :, p : p + 1], atol=2e-5)
        np.testing.assert_allclose(np.array(step), want[:, :, p : p + 1], atol=2e-5)


def test_chunked_prefill_and_decode_match_the_whole_forward():
    model = random_model(blocksparse_block_size=16, blocksparse_num_local_blocks=3)
    ids = mx.array(np.random.default_rng(2).integers(0, 100, (1, 230)).astype(np.int32))
    whole = model(ids)
    cache = model.make_cache()
    bounds = [0, 64, 128, 192, 200]
    parts = [model(ids[:, s:e], cache=cache) for s, e in zip(bounds[:-1], bounds[1:], strict=True)]
    parts += [model(ids[:, t : t + 1], cache=cache) for t in range(200, 230)]
    np.testing.assert_allclose(np.array(mx.concatenate(parts, axis=1)), np.array(whole), atol=1e-5)


def test_dense_layers_are_every_nth():
    config = ModelConfig.from_file(FOLDER)
    assert [config.is_dense(i) for i in range(4)] == [False, True, False, True]
    model = Model(config)
    assert [layer.self_attn.pattern is None for layer in model.layers] == [False, True] * 2


def test_refusals_are_one_line():
    values = json.loads((FOLDER / "config.json").read_text())
    with pytest.raises(ConfigError, match="rope_scaling"):
        ModelConfig.from_dict({**values, "rope_scaling": {"type": "su"}})
    with pytest.raises(ConfigError, match="phi3small"):
        ModelConfig.from_dict({**values, "model_type": "phi3"})
    with pytest.raises(ValueError, match="max_kv_size"):
        random_model().make_cache(max_kv_size=128)


def test_batch_step_matches_solo_forwards():
    model = random_model(blocksparse_block_size=16, blocksparse_num_local_blocks=3)
    rng = np.random.default_rng(3)
    rows = [rng.integers(0, 100, n).astype(np.int32) for n in (120, 75)]
    caches = []
    for ids in rows:
        cache = model.make_cache()
        model.hidden(model.embed_tokens(mx.array(ids[None])), cache)
        caches.append(cache)
    batch = [BatchKVCache.merge([c[i] for c in caches]) for i in range(len(model.layers))]
    batch.append(RopeState.merge([c.rope for c in caches]))
    step = mx.array([[7], [11]])
    logits = np.array(model.language.batch_logits(model.embed_tokens(step), batch))
    for row, ids in enumerate(rows):
        solo = model(mx.array(np.append(ids, step[row, 0].item())[None]))[0, -1]
        np.testing.assert_allclose(logits[row, 0], np.array(solo), atol=1e-5)


def test_quantized_kv_cache_is_refused():
    model = random_model()
    cache = model.make_cache()
    cache[0] = QuantizedKVCache(group_size=16, bits=8)
    with pytest.raises(ValueError, match="quantized KV cache"):
        model(mx.array([[1, 2, 3]]), cache=cache)


CASE_B_MESSAGES = [
    {"role": "system", "content": "You are a careful assistant who answers briefly."},
    {
        "role": "user",
        "content": "Explain in two or three simple sentences why the sky looks blue during a "
        "clear day but turns red and orange at sunset.",
    },
]
CASE_A_MESSAGES = [
    {"role": "user", "content": "What is the capital of France? Answer in one word."}
]


@pytest.fixture(scope="module")
def loaded_tiny():
    return phi3v_mlx.load(FOLDER, dtype="float32")


@pytest.mark.parametrize("name, messages", [("a", CASE_A_MESSAGES), ("b", CASE_B_MESSAGES)])
def test_chat_template_and_tokenizer_give_the_official_ids(loaded_tiny, name, messages):
    _, processor = loaded_tiny
    text = processor.apply_chat_template(messages)
    ids = processor(text)["input_ids"]
    assert np.array(ids).tolist() == case(name)[0].tolist()
    assert processor.tokenizer.decode(np.array(ids)[0].tolist()) == text


def test_stop_ids_and_streamed_text(loaded_tiny):
    _, processor = loaded_tiny
    assert processor.stop_ids == {100257, 100266}  # <|endoftext|>, <|end|>
    tokenizer = processor.tokenizer
    text = "Grüße, 世界 😀\n  code: x = [1, 2]"
    detokenizer = tokenizer.detokenizer
    detokenizer.reset()
    for token in tokenizer.encode(text):
        detokenizer.add_token(token)
    detokenizer.finalize()
    assert detokenizer.text == text
    assert tokenizer.encode("<|user|><|end|>") == [100262, 100266]


def test_generate_from_ids_and_from_text(loaded_tiny):
    model, processor = loaded_tiny
    ids, gold = case("a")
    want = gold["greedy_tokens"][:8].tolist()
    by_ids = phi3v_mlx.generate(
        model, processor, input_ids=ids[0].tolist(), max_tokens=8, temperature=0.0
    )
    assert list(by_ids.tokens) == want
    text = processor.apply_chat_template(CASE_A_MESSAGES)
    by_text = phi3v_mlx.generate(model, processor, text, max_tokens=8, temperature=0.0)
    assert list(by_text.tokens) == want


def write_ranks(path, ranks):
    lines = (f"{base64.b64encode(token).decode()} {rank}\n" for token, rank in ranks.items())
    path.write_text("".join(lines))


def test_ranks_file_of_the_checkpoint_is_read(loaded_tiny, tmp_path):
    ranks = loaded_tiny[1].tokenizer.ranks
    for name in ("config.json", "generation_config.json"):
        shutil.copy(FOLDER / name, tmp_path / name)
    template = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    write_ranks(tmp_path / RANKS_FILE, ranks)
    config = ModelConfig.from_file(tmp_path)
    processor = load_processor(tmp_path, config)
    assert processor.tokenizer.encode("hello world") == [15339, 1917]
    assert processor.apply_chat_template(CASE_A_MESSAGES) == f"[{CASE_A_MESSAGES[0]['content']}]"
    write_ranks(tmp_path / RANKS_FILE, dict(list(ranks.items())[:1000]))
    with pytest.raises(TokenizerError, match="not cl100k_base"):
        load_processor(tmp_path, config)
    (tmp_path / RANKS_FILE).write_text("IQ== 0\nnot a rank line at all\n")
    with pytest.raises(TokenizerError, match="line 2"):
        load_processor(tmp_path, config)


def test_missing_tiktoken_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "tiktoken", None)
    with pytest.raises(TokenizerError, match=r"pip install 'phi3v-mlx\[phi3small\]'"):
        load_processor(FOLDER, ModelConfig.from_file(FOLDER))


def test_default_adapter_targets_are_phi3_small_modules():
    from mlx.utils import tree_flatten

    from phi3v_mlx.adapters import AdapterSettings, add_adapters

    model = Model(ModelConfig.from_file(FOLDER))
    add_adapters(model, AdapterSettings(rank=2))
    adapted = {name.split(".lora_")[0] for name, _ in tree_flatten(model.trainable_parameters())}
    assert adapted == {
        f"language.layers.{i}.{target}" for i in range(4) for target in model.lora_targets
    }
