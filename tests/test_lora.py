"""Fine-tuning: adapters learn, load, resume, fuse exactly (and into quantized bases)."""

import json
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from typer.testing import CliRunner

import phi3v_mlx
from phi3v_mlx import adapters, cli, lora
from phi3v_mlx import convert as conv
from phi3v_mlx import fuse as fusing
from tests.conftest import IMAGES, MODELS, TEXT

TARGETS = ["self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj",
           "lm_head"]  # fmt: skip


def _user(text, images=0):
    return {
        "role": "user",
        "content": [{"type": "image"}] * images + [{"type": "text", "text": text}],
    }


ROWS = [
    {"messages": [_user("What colour is the disc?", 1),
                  {"role": "assistant", "content": "The disc is bright red."}],
     "images": ["b_small.png"]},
    {"messages": [{"role": "user", "content": "<|image_1|>\nDescribe the image."},
                  {"role": "assistant", "content": "A tall picture with stripes."}],
     "images": ["d_tall.png"]},
    {"messages": [{"role": "system", "content": "Answer briefly."}, _user("Say hello."),
                  {"role": "assistant", "content": "Hello there, friend!"}]},
    {"messages": [_user("Is it wide?", 1),
                  {"role": "assistant", "content": "Yes, it is very wide."}, _user("How wide?"),
                  {"role": "assistant", "content": "About twice as wide as tall."}],
     "images": ["c_wide.png"]},
]  # fmt: skip


@pytest.fixture
def data(tmp_path):
    for name in ("b_small", "d_tall", "c_wide"):
        shutil.copy(IMAGES / f"{name}.png", tmp_path / f"{name}.png")
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in ROWS) + "\n")
    return path


def trained(folder, data, iters=30, targets=TARGETS, fine_tune_type="lora", start_file=None,
            **settings):  # fmt: skip
    """A model with an adapter trained on ``data`` (float32), and its reports."""
    model, processor = phi3v_mlx.load(folder, dtype="float32")
    examples, images = lora.load_dataset(data, processor, 1, 4096)
    mx.random.seed(0)
    adapter = adapters.AdapterSettings(rank=16, scale=20.0, targets=list(targets),
                                   fine_tune_type=fine_tune_type)  # fmt: skip
    adapters.add_adapters(model, adapter)
    start = adapters.load_adapter_weights(model, start_file) if start_file else 0
    features = lora.encode_dataset_images(model, processor, images)
    out = data.parent / "adapter"
    out.mkdir(exist_ok=True)
    (out / adapters.ADAPTER_CONFIG).write_text(json.dumps(adapters.adapter_config(adapter)))
    options = lora.TrainSettings(iters=iters, batch_size=4, learning_rate=3e-3,
                                 steps_per_report=1, **settings)  # fmt: skip
    reports = lora.train(model, examples, [], features, options, out / adapters.ADAPTER_WEIGHTS,
                         start=start)  # fmt: skip
    return model, processor, reports, out


@pytest.mark.parametrize("variant", ["tiny-phi35v"])  # tiny-phi3v: the same architecture
def test_training_learns_the_answers(variant, data):
    model, processor, reports, _ = trained(MODELS / variant, data)
    losses = [r.train_loss for r in reports if r.train_loss is not None]
    assert len(losses) == 30 and losses[-1] <= losses[0] / 2, losses
    prompt = processor.apply_chat_template(ROWS[0]["messages"][:-1])
    image = [data.parent / "b_small.png"]
    answer = phi3v_mlx.generate(model, processor, prompt, image, 1, max_tokens=3)
    want = processor.tokenizer.encode("The disc is bright red.", add_special_tokens=False)
    base, _ = phi3v_mlx.load(MODELS / variant, dtype="float32")
    before = phi3v_mlx.generate(base, processor, prompt, image, 1, max_tokens=3)
    assert answer.tokens[:2] == want[:2] != before.tokens[:2], (answer.text, before.text)


def test_only_assistant_tokens_are_learned(data):
    _, processor = phi3v_mlx.load(MODELS / "tiny-phi35v")
    examples, _ = lora.load_dataset(data, processor, 2, 4096)
    for example, row in zip(examples, ROWS, strict=True):
        learned = [t for t, keep in zip(example.ids, example.learn, strict=True) if keep]
        answers = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
        want = []
        for text in answers:
            want += processor.tokenizer.encode(text, add_special_tokens=False) + [32007]
        assert learned == want


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_fused_model_equals_base_plus_adapter(data, tmp_path, kind):
    base = MODELS / "tiny-phi35v"
    adapted, processor, _, adapter = trained(base, data, iters=3, fine_tune_type=kind)
    loaded, _ = phi3v_mlx.load(base, dtype="float32", adapter_path=adapter)
    fused_path = tmp_path / "fused"
    report = fusing.fuse(base, adapter, fused_path, dtype="float32", log=lambda _: None)
    fused, _ = phi3v_mlx.load(fused_path, dtype="float32")
    plain, _ = phi3v_mlx.load(base, dtype="float32")
    image = IMAGES / "b_small.png"
    inputs = processor("<|user|>\n<|image_1|>\nWhat colour?<|end|>\n<|assistant|>\n", [image], 1)
    want = np.array(adapted(**inputs))
    np.testing.assert_allclose(np.array(loaded(**inputs)), want, atol=1e-5)
    np.testing.assert_allclose(np.array(fused(**inputs)), want, atol=1e-4)
    assert np.abs(np.array(plain(**inputs)) - want).max() > 1e-2  # the adapter does something
    assert report.top1_agreement == 1.0 and report.mean_kl < 1e-6
    assert report.base_top1_agreement < 1.0


