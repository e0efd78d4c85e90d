"""The phi3v command line: typer's runner, the one-line error entry point, real subprocesses."""

import os
import re
import select
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import phi3v_mlx
from phi3v_mlx import cli
from tests.conftest import IMAGES, MANIFEST, MODELS, expected_greedy, open_image

ROOT = Path(__file__).resolve().parents[1]
TINY = str(MODELS / "tiny-phi35v")
runner = CliRunner()


def expected_text(case, variant="tiny-phi35v"):
    model, processor = phi3v_mlx.load(MODELS / variant)
    return processor.tokenizer.decode(expected_greedy(variant, case))


@pytest.mark.parametrize("case", ["a", "b", "c", "d"])
def test_generate_streams_what_the_api_returns(case):
    """`phi3v generate` builds the official chat prompt, image tags first."""
    meta = MANIFEST["cases"][case]
    question = meta["text"].split("\n")[-3].removesuffix("<|end|>")
    args = ["generate", "--model", TINY, "--prompt", question, "--max-tokens", "12"]
    for name in meta["images"]:
        args += ["--image", str(IMAGES / f"{name}.png")]
    if meta["num_crops"]:
        args += ["--num-crops", str(meta["num_crops"])]
    # The model runs in its stored bf16 here, so compare with the same run through the API.
    model, processor = phi3v_mlx.load(TINY)
    images = [open_image(n) for n in meta["images"]] or None
    want = phi3v_mlx.generate(
        model, processor, meta["text"], images, meta["num_crops"], max_tokens=12
    )
    result = runner.invoke(cli.app, args)
    assert result.exit_code == 0, result.output
    assert result.stdout == want.text + "\n"


def test_generate_float32_text_equals_golden():
    """With --dtype float32 the CLI prints exactly the reference's greedy continuation."""
    args = ["generate", "--model", TINY, "-p", _question("a"), "-m", "12", "--dtype", "float32"]
    result = runner.invoke(cli.app, args)
    assert result.exit_code == 0, result.output
    assert result.stdout == expected_text("a") + "\n"


def _question(case):
    return MANIFEST["cases"][case]["text"].split("\n")[-3].removesuffix("<|end|>")


def test_prompt_from_stdin_system_and_verbose():
    result = runner.invoke(
        cli.app,
        ["generate", "--model", TINY, "--prompt", "-", "--system", "Be brief.", "-m", "3",
         "--verbose", "--temp", "0.7", "--top-p", "0.9", "--seed", "1"],
        input="Hello?",
    )  # fmt: skip
    assert result.exit_code == 0
    assert "Prompt: " in result.stderr and "Generation: 3 tokens" in result.stderr
    assert "Peak memory" not in result.stdout


def test_entry_point_errors_are_one_line(monkeypatch, capsys, tmp_path):
    cases = [
        (["generate", "--model", str(tmp_path / "none"), "-p", "hi"], 1, "no model folder"),
        (["generate", "--model", TINY, "-p", "hi", "--image", "missing.png"], 1, "missing.png"),
        (["generate", "--model", TINY, "-p", "hi", "--max-tokens", "many"], 2, "--max-tokens"),
        (["generate", "--model", TINY, "-p", "hi", "--temp", "-1"], 1, "temperature"),
        (["generate", "--model", TINY], 2, "--prompt"),
        (["chat", "--model", TINY, "--image", "nope.png"], 1, "nope.png"),
    ]
    for args, code, needle in cases:
        monkeypatch.setattr(sys, "argv", ["phi3v", *args])
        with pytest.raises(SystemExit) as exit_info:
            cli.main()
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == code, (args, err)
        assert err.startswith("error: ") and needle in err and "\n" not in err, err


def _run(args, stdin=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "phi3v_mlx", *args], input=stdin, capture_output=True, text=True,
        env=env, timeout=300,
    )  # fmt: skip


def test_real_subprocess_generate():
    image = str(IMAGES / "b_small.png")
    done = _run(["generate", "--model", TINY, "--image", image, "-p", "Describe the image.",
                 "--num-crops", "4", "-m", "5"])  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.split()) == 5
    assert "Traceback" not in done.stderr
    bad = _run(["generate", "--model", TINY, "-p", "x", "--image", "/no/such.png"])
    assert bad.returncode == 1 and bad.stderr.strip().count("\n") == 0


