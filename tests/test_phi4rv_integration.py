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

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from PIL import Image
from tokenizers import Tokenizer

import phi3v_mlx
from phi3v_mlx.thinking import split_text
from tests.helpers import serving
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


# --- conversion --------------------------------------------------------------------------------

WIDE = 4304  # SigLIP-so400m's MLP width: no group size divides fc2's input


def wide_vision_checkpoint(folder: Path) -> Path:
    """The tiny checkpoint (its own weights) with the byte tokenizer and a vision MLP as wide as
    the real tower's."""
    folder.mkdir()
    byte_tokenizer_checkpoint(folder)
    (folder / "preprocessor_config.json").write_bytes(
        (CHECKPOINT / "preprocessor_config.json").read_bytes()
    )
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    config["vision_config"]["intermediate_size"] = WIDE
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    weights = {}
    for file in CHECKPOINT.glob("*.safetensors"):
        weights.update(mx.load(str(file)))
    rng = np.random.default_rng(0)
    for name in list(weights):
        if ".mlp.fc1." in name or ".mlp.fc2." in name:
            shape = list(weights[name].shape)
            shape = [WIDE if size == 64 else size for size in shape]
            weights[name] = mx.array(rng.normal(0, 0.05, shape).astype(np.float32))
    mx.save_safetensors(str(folder / "model.safetensors"),
                        {k: v.astype(mx.bfloat16) for k, v in weights.items()},
                        metadata={"format": "pt"})  # fmt: skip
    return folder


def stored(folder: Path) -> dict[str, mx.array]:
    return mx.load(str(next(folder.glob("*.safetensors"))))


@pytest.mark.parametrize(("bits", "vision"), [(4, False), (8, True)])
def test_quantized_conversion_reloads(tmp_path, bits, vision):
    from phi3v_mlx.convert import convert

    source = wide_vision_checkpoint(tmp_path / "source")
    target = tmp_path / "converted"
    convert(source, target, quantize=True, q_bits=bits, quantize_vision=vision, check=False,
            log=lambda line: None)  # fmt: skip
    tensors = stored(target)
    quantized = {name[: -len(".scales")] for name in tensors if name.endswith(".scales")}
    assert "lm_head" in quantized and "model.layers.0.self_attn.qkv_proj" in quantized
    tower = "model.vision_tower.vision_tower.vision_model."
    fc1, fc2 = (f"{tower}encoder.layers.0.mlp.fc{i}" for i in (1, 2))
    assert (fc1 in quantized) == vision and ("model.mm_projector.0" in quantized) == vision
    assert fc2 not in quantized and f"{tower}embeddings.patch_embedding" not in quantized
    settings = json.loads((target / "config.json").read_text())["quantization"]
    assert settings["bits"] == bits and (fc2 in settings) == vision
    if vision:
        assert settings[fc2] is False and settings[fc1] == {"group_size": 32, "bits": bits}

    # Reloaded, it computes what the source does with those layers quantized in memory.
    model, processor = phi3v_mlx.load(target, dtype="bfloat16")
    same, _ = phi3v_mlx.load(source, dtype="bfloat16")

    def predicate(path: str, _) -> bool | dict:
        name = official(same, path)
        return name in quantized and settings.get(name, True)

    nn.quantize(same, bits=bits, class_predicate=predicate)
    small = Image.open(ROOT / "images" / "p_tiny.png")
    inputs = processor("<image>\nHi?", images=[small])
    assert mx.array_equal(last_logits(model, inputs), last_logits(same, inputs))


def last_logits(model, inputs) -> mx.array:
    hidden = model.hidden(model.embed(**inputs), model.make_cache())
    return model.logits(hidden[:, -1:])[0, -1]


def official(model, path: str) -> str:
    return model.official_name(f"{path}.")[:-1]