def test_qlora_trains_and_the_requantized_fusion_keeps_the_adapter(data, tmp_path):
    base = tmp_path / "q8"
    conv.convert(MODELS / "tiny-phi3v", base, quantize=True, q_bits=8, check=False,
                 log=lambda _: None)  # fmt: skip
    model, _, reports, adapter = trained(base, data, iters=10)
    layer = model.language.layers[0].self_attn.qkv_proj
    assert type(layer).__name__ == "LoRALinear" and type(layer.linear).__name__ == "QuantizedLinear"
    losses = [r.train_loss for r in reports]
    assert losses[-1] < losses[0] * 0.7
    report = fusing.fuse(base, adapter, tmp_path / "fused-q8", log=lambda _: None)
    config = json.loads((tmp_path / "fused-q8" / "config.json").read_text())
    assert config["quantization"]["bits"] == 8
    # The fused model sits with base + adapter, far from the base alone.
    assert report.top1_agreement > report.base_top1_agreement + 0.2
    assert report.mean_kl < report.base_mean_kl / 4


def test_resume_continues_the_loss_curve(tmp_path):
    data = tmp_path / "text.jsonl"
    data.write_text("\n".join(json.dumps(row) for row in ROWS[2:3] * 2) + "\n")
    folder = MODELS / "tiny-phi3v"
    _, _, first, adapter = trained(folder, data, iters=10)
    saved = adapter / "resume.safetensors"
    shutil.copy(adapter / adapters.ADAPTER_WEIGHTS, saved)
    _, _, again, _ = trained(folder, data, iters=10, start_file=saved)
    assert [r.iteration for r in again] == list(range(11, 21))
    start, end = first[0].train_loss, first[-1].train_loss
    assert again[0].train_loss < (start + end) / 2  # it goes on from where it was


def test_bad_rows_are_one_line_before_training(data, tmp_path):
    _, processor = phi3v_mlx.load(MODELS / "tiny-phi35v")
    good = json.dumps(ROWS[2])
    cases = [
        ("{not json", "line 2: not valid JSON"),
        (json.dumps({**ROWS[0], "images": ["nothing.png"]}), "line 2: image 1"),
        (json.dumps({**ROWS[0], "images": []}), "line 2: the prompt names <|image_1|> but 0"),
        (json.dumps({"messages": [{"role": "user", "content": "hi"}]}), "line 2: no assistant"),
        (json.dumps({"messages": [{"role": "robot", "content": "hi"}]}), "line 2: every message"),
        (json.dumps({**ROWS[2], "messages": [{"role": "user", "content": "word " * 500},
                                             {"role": "assistant", "content": "ok"}]}),
         "line 2: 513 tokens, over --max-seq-length 400"),
    ]  # fmt: skip
    for bad, needle in cases:
        path = tmp_path / "bad.jsonl"
        shutil.copy(IMAGES / "b_small.png", tmp_path / "b_small.png")
        path.write_text(good + "\n" + bad + "\n")
        with pytest.raises(lora.DataError) as error:
            lora.load_dataset(path, processor, 2, 400)
        message = str(error.value)
        assert message.startswith(f"{path}, ") and needle in message and "\n" not in message, (
            message
        )