def test_chat_through_a_pipe():
    """Turns, /image, /clear, /help and /exit from a pipe; answers equal a ChatSession's."""
    image = IMAGES / "b_small.png"
    lines = ["/help", f"/image {image}", "What is this?", "And now?", "/image missing.png",
             "/clear", "Hi", "/exit", "ignored"]  # fmt: skip
    script = "\n".join(lines) + "\n"
    done = _run(["chat", "--model", TINY, "-m", "4"], stdin=script)
    assert done.returncode == 1, done.stderr  # a piped chat that met an error says so
    model, processor = phi3v_mlx.load(TINY)
    session = phi3v_mlx.ChatSession(model, processor)
    want = [session.send("What is this?", images=[image], max_tokens=4).text,
            session.send("And now?", max_tokens=4).text]  # fmt: skip
    session.reset()
    want.append(session.send("Hi", max_tokens=4).text)
    assert done.stdout.splitlines() == want
    assert "(image 1 attached)" in done.stderr and "missing.png" in done.stderr
    assert "(new conversation)" in done.stderr and "/image PATH" in done.stderr


def test_chat_ends_at_end_of_input():
    done = _run(["chat", "--model", TINY, "-m", "2"], stdin="Hello\n")
    assert done.returncode == 0 and len(done.stdout.splitlines()) == 1


def test_examples_run():
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "PYTHONPATH": str(ROOT)}  # fmt: skip
    api = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "describe_image.py"), str(IMAGES / "b_small.png"),
         "--model", TINY, "--max-tokens", "3"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert api.returncode == 0, api.stderr
    transcript = subprocess.run(
        [str(ROOT / "examples" / "chat_transcript.sh"), TINY], capture_output=True, text=True,
        env=env, timeout=300,
    )  # fmt: skip
    assert transcript.returncode == 0, transcript.stderr
    assert len(transcript.stdout.splitlines()) == 3


def test_progress_bars_only_in_a_terminal(monkeypatch):
    with cli._bars() as bar:
        assert bar("Loading") is None  # pytest captures stdout: not a terminal
    monkeypatch.setattr(cli, "_terminal", lambda: True)
    with cli._bars() as bar:
        first, second = bar("Loading"), bar("Checking")
        for done in range(0, 101, 25):
            first(done, 100)
        second(3, 10)
    model = cli._weights(Path(TINY), None)
    assert isinstance(model, phi3v_mlx.DecoderModel)


def _one_line_error(args, stdin=None):
    done = _run(args, stdin)
    lines = done.stderr.strip().splitlines()
    return done.returncode, lines


def test_options_are_checked_before_loading(monkeypatch, capsys):
    """Bad options fail at once, with one line and exit code 1, whatever the command."""
    cases = [
        (["chat", "--model", TINY, "--temp", "-1"], "temperature"),
        (["chat", "--model", TINY, "--num-crops", "0"], "num_crops"),
        (["generate", "--model", TINY, "-p", "hi", "--num-crops", "1000"], "num_crops 1000"),
        (["generate", "--model", TINY, "-p", "hi", "--kv-bits", "4", "--max-kv-size", "64"],
         "kv_bits and max_kv_size exclude each other"),
        (["generate", "--model", TINY, "-p", "hi", "--dtype", "int4"], "dtype 'int4'"),
        (["generate", "--model", TINY, "-p", "hi", "--image", str(IMAGES)], "is a folder"),
    ]  # fmt: skip
    monkeypatch.setattr(cli, "load_model", lambda *a, **k: pytest.fail("weights were loaded"))
    for args, needle in cases:
        monkeypatch.setattr(sys, "argv", ["phi3v", *args])
        with pytest.raises(SystemExit) as exit_info:
            cli.main()
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 1, (args, err)
        assert err.startswith("error: ") and needle in err and "\n" not in err, err


def test_chat_commands_and_exit_code():
    image = IMAGES / "b_small.png"
    lines = ["/image", f"/image {IMAGES}", "/imag typo", "//etc is a folder?", f"/image {image}",
             "What is this?", "/exit"]  # fmt: skip
    done = _run(["chat", "--model", TINY, "-m", "3", "--verbose"], stdin="\n".join(lines) + "\n")
    err = done.stderr
    assert "error: /image needs a path: /image PATH" in err
    assert f"{IMAGES}) is a folder, not an image file" in err
    assert "error: unknown command /imag (/help lists them)" in err
    assert "(image 1 attached)" in err and err.count("Prompt: ") == 2
    assert done.returncode == 1  # errors in a piped chat
    model, processor = phi3v_mlx.load(TINY)
    session = phi3v_mlx.ChatSession(model, processor)
    want = [session.send("/etc is a folder?", max_tokens=3).text,
            session.send("What is this?", images=[image], max_tokens=3).text]  # fmt: skip
    assert done.stdout.splitlines() == want
    clean = _run(["chat", "--model", TINY, "-m", "2"], stdin="Hello\n")
    assert clean.returncode == 0