def test_calibration_image_prompt_is_the_models(tmp_path):
    from phi3v_mlx.fidelity import CALIBRATION_PROMPTS, calibration_inputs
    from phi3v_mlx.models.phi4rv import load_processor

    folder = wide_vision_checkpoint(tmp_path / "source")
    processor = load_processor(folder, phi3v_mlx.models.phi4rv.ModelConfig.from_file(folder))
    inputs = calibration_inputs(processor)
    assert len(inputs) == len(CALIBRATION_PROMPTS) + 1
    ids = np.asarray(inputs[-1]["input_ids"])[0].tolist()
    slots = int(np.asarray(inputs[-1]["num_image_tokens"]).sum())
    assert ids.count(-1) == slots > 0
    text = [t for t in ids if t >= 0]
    assert processor.tokenizer.decode(text).endswith(
        "<|im_start|>user<|im_sep|>\nWhat shapes are in this picture?<|im_end|>\n"
        "<|im_start|>assistant<|im_sep|>\n"
    )


# --- command line ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["on", "off"])
def test_cli_generate_answer_on_stdout_reasoning_on_stderr(loaded, folder, tmp_path, mode):
    from typer.testing import CliRunner

    from phi3v_mlx import cli

    model, processor = loaded
    picture = tmp_path / "picture.png"
    image().save(picture)
    want = reference(model, processor, QUESTION, mode)
    reasoning, answer, _ = split_text(processor, mode, want.text)
    result = CliRunner().invoke(
        cli.app,
        ["generate", "--model", str(folder), "--image", str(picture), "--prompt", "Hi?",
         "--thinking", mode, "-m", "16", "--dtype", "float32", "--verbose"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.stdout == answer + "\n"
    assert (reasoning + "\n") in result.stderr if reasoning else "Why" not in result.stderr
    assert f"Generation: {len(want.tokens)} tokens" in result.stderr


def test_cli_chat_thinking_and_refusals(folder):
    from typer.testing import CliRunner

    from phi3v_mlx import cli

    runner = CliRunner()
    result = runner.invoke(
        cli.app,
        ["chat", "--model", str(folder), "--thinking", "auto", "--dtype", "float32"],
        input="Hi?\nAnd?\n",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.stdout == "42\n42\n" and result.stderr.count("Why\n") == 2
    switched = runner.invoke(
        cli.app,
        ["chat", "--model", str(folder), "--dtype", "float32"],
        input="/thinking off\nHi?\n/thinking maybe\n/thinking on\nAnd?\n",
    )  # fmt: skip
    assert switched.stdout == "OK\n42\n" and switched.exit_code == 1  # the bad mode failed
    assert "(thinking off from the next answer)" in switched.stderr
    assert "error: thinking must be one of on, off, auto; got 'maybe'" in switched.stderr
    bad = runner.invoke(cli.app, ["generate", "--model", str(folder), "-p", "x", "--thinking", "x"])
    assert bad.exit_code != 0 and "thinking must be one of" in str(bad.exception)


# --- server ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(loaded):
    with serving(*loaded) as base:
        yield base


def png_url() -> str:
    import base64
    import io

    data = io.BytesIO()
    image().save(data, format="PNG")
    return "data:image/png;base64," + base64.b64encode(data.getvalue()).decode()


def reasoning_of(message) -> str | None:
    return (message.model_extra or {}).get("reasoning_content")


@pytest.mark.parametrize(
    ("options", "mode"),
    [({"extra_body": {"thinking": "on"}}, "on"), ({"reasoning_effort": "minimal"}, "off"),
     ({}, "auto"), ({"reasoning_effort": "low"}, "auto")],
)  # fmt: skip
def test_server_splits_reasoning_for_the_openai_client(loaded, server, options, mode):
    from tests.test_server import client

    model, processor = loaded
    want = reference(model, processor, QUESTION, mode)
    reasoning, answer, _ = split_text(processor, mode, want.text)
    content = [{"type": "image_url", "image_url": {"url": png_url()}},
               {"type": "text", "text": "Hi?"}]  # fmt: skip
    request = dict(model="tiny", messages=[{"role": "user", "content": content}],
                   max_tokens=16, temperature=0, **options)  # fmt: skip
    api = client(server)
    whole = api.chat.completions.create(**request)
    assert whole.choices[0].message.content == answer
    assert reasoning_of(whole.choices[0].message) == reasoning
    assert whole.choices[0].finish_reason == "stop"
    assert whole.usage.completion_tokens == len(want.tokens)

    stream = api.chat.completions.create(**request, stream=True)
    thought, said, finish = "", "", None
    for chunk in stream:
        delta = chunk.choices[0].delta
        thought += reasoning_of(delta) or ""
        said += delta.content or ""
        finish = chunk.choices[0].finish_reason or finish
    assert (thought, said, finish) == (reasoning, answer, "stop")


def test_server_thought_cut_by_max_tokens_and_refusals(server):
    import openai

    from tests.test_server import client

    api = client(server)
    messages = [{"role": "user", "content": "Hi?"}]
    cut = api.chat.completions.create(model="tiny", messages=messages, max_tokens=2, temperature=0,
                                      extra_body={"thinking": "on"})  # fmt: skip
    choice = cut.choices[0]
    assert choice.finish_reason == "length" and choice.message.content == ""
    assert reasoning_of(choice.message) == "Wh" and cut.usage.completion_tokens == 2
    assert api.models.list().data[0].model_extra["thinking_modes"] == ["on", "off", "auto"]
    for body, message in [
        ({"thinking": "maybe"}, "thinking must be one of"),
        ({"thinking": "on", "reasoning_effort": "high"}, "not both"),
        ({"reasoning_effort": "extreme"}, "reasoning_effort must be one of"),
    ]:
        with pytest.raises(openai.BadRequestError, match=message):
            api.chat.completions.create(model="tiny", messages=messages, extra_body=body)


def test_server_of_a_model_without_thinking_refuses_it():
    import openai

    from tests.test_server import client, live_server

    with live_server() as base:
        api = client(base)
        messages = [{"role": "user", "content": "Hi?"}]
        plain = api.chat.completions.create(model="tiny", messages=messages, max_tokens=2)
        assert reasoning_of(plain.choices[0].message) is None
        for body in ({"thinking": "off"}, {"reasoning_effort": "high"}):
            with pytest.raises(openai.BadRequestError, match="no thinking modes"):
                api.chat.completions.create(model="tiny", messages=messages, extra_body=body)


# --- chat page ---------------------------------------------------------------------------------


def test_chat_page_folds_the_streamed_reasoning(server, tmp_path):
    from selenium.webdriver.support.ui import Select

    from tests.test_chat_page import (
        CHROMEDRIVER,
        CHROMIUM,
        _answers,
        _ask,
        _by_id,
        _set,
        _wait,
        _wait_answer,
        browser,
    )

    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("no headless browser")
    with browser(tmp_path) as driver:
        driver.get(server)
        _wait(lambda: _by_id(driver, "model").text == "tiny")
        _by_id(driver, "toggle-settings").click()
        _wait(lambda: _by_id(driver, "thinking").is_displayed())
        _set(driver, "max-tokens", 16)
        _set(driver, "temperature", 0)
        Select(_by_id(driver, "thinking")).select_by_value("on")
        _ask(driver, "Hi?")
        assert _wait_answer(driver, 1) == "42"
        folded = _answers(driver)[0].find_element("css selector", "details.reasoning")
        assert folded.get_attribute("open") is None
        assert folded.find_element("css selector", ".thought").get_attribute("textContent") == "Why"
        assert folded.find_element("css selector", "summary").text == "Thought"

        Select(_by_id(driver, "thinking")).select_by_value("off")
        _ask(driver, "And?")
        assert _wait_answer(driver, 2) == "OK"
        assert not _answers(driver)[1].find_elements("css selector", "details.reasoning")
        sent = driver.execute_script("return history.map((m) => m.content)")
        assert sent[1] == "42"  # the reasoning is not sent back

        _set(driver, "max-tokens", 2)
        Select(_by_id(driver, "thinking")).select_by_value("on")
        _ask(driver, "Again?")
        assert _wait_answer(driver, 3) == ""
        cut = _answers(driver)[2].find_element("css selector", "details.reasoning summary")
        assert "cut off" in cut.get_attribute("textContent")
