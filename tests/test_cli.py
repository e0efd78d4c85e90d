"""The phi3v command line: typer's runner, the one-line error entry point, real subprocesses."""

import os
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
    want = phi3v_mlx.generate(model, processor, meta["text"], images, meta["num_crops"], 12)
    result = runner.invoke(cli.app, args)
    assert result.exit_code == 0, result.output
    assert result.stdout == want.text + "\n"


def test_generate_float32_text_equals_golden(monkeypatch):
    """With float32 weights the CLI prints exactly the reference's greedy continuation."""
    original = cli.load
    monkeypatch.setattr(cli, "load", lambda m, progress=None: original(m, dtype="float32"))
    result = runner.invoke(cli.app, ["generate", "--model", TINY, "-p", _question("a"), "-m", "12"])
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
    assert done.returncode == 0, done.stderr
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
    with cli._progress("Loading") as progress:
        assert progress is None  # pytest captures stdout: not a terminal
    monkeypatch.setattr(cli, "_terminal", lambda: True)
    with cli._progress("Loading") as progress:
        for done in range(0, 101, 25):
            progress(done, 100)
    model, _ = cli._load(TINY)
    assert isinstance(model, phi3v_mlx.Model)