def test_generate_honours_image_tags_typed_in_the_prompt():
    image = IMAGES / "b_small.png"
    question = "Look: <|image_1|>\nWhat is it?"
    args = ["generate", "--model", TINY, "-p", question, "--image", str(image), "-m", "5",
            "--num-crops", "4"]  # fmt: skip
    result = runner.invoke(cli.app, args)
    assert result.exit_code == 0, result.output
    model, processor = phi3v_mlx.load(TINY)
    prompt = processor.apply_chat_template([{"role": "user", "content": question}])
    assert prompt.count("<|image_1|>") == 1
    want = phi3v_mlx.generate(model, processor, prompt, [open_image("b_small")], 4, max_tokens=5)
    assert result.stdout == want.text + "\n"
    both = runner.invoke(cli.app, [*args[:4], "<|image_2|> and", *args[5:]])
    assert both.exit_code != 0 and "<|image_2|>" in str(both.exception)


def test_cpu_precision_note_for_a_quantized_checkpoint(tmp_path):
    from phi3v_mlx.convert import convert

    convert(TINY, tmp_path / "q8", quantize=True, q_bits=8, check=False, log=lambda _: None)
    args = ["generate", "--model", str(tmp_path / "q8"), "-p", "hi", "-m", "1"]
    stored = runner.invoke(cli.app, args)
    assert "quantized matrix products slowly: --dtype float32" in stored.stderr
    wide = runner.invoke(cli.app, [*args, "--dtype", "float32"])
    assert wide.exit_code == 0 and "quantized" not in wide.stderr


def test_cpu_precision_note_once(monkeypatch):
    stored = runner.invoke(cli.app, ["generate", "--model", TINY, "-p", "hi", "-m", "1"])
    notes = [line for line in stored.stderr.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "bfloat16" in notes[0] and "--dtype float32" in notes[0]
    wide = runner.invoke(cli.app, ["generate", "--model", TINY, "-p", "hi", "-m", "1",
                                   "--dtype", "float32"])  # fmt: skip
    assert "bfloat16" not in wide.stderr
    monkeypatch.setattr("mlx.core.metal.is_available", lambda: True)
    gpu = runner.invoke(cli.app, ["generate", "--model", TINY, "-p", "hi", "-m", "1"])
    assert "note:" not in gpu.stderr


def test_version_and_help():
    assert (
        runner.invoke(cli.app, ["--version"]).stdout.strip() == f"phi3v-mlx {phi3v_mlx.__version__}"
    )
    text = runner.invoke(cli.app, ["--help"]).stdout
    assert "Answer one prompt about images, streamed to stdout." in text
    assert "An interactive chat about images, one conversation." in text
    assert "--image PATH" in runner.invoke(cli.app, ["generate", "--help"]).stdout


def _read_some(stream, timeout):
    """Block until ``stream`` has output (or the timeout), then return what is there."""
    ready, _, _ = select.select([stream], [], [], timeout)
    return os.read(stream.fileno(), 4096) if ready else b""


def test_ctrl_c_in_chat_stops_the_answer_and_keeps_the_cache():
    """SIGINT mid-answer: the chat goes on, and the next turn reads only its own tokens."""
    image = IMAGES / "b_small.png"
    proc = subprocess.Popen(
        [sys.executable, "-m", "phi3v_mlx", "chat", "--model", TINY, "-m", "400", "--verbose",
         "--image", str(image), "--num-crops", "4"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    proc.stdin.write(b"Tell me a very long story about this picture.\n")
    proc.stdin.flush()
    assert _read_some(proc.stdout, 120)  # the answer is streaming
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(input=b"Go on.\n", timeout=120)
    err = err.decode()
    assert proc.returncode == 0, err
    assert "(stopped)" in err and "Traceback" not in err
    prompts = [int(n) for n in re.findall(r"Prompt: (\d+) tokens", err)]
    assert len(prompts) == 1 and prompts[0] < 30  # only the follow-up's tokens were read


def test_a_negative_seed_samples_instead_of_failing():
    args = ["generate", "--model", TINY, "-p", "hi", "-m", "3", "--temp", "1", "--seed"]
    minus_one = runner.invoke(cli.app, [*args, "-1"])
    assert minus_one.exit_code == 0, minus_one.output
    assert minus_one.stdout == runner.invoke(cli.app, [*args, str(2**64 - 1)]).stdout
