"""Phi-4-reasoning-vision through the shared front ends: its thinking modes in the chat session,
the CLI and the server (``reasoning_content`` read by the official openai client), the split of
reasoning and answer, the re-send policy, and 4-/8-bit conversion.

The model is the tiny checkpoint made a scripted bigram machine (attention and MLP outputs zero,
so each next token depends on the current one alone): after ``<think>`` it says ``Why``, closes
the thought and answers ``42``; after the NOTHINK marker it answers ``OK``; after the generation
prompt's newline it opens a thought by itself (what "auto" lets it do). Its tokenizer is the byte
stand-in of ``test_phi4rv`` with the reasoning markers added as special tokens, as a real tokenizer
may mark them.
"""

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image
from tokenizers import Tokenizer

import phi3v_mlx
from phi3v_mlx.thinking import split_text
from tests.test_phi4rv import CHECKPOINT, ROOT, byte_tokenizer_checkpoint

MARKERS = ["</think>", "<|dummy_84|>"]
# Each scripted token and the one it is followed by.
SCRIPT = [
    ("\n", "<think>"),
    ("<think>", "W"),
    ("W", "h"),
    ("h", "y"),
    ("y", "</think>"),
    ("</think>", "4"),
    ("4", "2"),
    ("2", "<|im_end|>"),
    ("<|dummy_84|>", "O"),
    ("O", "K"),
    ("K", "<|im_end|>"),
]


def scripted_checkpoint(folder: Path) -> Path:
    """The tiny phi4rv checkpoint with the byte tokenizer (markers special) and scripted
    decoder weights (see the module)."""
    byte_tokenizer_checkpoint(folder)
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.add_special_tokens(MARKERS)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "preprocessor_config.json").write_bytes(
        (CHECKPOINT / "preprocessor_config.json").read_bytes()
    )

    def token(text: str) -> int:
        ids = tokenizer.encode(text).ids
        assert len(ids) == 1, text
        return ids[0]

    weights = {}
    for file in CHECKPOINT.glob("*.safetensors"):
        weights.update(mx.load(str(file)))
    weights = {k: np.array(v.astype(mx.float32)) for k, v in weights.items()}
    for name in weights:
        if name.endswith(("self_attn.o_proj.weight", "mlp.down_proj.weight")):
            weights[name][:] = 0
    weights["model.norm.weight"][:] = 1
    embed, head = weights["model.embed_tokens.weight"], weights["lm_head.weight"]
    head[:] = 0
    for dim, (current, following) in enumerate(SCRIPT):
        embed[token(current)] = np.eye(embed.shape[1])[dim]
        head[token(following), dim] = 1
    mx.save_safetensors(
        str(folder / "model.safetensors"),
        {k: mx.array(v).astype(mx.bfloat16) for k, v in weights.items()},
        metadata={"format": "pt"},
    )
    return folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return scripted_checkpoint(tmp_path_factory.mktemp("scripted-phi4rv"))


@pytest.fixture(scope="module")
def loaded(folder):
    return phi3v_mlx.load(folder, dtype="float32")


def image():
    picture = Image.open(ROOT / "images" / "c_second.png")
    picture.load()
    return picture


def reference(model, processor, messages, thinking, max_tokens=16):
    """generate() on the prompt the template gives for ``thinking``."""
    prompt = processor.apply_chat_template(messages, thinking=thinking)
    images = [image()] if "<image>" in prompt else None
    return phi3v_mlx.generate(model, processor, prompt, images=images, max_tokens=max_tokens)


QUESTION = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi?"}]}]
# Mode -> (reasoning, answer, finish reason) of the scripted model.
SPLITS = {
    "on": ("Why", "42", "stop"),
    "off": ("", "OK", "stop"),
    "auto": ("Why", "42", "stop"),
}


@pytest.mark.parametrize("mode", sorted(SPLITS))
def test_session_gives_generate_tokens_split(loaded, mode):
    model, processor = loaded
    want = reference(model, processor, QUESTION, mode)
    assert want.text == {"on": "Why</think>42", "off": "OK", "auto": "<think>Why</think>42"}[mode]
    session = phi3v_mlx.ChatSession(model, processor)
    got = session.send("Hi?", images=[image()], thinking=mode, max_tokens=16)
    assert got.tokens == want.tokens
    assert (got.reasoning, got.text, got.finish_reason) == SPLITS[mode]
    assert split_text(processor, mode, want.text)[:2] == SPLITS[mode][:2]
    assert session.messages[-1] == {
        "role": "assistant",
        "content": SPLITS[mode][1],
        "reasoning_content": SPLITS[mode][0],
    }


def test_thought_that_never_closes_finishes_with_length(loaded):
    model, processor = loaded
    session = phi3v_mlx.ChatSession(model, processor)
    chunks = list(session.stream("Hi?", images=[image()], thinking="on", max_tokens=2))
    assert "".join(c.reasoning for c in chunks) == "Wh"
    assert "".join(c.text for c in chunks) == ""
    assert chunks[-1].finish_reason == "length"
    stopped = reference(model, processor, QUESTION, "on", max_tokens=2)
    assert stopped.finish_reason == "length" and len(stopped.tokens) == 2


def test_resend_policy(loaded):
    model, processor = loaded
    for keep in (False, True):
        session = phi3v_mlx.ChatSession(model, processor, keep_reasoning=keep)
        first = session.send("Hi?", images=[image()], thinking="on", max_tokens=16)
        answer = session.messages[-1]["content"]
        assert answer == ("<think>Why</think>42" if keep else "42")
        second = session.send("And?", thinking="off", max_tokens=16)
        messages = [*QUESTION, {"role": "assistant", "content": answer},
                    {"role": "user", "content": "And?"}]  # fmt: skip
        want = reference(model, processor, messages, "off")
        assert second.tokens == want.tokens and second.text == "OK"
        cached = want.prompt_tokens - second.prompt_tokens
        # Kept, the cache holds the first turn whole (its stop token too): only the new turn
        # is read; dropped, the answer after the thought is read again.
        whole = first.prompt_tokens + len(first.tokens) + 1
        assert cached == (whole if keep else first.prompt_tokens - 1)


def test_models_without_thinking_modes_refuse_it(loaded):
    from tests.conftest import load_variant

    session = phi3v_mlx.ChatSession(*load_variant("tiny-phi35v"))
    with pytest.raises(ValueError, match="no thinking modes"):
        session.send("Hi", thinking="on")
    with pytest.raises(ValueError, match="thinking must be one of"):
        phi3v_mlx.ChatSession(*loaded).send("Hi", thinking="maybe")
