"""Batched generation: every row equals generate() alone; phi3v batch end to end and resumed."""

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import pytest
from typer.testing import CliRunner

import phi3v_mlx
from phi3v_mlx import cli
from phi3v_mlx.batch import Request, StopStrings, as_request
from phi3v_mlx.generate import SamplingOptions
from phi3v_mlx.keys import common_prefix
from tests.conftest import IMAGES, MODELS, load_variant, open_image
from tests.helpers import count_vision_runs

ROOT = Path(__file__).resolve().parents[1]
TINY = str(MODELS / "tiny-phi35v")


def _requests():
    """Mixed sizes, text-only rows, a two-image row, different max_tokens and crop counts."""
    tall, wide, small = open_image("d_tall"), open_image("c_wide"), open_image("b_small")
    return [
        {"prompt": "<|user|>\n<|image_1|>\nDescribe it.<|end|>\n<|assistant|>\n",
         "images": [small], "num_crops": 4, "max_tokens": 12},
        "<|user|>\nHello there<|end|>\n<|assistant|>\n",
        {"prompt": "<|user|>\n<|image_1|>\n<|image_2|>\nCompare them.<|end|>\n<|assistant|>\n",
         "images": [tall, wide], "num_crops": 2, "max_tokens": 5},
        {"prompt": "<|system|>\nBe brief.<|end|>\n<|user|>\nWhy?<|end|>\n<|assistant|>\n",
         "max_tokens": 9},
        {"prompt": "<|user|>\n<|image_1|>\nWhat colour?<|end|>\n<|assistant|>\n",
         "images": [wide], "num_crops": 1, "max_tokens": 3},
    ]  # fmt: skip


def _solo(model, processor, requests, **sampling):
    out = []
    for item in requests:
        request = as_request(item)
        options = {**sampling, **request.options}
        images = list(request.images) or None
        result = phi3v_mlx.generate(
            model, processor, request.prompt, images, request.num_crops, **options
        )
        out.append(result)
    return out


def test_rows_equal_generate_alone_whatever_the_batch(loaded):
    model, processor = loaded
    requests = _requests()
    want = _solo(model, processor, requests, max_tokens=7)
    for batch_size in (1, 3, 8):
        got = phi3v_mlx.batch_generate(model, processor, requests, batch_size=batch_size,
                                       max_tokens=7)  # fmt: skip
        assert [r.tokens for r in got] == [r.tokens for r in want], batch_size
        assert [r.text for r in got] == [r.text for r in want]
        assert [r.finish_reason for r in got] == [r.finish_reason for r in want]
        assert [r.prompt_tokens for r in got] == [r.prompt_tokens for r in want]


