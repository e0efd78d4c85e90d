"""Thinking modes in batches: ``batch_generate``'s ``thinking`` (per batch and per request) and
``phi3v batch --thinking``, on the scripted Phi-4-reasoning-vision checkpoint of
``test_phi4rv_integration``: every row gives ``generate()``'s tokens on the prompt rendered in its
mode, its reasoning apart from its answer."""

import json
import sys

import pytest
from typer.testing import CliRunner

import phi3v_mlx
from phi3v_mlx import cli
from phi3v_mlx.generate import chat_prompt
from tests.conftest import load_variant
from tests.test_phi4rv_integration import (
    QUESTION,
    SPLITS,
    image,
    reference,
    scripted_checkpoint,
)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return scripted_checkpoint(tmp_path_factory.mktemp("scripted-phi4rv-batch"))


@pytest.fixture(scope="module")
def loaded(folder):
    return phi3v_mlx.load(folder, dtype="float32")


def prompt(processor, mode):
    return processor.apply_chat_template(QUESTION, thinking=mode)


def test_rows_give_generate_tokens_split_by_their_mode(loaded):
    model, processor = loaded
    modes = ["on", "off", "auto", "on"]
    rows = [{"prompt": prompt(processor, m), "images": [image()], "thinking": m} for m in modes]
    rows[3] = {"prompt": prompt(processor, "on"), "images": [image()], "max_tokens": 2}
    results = phi3v_mlx.batch_generate(model, processor, rows, batch_size=3, thinking="on",
                                       max_tokens=16)  # fmt: skip
    for mode, got in zip(modes[:3], results, strict=False):
        want = reference(model, processor, QUESTION, mode)
        assert got.tokens == want.tokens
        assert (got.reasoning, got.text, got.finish_reason) == SPLITS[mode]
    # The batch's mode for a row without its own; its thought cut by max_tokens: "length".
    cut = results[3]
    assert cut.tokens == reference(model, processor, QUESTION, "on", max_tokens=2).tokens
    assert (cut.reasoning, cut.text, cut.finish_reason) == ("Wh", "", "length")


def test_without_a_mode_the_text_is_left_as_generated(loaded):
    model, processor = loaded
    (got,) = phi3v_mlx.batch_generate(
        model, processor, [{"prompt": prompt(processor, "auto"), "images": [image()]}],
        max_tokens=16,
    )  # fmt: skip
    assert (got.text, got.reasoning) == ("<think>Why</think>42", "")


def test_refusals(loaded):
    model, processor = loaded
    other = load_variant("tiny-phi35v")
    with pytest.raises(ValueError, match="^this model has no thinking modes$"):
        phi3v_mlx.batch_generate(*other, ["<|user|>\nHi<|end|>\n<|assistant|>\n"], thinking="off")
    with pytest.raises(ValueError, match="^request 1: this model has no thinking modes$"):
        phi3v_mlx.batch_generate(*other, [{"prompt": "Hi", "thinking": "on"}], max_tokens=2)
    with pytest.raises(ValueError, match="thinking must be one of on, off, auto; got 'maybe'"):
        phi3v_mlx.batch_generate(model, processor, ["x"], thinking="maybe")
    rows = [{"prompt": prompt(processor, "on"), "images": [image()], "thinking": "off"},
            {"prompt": prompt(processor, "off"), "images": [image()]}]  # fmt: skip
    out = dict(phi3v_mlx.stream_batch_generate(model, processor, rows, thinking="off",
                                               max_tokens=16))  # fmt: skip
    assert isinstance(out[0], ValueError)
    assert str(out[0]) == "the prompt is rendered in thinking mode 'on', not 'off'"
    assert (out[1].reasoning, out[1].text) == SPLITS["off"][:2]


@pytest.mark.parametrize("mode", [None, "on", "off"])
def test_batch_command_writes_the_reasoning_apart(loaded, folder, tmp_path, mode):
    model, processor = loaded
    picture = tmp_path / "c_second.png"
    image().save(picture)
    out = tmp_path / "out.jsonl"
    args = ["batch", str(picture), "-p", "Hi?", "--output", str(out), "--model", str(folder),
            "-m", "16", "--dtype", "float32"]  # fmt: skip
    done = CliRunner().invoke(cli.app, args + (["--thinking", mode] if mode else []))
    assert done.exit_code == 0, done.output
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    used = mode or "auto"
    want = phi3v_mlx.generate(model, processor, chat_prompt(processor, "Hi?", 1, thinking=used),
                              images=[image()], max_tokens=16)  # fmt: skip
    assert row["generation_tokens"] == len(want.tokens)
    assert (row["reasoning"], row["text"], row["finish_reason"]) == SPLITS[used]
    assert list(row).index("reasoning") == list(row).index("text") - 1


def test_batch_command_of_a_model_without_modes(tmp_path, monkeypatch, capsys):
    from tests.conftest import IMAGES, MODELS

    out = tmp_path / "out.jsonl"
    plain = ["batch", str(IMAGES / "b_small.png"), "-p", "x", "--output", str(out), "--model",
             str(MODELS / "tiny-phi35v"), "-m", "2", "--num-crops", "1",
             "--dtype", "float32"]  # fmt: skip
    done = CliRunner().invoke(cli.app, plain)
    assert done.exit_code == 0, done.output
    assert "reasoning" not in json.loads(out.read_text())
    monkeypatch.setattr(cli, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    monkeypatch.setattr(sys, "argv", ["phi3v", *plain, "--thinking", "on"])
    with pytest.raises(SystemExit) as stopped:
        cli.main()
    assert stopped.value.code == 1
    assert capsys.readouterr().err.strip() == "error: this model has no thinking modes"