def test_lora_and_fuse_commands(data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "adapter"
    val = tmp_path / "val.jsonl"
    val.write_text(json.dumps(ROWS[2]) + "\n")
    args = ["lora", "--model", str(MODELS / "tiny-phi35v"), "--data", str(data), "--val-data",
            str(val), "--adapter-path", str(out), "--iters", "6", "--batch-size", "2",
            "--learning-rate", "1e-3", "--steps-per-report", "2", "--steps-per-eval", "3",
            "--save-every", "4", "--num-crops", "1", "--dtype", "float32",
            "--target-modules", "self_attn.o_proj,mlp.down_proj",
            "--target-modules", "lm_head"]  # fmt: skip
    result = CliRunner().invoke(cli.app, args)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows if "train_loss" in r] == [2, 4, 6]
    assert [r["iteration"] for r in rows if "val_loss" in r] == [3, 6]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["lora_parameters"]["keys"] == ["self_attn.o_proj", "mlp.down_proj", "lm_head"]
    weights = mx.load(str(out / "adapters.safetensors"))
    assert "lm_head.lora_a" in weights and "model.layers.1.self_attn.o_proj.lora_b" in weights
    assert (out / "0000004_adapters.safetensors").is_file()
    ask = ["generate", "--model", str(MODELS / "tiny-phi35v"), "-p", "Say hello.", "-m", "4",
           "--dtype", "float32"]  # fmt: skip
    base = CliRunner().invoke(cli.app, ask)
    tuned = CliRunner().invoke(cli.app, [*ask, "--adapter-path", str(out)])
    assert tuned.exit_code == 0 and tuned.stdout != base.stdout
    fused = CliRunner().invoke(cli.app, ["fuse", "--model", str(MODELS / "tiny-phi35v"),
                                         "--adapter-path", str(out), "--save-path",
                                         str(tmp_path / "fused")])  # fmt: skip
    assert fused.exit_code == 0, fused.output
    assert "Fused vs base + adapter" in fused.stderr and "the base alone" in fused.stderr
    monkeypatch.setattr("sys.argv", ["phi3v", "lora", "--model", str(MODELS / "tiny-phi35v"),
                                     "--data", str(tmp_path / "none.jsonl"),
                                     "--adapter-path", str(out)])  # fmt: skip
    monkeypatch.setattr(cli, "load_model", lambda *a, **k: pytest.fail("weights loaded"))
    with pytest.raises(SystemExit) as done:
        cli.main()
    assert done.value.code == 1 and "none.jsonl: no such file" in capsys.readouterr().err


def test_mlx_lm_reads_a_text_model_adapter(tmp_path):
    """Adapter tensors carry the official names, so mlx-lm loads ours on its own Phi-3."""
    from mlx_lm import load as lm_load

    folder = TEXT / "models" / "tiny-phi35-mini"
    data = tmp_path / "text.jsonl"
    data.write_text(json.dumps(ROWS[2]) + "\n")
    trained(folder, data, iters=3, targets=["self_attn.qkv_proj", "lm_head"])
    adapted, _ = lm_load(str(folder), adapter_path=str(tmp_path / "adapter"))
    plain, _ = lm_load(str(folder))
    ids = mx.array([[1, 32010, 29871, 13, 10994, 29892]])
    assert float(mx.abs(adapted(ids) - plain(ids)).max()) > 1e-3
    assert Path(tmp_path / "adapter" / "adapters.safetensors").is_file()


def test_gradient_checkpointing_gives_the_same_gradients(data):
    model, processor = phi3v_mlx.load(MODELS / "tiny-phi35v", dtype="float32")
    examples, images = lora.load_dataset(data, processor, 1, 4096)
    mx.random.seed(1)
    adapters.add_adapters(model, adapters.AdapterSettings(rank=4))
    for layer in model.language.layers:  # non-zero adapters, so every gradient flows
        layer.self_attn.o_proj.lora_b = mx.random.normal(layer.self_attn.o_proj.lora_b.shape)
    features = lora.encode_dataset_images(model, processor, images)
    batch = lora._batch(model, examples[:2], features)
    grads = []
    for checkpoint in (False, True):
        step = nn.value_and_grad(model, lambda m, b, c=checkpoint: lora.loss(m, b, c))
        (value, _), grad = step(model, batch)
        grads.append((float(value.item()), dict(tree_flatten(grad))))
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-6)
    for name, want in grads[0][1].items():
        np.testing.assert_allclose(np.array(grads[1][1][name]), np.array(want), atol=1e-6)


def test_training_reads_long_rows_with_the_sliding_window_inference_uses(tmp_path):
    """Phi-3-mini-4k attends within 2047 positions: its loss in training is the loss of the
    function it runs."""
    model, processor = phi3v_mlx.load(TEXT / "models" / "tiny-phi3-4k", dtype="float32")
    data = tmp_path / "long.jsonl"
    row = {"messages": [_user("word " * 2100), {"role": "assistant", "content": "Noted."}]}
    data.write_text(json.dumps(row))
    examples, _ = lora.load_dataset(data, processor, 1, 4096)
    assert len(examples[0].ids) > model.config.sliding_window + 20
    batch = lora._batch(model, examples, {})
    value, count = lora.loss(model, batch)
    embeddings, targets, mask, _ = batch
    logits = model.logits(model.hidden(embeddings))[0, :-1].astype(mx.float32)
    rows = mx.array(np.flatnonzero(np.array(mask[0])))
    want = nn.losses.cross_entropy(logits[rows], targets[0][rows]).mean()
    assert int(count.item()) == rows.size
    assert float(value.item()) == pytest.approx(float(want.item()), abs=1e-5)