def test_rows_crossing_the_rope_threshold(tmp_path):
    """With the threshold lowered to 40, rows cross it while decoding together with rows that
    start past it (the image row) and rows that never reach it."""
    path = tmp_path / "low"
    shutil.copytree(MODELS / "tiny-phi3v", path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(
        json.dumps({**config, "original_max_position_embeddings": 40})
    )
    model, processor = phi3v_mlx.load(path, dtype="float32")
    requests = [
        {"prompt": "<|user|>\nHello there, how are you?<|end|>\n<|assistant|>\n", "max_tokens": 30},
        {"prompt": "<|user|>\nHi<|end|>\n<|assistant|>\n", "max_tokens": 40},
        {"prompt": "<|user|>\n<|image_1|>\nDescribe.<|end|>\n<|assistant|>\n",
         "images": [open_image("b_small")], "num_crops": 1, "max_tokens": 10},
        {"prompt": "<|user|>\nShort one<|end|>\n<|assistant|>\n", "max_tokens": 6},
    ]  # fmt: skip
    want = _solo(model, processor, requests)
    assert want[0].prompt_tokens < 40 < want[0].prompt_tokens + 30
    for batch_size in (2, 4):
        got = phi3v_mlx.batch_generate(model, processor, requests, batch_size=batch_size)
        assert [r.tokens for r in got] == [r.tokens for r in want], batch_size


def test_a_text_model_batches_too():
    model, processor = load_variant("tiny-phi35-moe")
    prompts = [f"<|user|>\nQuestion {i}: why?<|end|>\n<|assistant|>\n" for i in range(5)]
    want = _solo(model, processor, prompts, max_tokens=8)
    got = phi3v_mlx.batch_generate(model, processor, prompts, batch_size=3, max_tokens=8)
    assert [r.tokens for r in got] == [r.tokens for r in want]


def test_images_of_admitted_rows_share_one_vision_run(monkeypatch):
    model, processor = load_variant("tiny-phi35v")
    runs = count_vision_runs(model, monkeypatch)
    requests = _requests()
    phi3v_mlx.batch_generate(model, processor, requests, batch_size=8, max_tokens=2)
    crops = [processor.preprocess(as_request(r).images, as_request(r).num_crops).pixel_values
             for r in requests]  # fmt: skip
    assert runs == [sum(len(c) for c in crops)]  # one run, real crops only


def test_seeded_sampling_is_reproducible(loaded):
    model, processor = loaded
    kw = dict(max_tokens=8, temperature=1.0, top_p=0.9)
    prompts = [f"<|user|>\nTell me about {w}.<|end|>\n<|assistant|>\n" for w in "abcd"]
    first = phi3v_mlx.batch_generate(model, processor, prompts, batch_size=3, seed=5, **kw)
    again = phi3v_mlx.batch_generate(model, processor, prompts, batch_size=3, seed=5, **kw)
    other = phi3v_mlx.batch_generate(model, processor, prompts, batch_size=3, seed=6, **kw)
    assert [r.tokens for r in first] == [r.tokens for r in again]
    assert [r.tokens for r in first] != [r.tokens for r in other]


def test_the_iterator_yields_rows_as_they_end_and_bad_rows_as_errors(tmp_path):
    model, processor = load_variant("tiny-phi35v")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    requests = [
        {"prompt": "<|user|>\nLong<|end|>\n<|assistant|>\n", "max_tokens": 9},
        {"prompt": "<|user|>\n<|image_1|>\nX<|end|>\n<|assistant|>\n",
         "images": [tmp_path / "broken.png"]},
        {"prompt": "<|user|>\nShort<|end|>\n<|assistant|>\n", "max_tokens": 2},
    ]  # fmt: skip
    seen = list(phi3v_mlx.stream_batch_generate(model, processor, requests, batch_size=4))
    assert [index for index, _ in seen] == [1, 2, 0]
    assert isinstance(seen[0][1], ValueError) and "broken.png" in str(seen[0][1])
    assert len(seen[1][1].tokens) == 2 and len(seen[2][1].tokens) == 9
    with pytest.raises(ValueError, match="request 2: .*broken.png"):
        phi3v_mlx.batch_generate(model, processor, requests)
    with pytest.raises(ValueError, match="not supported in batched"):
        phi3v_mlx.batch_generate(model, processor, ["hi"], kv_bits=8)


@pytest.fixture
def inputs(tmp_path):
    """A folder of images (one corrupt), a manifest with a text-only and a two-image row."""
    folder = tmp_path / "photos" / "nested"
    folder.mkdir(parents=True)
    for name in ("b_small", "c_wide"):
        shutil.copy(IMAGES / f"{name}.png", folder / f"{name}.png")
    (tmp_path / "photos" / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    (tmp_path / "photos" / "notes.txt").write_text("not an image")
    manifest = tmp_path / "set.jsonl"
    rows = [{"id": "pair", "images": ["photos/nested/b_small.png", "photos/nested/c_wide.png"],
             "prompt": "Compare."},
            {"id": "text", "prompt": "Say hello."},
            {"image": "photos/nested/b_small.png"}]  # fmt: skip
    manifest.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return tmp_path


def _batch_args(root, out, *extra):
    return ["batch", str(root / "photos"), str(root / "set.jsonl"), "--prompt", "Describe it.",
            "--output", str(out), "--model", TINY, "-m", "4", "--num-crops", "2",
            "--batch-size", "3", *extra]  # fmt: skip


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_batch_command_end_to_end(inputs):
    out = inputs / "out.jsonl"
    result = CliRunner().invoke(cli.app, _batch_args(inputs, out))
    assert result.exit_code == 0, result.output
    rows = {row["id"]: row for row in _rows(out)}
    photos = inputs / "photos"
    assert set(rows) == {str(photos / "broken.jpg"), str(photos / "nested" / "b_small.png"),
                         str(photos / "nested" / "c_wide.png"), "pair", "text",
                         "photos/nested/b_small.png"}  # fmt: skip
    assert "cannot be read" in rows[str(photos / "broken.jpg")]["error"]
    assert rows["text"]["images"] == [] and rows["text"]["prompt"] == "Say hello."
    assert rows["photos/nested/b_small.png"]["prompt"] == "Describe it."
    model, processor = phi3v_mlx.load(TINY)
    question = processor.apply_chat_template([{"role": "user", "content": [
        {"type": "image"}, {"type": "image"}, {"type": "text", "text": "Compare."}]}])  # fmt: skip
    images = [photos / "nested" / "b_small.png", photos / "nested" / "c_wide.png"]
    want = phi3v_mlx.generate(model, processor, question, images, 2, max_tokens=4)
    assert rows["pair"]["text"] == want.text and rows["pair"]["generation_tokens"] == 4
    assert rows["pair"]["prompt_tokens"] == want.prompt_tokens
    assert "Answered 6 of 6 inputs (1 errors)" in result.stderr


def test_batch_resumes_after_an_interruption(inputs):
    out = inputs / "out.jsonl"
    CliRunner().invoke(cli.app, _batch_args(inputs, out))
    complete = {row["id"]: row for row in _rows(out)}
    lines = out.read_text().splitlines()
    out.write_text("\n".join(lines[:2]) + "\n" + lines[2][:20])  # a crash mid-line
    again = CliRunner().invoke(cli.app, _batch_args(inputs, out))
    assert again.exit_code == 0, again.output
    rows = _rows(out)
    assert len(rows) == 6 and {row["id"]: row for row in rows} == complete
    assert "Answered 4 of 4 inputs" in again.stderr
    fresh = CliRunner().invoke(cli.app, _batch_args(inputs, out, "--overwrite"))
    assert "Answered 6 of 6" in fresh.stderr and len(_rows(out)) == 6


def test_batch_input_errors_come_before_loading(inputs, monkeypatch, capsys):
    monkeypatch.setattr(cli, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    (inputs / "empty").mkdir()
    (inputs / "bad.jsonl").write_text('{"id": "a", "prompt": "x"}\n{"id": \n')
    (inputs / "dup.jsonl").write_text('{"id": "a", "prompt": "x"}\n{"id": "a", "prompt": "y"}\n')
    out = str(inputs / "out.jsonl")
    cases = [
        ([str(inputs / "nothing.png"), "-p", "x"], "nothing.png: no such file or folder"),
        ([str(inputs / "empty"), "-p", "x"], "empty: no images in this folder"),
        ([str(inputs / "bad.jsonl")], "bad.jsonl, line 2: not valid JSON"),
        ([str(inputs / "dup.jsonl")], "duplicate id 'a'"),
        ([str(inputs / "photos")], "--prompt is needed for image inputs"),
    ]
    for args, needle in cases:
        monkeypatch.setattr(sys, "argv", ["phi3v", "batch", *args, "--output", out])
        with pytest.raises(SystemExit) as done:
            cli.main()
        err = capsys.readouterr().err.strip()
        assert done.value.code == 1 and err.startswith("error: ") and "\n" not in err, err
        assert needle in err, err
    args = ["phi3v", "batch", str(inputs / "photos"), "-p", "x", "--output",
            str(inputs / "missing" / "out.jsonl")]  # fmt: skip
    monkeypatch.setattr(sys, "argv", args)
    with pytest.raises(SystemExit) as done:
        cli.main()
    err = capsys.readouterr().err.strip()
    assert done.value.code == 1 and err.endswith(f"the folder {inputs / 'missing'} does not exist")


def test_two_ranks_under_mlx_launch_give_the_same_rows(inputs):
    single, double = inputs / "one.jsonl", inputs / "two.jsonl"
    CliRunner().invoke(cli.app, _batch_args(inputs, single))
    launcher = Path(sys.executable).parent / "mlx.launch"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [str(launcher), "--backend", "ring", "-n", "2", "--", sys.executable, "-m", "phi3v_mlx",
         *_batch_args(inputs, double)],
        capture_output=True, text=True, env=env, timeout=300, cwd=str(inputs),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    one = {row["id"]: row for row in _rows(single)}
    two = {row["id"]: row for row in _rows(double)}
    assert two == one
    assert done.stderr.count("Answered 6 of 6") == 1


def test_engine_counts_what_it_did():
    """Decoding tokens and seconds: every token after each row's first comes from decoding."""
    model, processor = load_variant("tiny-phi35v")
    engine = phi3v_mlx.BatchEngine(model, processor, batch_size=2)
    for i in range(3):
        engine.submit(
            f"<|user|>\nQuestion {i}<|end|>\n<|assistant|>\n", SamplingOptions(max_tokens=5)
        )
    results = []
    while engine.pending():
        results += [e.result for e in engine.step() if e.result is not None]
    engine.close()
    assert engine.stats.decode_tokens == sum(len(r.tokens) for r in results) - len(results)
    assert engine.stats.prompt_tokens == sum(r.prompt_tokens for r in results)
    assert engine.stats.decode_seconds > 0 and engine.stats.decode_tps > 0


def test_stop_strings_hold_back_only_what_could_begin_a_match():
    stops = StopStrings(["world", "\n\n"])
    assert stops.feed("Hello w") == ("Hello ", False)
    assert stops.feed("or") == ("", False)
    assert stops.feed("k is done\n") == ("work is done", False)
    assert stops.feed("\nmore") == ("", True)
    again = StopStrings(["END"])
    assert again.feed("the EN") == ("the ", False)
    assert again.flush() == "EN"


def test_kept_caches_hold_what_was_fed_however_a_row_ended():
    model, processor = load_variant("tiny-phi35v")
    prompt = "<|user|>\nTell me a story<|end|>\n<|assistant|>\n"
    free = phi3v_mlx.generate(model, processor, prompt, max_tokens=10)
    stop = free.text[len(free.text) // 2]
    engine = phi3v_mlx.BatchEngine(model, processor, batch_size=2)
    engine.submit(prompt, SamplingOptions(max_tokens=10), keep_cache=True)
    engine.submit({"prompt": prompt, "stop": [stop]}, SamplingOptions(max_tokens=10),
                  keep_cache=True)  # fmt: skip
    ended = []
    while engine.pending():
        ended += [e for e in engine.step() if e.result is not None]
    engine.close()
    assert sorted(e.result.finish_reason for e in ended) == ["length", "stop"]
    ids = processor.tokenize(prompt, [])
    for event in ended:
        fed = ids + event.result.tokens
        assert len(ids) <= event.cache.offset <= len(fed)
        fresh = model.make_cache()
        model.language(model.merge(mx.array([fed[: event.cache.offset]]), []), fresh)
        for kept, want in zip(event.cache, fresh, strict=True):
            length = event.cache.offset
            got, expected = kept.keys[..., :length, :], want.keys[..., :length, :]
            assert mx.allclose(got, expected, atol=1e-4), event.result.finish_reason


def test_a_row_whose_own_work_raises_fails_alone():
    """Whatever a row's own work raises (here a seed slipped past the options' check), that
    row ends with its error and the others are answered as generate() answers them."""
    model, processor = load_variant("tiny-phi35v")
    prompts = [f"<|user|>\nQuestion {i}<|end|>\n<|assistant|>\n" for i in range(3)]
    broken = SamplingOptions(max_tokens=4, temperature=1.0)
    broken.seed = 2**70
    engine = phi3v_mlx.BatchEngine(model, processor, batch_size=3)
    rows = [engine.submit(prompts[0], SamplingOptions(max_tokens=4)),
            engine.submit(prompts[1], broken),
            engine.submit(prompts[2], SamplingOptions(max_tokens=4))]  # fmt: skip
    ended = {}
    while engine.pending():
        ended.update({e.row: e for e in engine.step() if e.result or e.error})
    engine.close()
    assert ended[rows[1]].error and ended[rows[1]].fault
    for row, prompt in ((rows[0], prompts[0]), (rows[2], prompts[2])):
        want = phi3v_mlx.generate(model, processor, prompt, max_tokens=4)
        assert ended[row].result.tokens == want.tokens


def test_token_id_rows_whose_slots_do_not_match_their_images_fail_alone():
    model, processor = load_variant("tiny-phi35v")
    image = open_image("b_small")
    good = "<|user|>\nHello<|end|>\n<|assistant|>\n"
    slots = processor.image_tokens(processor.load_images([image])[0], 1)
    requests = [
        good,
        Request([1, 32010, -1, -1, 29871]),  # slots, no image
        Request([1, 32010, *[-1] * (slots - 1), 29871], [image], num_crops=1),  # a short run
        Request([1, 32010, *[-2] * slots, 29871], [image], num_crops=1),  # names image 2
        Request([1, 32010, 29871], [image], num_crops=1),  # an image, no slots
        {"prompt": good, "max_tokens": 3},
    ]
    seen = dict(phi3v_mlx.stream_batch_generate(model, processor, requests, max_tokens=5))
    for index in (1, 2, 3, 4):
        assert isinstance(seen[index], ValueError), (index, seen[index])
        assert "image" in str(seen[index]) and "\n" not in str(seen[index])
    assert seen[0].tokens == phi3v_mlx.generate(model, processor, good, max_tokens=5).tokens
    assert len(seen[5].tokens) == 3


def test_repetition_penalty_sees_the_reused_prefix():
    """A row that reuses a kept cache penalizes the prompt's tokens as generate() does."""
    model, processor = load_variant("tiny-phi35v")
    first = "<|user|>\nName a colour.<|end|>\n<|assistant|>\n"
    engine = phi3v_mlx.BatchEngine(model, processor, batch_size=2)
    engine.submit(first, SamplingOptions(max_tokens=8), keep_cache=True)
    (kept,) = [e for e in _drain(engine) if e.result is not None]
    answer = processor.tokenizer.decode(kept.result.tokens)
    follow = f"{first}{answer}<|end|>\n<|user|>\nAnd another?<|end|>\n<|assistant|>\n"
    ids = processor.tokenize(follow, [])
    shared = processor.tokenize(first, []) + kept.result.tokens
    prefix = min(common_prefix(ids, shared), kept.cache.offset)
    assert len(ids) - prefix < 20  # cached ids are within mlx-lm's repetition context
    options = SamplingOptions(max_tokens=12, repetition_penalty=3.0)
    engine.submit(follow, options, cache=kept.cache, prefix=prefix)
    (again,) = [e for e in _drain(engine) if e.result is not None]
    engine.close()
    want = phi3v_mlx.generate(model, processor, follow, max_tokens=12, repetition_penalty=3.0)
    assert again.result.prompt_tokens == len(ids) - prefix
    assert again.result.tokens == want.tokens


def _drain(engine):
    events = []
    while engine.pending():
        events += engine.step()
    return events


def test_interleaved_engine_keeps_decoding_while_image_prompts_arrive(monkeypatch):
    """With ``interleave`` a step does one piece of prompt work (one row's vision run or one
    prompt chunk): a running answer gets a token at every step while three image prompts
    arrive, and every answer is generate()'s."""
    model, processor = load_variant("tiny-phi35v")
    runs = count_vision_runs(model, monkeypatch)
    talk = "<|user|>\nTell me a long story<|end|>\n<|assistant|>\n"
    look = "<|user|>\n<|image_1|>\nWhat is here?<|end|>\n<|assistant|>\n"
    pictures = [open_image(name) for name in ("b_small", "c_wide", "d_tall")]
    options = SamplingOptions(max_tokens=24, prefill_step_size=64)
    engine = phi3v_mlx.BatchEngine(model, processor, batch_size=4, interleave=True)
    running = engine.submit(talk, options)
    while not engine.step():  # until the running row shows its first token
        pass
    rows = [engine.submit({"prompt": look, "images": [p], "num_crops": 2}, options)
            for p in pictures]  # fmt: skip
    ended, steps_without_a_token = {}, 0
    while engine.pending():
        before = len(runs)
        events = engine.step()
        assert len(runs) - before <= 1
        if running not in ended:
            steps_without_a_token += not any(e.row == running for e in events)
        ended.update({e.row: e.result for e in events if e.result is not None})
    engine.close()
    assert steps_without_a_token == 0 and len(runs) == 3
    assert ended[running].tokens == _solo(model, processor, [talk], max_tokens=24)[0].tokens
    for row, picture in zip(rows, pictures, strict=True):
        want = phi3v_mlx.generate(model, processor, look, [picture], 2, max_tokens=24,
                                  prefill_step_size=64)  # fmt: skip
        assert ended[row].tokens == want.tokens


@pytest.mark.parametrize(
    "variant",
    ["tiny-phi35v", "tiny-phi3-4k", "tiny-phi35-moe", "tiny-phi4-mini", "tiny-phi3-small"],
)
def test_prompt_pieces_are_read_in_the_decoding_steps(variant, monkeypatch):
    """In an interleaved engine, prompts that arrive while a row decodes are read piece by piece
    in the same forwards as the decoding steps where the decoder can (Phi-3 decoders: one
    weight read per step; Phi-3-small reads them apart): the running row gets a token at every
    step, and every answer is still generate()'s."""
    model, processor = load_variant(variant)
    together = []
    if hasattr(model.language, "mixed"):
        original = type(model.language).mixed

        def counting(self, embeddings, *args):
            together.append(embeddings.shape[1])
            return original(self, embeddings, *args)

        monkeypatch.setattr(type(model.language), "mixed", counting)
    running_ids = list(range(100, 140))
    arriving = [list(range(200 + i, 290 + i)) for i in range(2)]  # 6 pieces of at most 16
    options = SamplingOptions(max_tokens=12, prefill_step_size=16)
    engine = phi3v_mlx.BatchEngine(model, processor, batch_size=4, interleave=True)
    running = engine.submit(Request(running_ids), replace(options, max_tokens=24))
    while not engine.step():
        pass
    rows = [engine.submit(Request(ids), options) for ids in arriving]
    ended, steps_without_a_token = {}, 0
    while engine.pending():
        events = engine.step()
        if running not in ended:
            steps_without_a_token += not any(e.row == running for e in events)
        ended.update({e.row: e.result for e in events if e.result is not None})
    engine.close()
    assert steps_without_a_token == 0
    if hasattr(model.language, "mixed"):
        assert together == [16] * 5 + [10] + [16] * 5 + [10]
    for row, ids in zip([running, *rows], [running_ids, *arriving], strict=True):
        limit = 24 if row == running else 12
        want = phi3v_mlx.generate(model, processor, ids, max_tokens=limit, prefill_step_size=16)
        assert ended[row].tokens == want.tokens, row
