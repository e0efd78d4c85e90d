"""The ``phi3v`` command line: one-shot generation and an interactive chat with images."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from .generate import GenerationChunk, collect, stream_generate, summary  # noqa: E402
from .loader import load  # noqa: E402
from .processor import load_image  # noqa: E402
from .session import ChatSession  # noqa: E402

DEFAULT_MODEL = "mlx-community/Phi-3.5-vision-instruct-4bit"
# Bad flags raise click's UsageError, which typer re-exports only through BadParameter.
UsageError = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")
CHAT_HELP = """Type a message and press Enter. Commands:
  /image PATH   attach an image to the next message (repeat for several)
  /clear        start a new conversation
  /help         show this help
  /exit         leave (Ctrl-D works too); Ctrl-C stops an answer, not the chat"""

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    help="Phi-3-Vision and Phi-3.5-Vision on MLX.",
)

ModelOption = Annotated[
    str, typer.Option("--model", help="Local folder or Hugging Face Hub id of the model.")
]
ImagesOption = Annotated[
    list[Path] | None, typer.Option("--image", help="Image file; repeat for several.")
]
SystemOption = Annotated[str | None, typer.Option("--system", help="System message.")]
MaxTokensOption = Annotated[int, typer.Option("--max-tokens", "-m", help="Answer length limit.")]
TempOption = Annotated[float, typer.Option("--temp", help="Sampling temperature; 0 is greedy.")]
TopPOption = Annotated[float, typer.Option("--top-p", help="Nucleus sampling threshold.")]
SeedOption = Annotated[int | None, typer.Option("--seed", help="Random seed for sampling.")]
NumCropsOption = Annotated[
    int | None, typer.Option("--num-crops", help="Most 336-px crops per image (model default).")
]
KvBitsOption = Annotated[int | None, typer.Option("--kv-bits", help="Quantize the KV cache.")]


def _terminal() -> bool:
    return sys.stdout.isatty() and sys.stderr.isatty()


@contextmanager
def _progress(description: str) -> Iterator[Callable[[int, int], None] | None]:
    """A rich progress bar on stderr when run in a terminal, else nothing."""
    if not _terminal():
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn

    bar = Progress(
        TextColumn(description),
        BarColumn(),
        TaskProgressColumn(),
        console=Console(stderr=True),
        transient=True,
    )
    task = bar.add_task(description, total=None)
    with bar:
        yield lambda done, total: bar.update(task, completed=done, total=total)


def _load(model: str):
    with _progress("Loading weights") as progress:
        return load(model, progress=progress)


def _echo(chunks: Iterator[GenerationChunk]):
    result = collect(chunks, sys.stdout)
    sys.stdout.write("\n")
    sys.stdout.flush()
    return result


@app.command()
def generate(
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="The question; - reads stdin.")],
    model: ModelOption = DEFAULT_MODEL,
    image: ImagesOption = None,
    system: SystemOption = None,
    max_tokens: MaxTokensOption = 256,
    temp: TempOption = 0.0,
    top_p: TopPOption = 1.0,
    seed: SeedOption = None,
    num_crops: NumCropsOption = None,
    kv_bits: KvBitsOption = None,
    verbose: Annotated[bool, typer.Option("--verbose", help="Statistics on stderr.")] = False,
) -> None:
    """Answer one prompt about zero or more images, streaming the answer to stdout."""
    text = sys.stdin.read() if prompt == "-" else prompt
    images = list(image or [])
    loaded_model, processor = _load(model)
    messages = [{"role": "system", "content": system}] if system else []
    parts = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
    messages.append({"role": "user", "content": parts})
    chat_prompt = processor.apply_chat_template(messages)
    with _progress("Reading the prompt") as progress:
        chunks = stream_generate(
            loaded_model, processor, chat_prompt, images=images or None, num_crops=num_crops,
            max_tokens=max_tokens, temperature=temp, top_p=top_p, seed=seed, kv_bits=kv_bits,
            progress=progress,
        )  # fmt: skip
        result = _echo(chunks)
    if verbose:
        typer.echo(summary(result), err=True)


def _read_line(interactive: bool) -> str | None:
    """The next input line, or None at the end of input."""
    if interactive:
        try:
            return input("> ")
        except EOFError:
            return None
    line = sys.stdin.readline()
    return None if line == "" else line.rstrip("\n")


@app.command()
def chat(
    model: ModelOption = DEFAULT_MODEL,
    image: ImagesOption = None,
    system: SystemOption = None,
    max_tokens: MaxTokensOption = 512,
    temp: TempOption = 0.0,
    top_p: TopPOption = 1.0,
    seed: SeedOption = None,
    num_crops: NumCropsOption = None,
    kv_bits: KvBitsOption = None,
) -> None:
    """An interactive multi-turn chat; images stay part of the whole conversation."""
    interactive = sys.stdin.isatty()
    loaded_model, processor = _load(model)
    session = ChatSession(loaded_model, processor, system=system)
    pending: list[Path] = []
    for path in image or []:
        load_image(path)
        pending.append(path)
    options = dict(max_tokens=max_tokens, temperature=temp, top_p=top_p, seed=seed, kv_bits=kv_bits)
    if interactive:
        typer.echo(CHAT_HELP, err=True)
    while True:
        try:
            line = _read_line(interactive)
        except KeyboardInterrupt:
            typer.echo("\n(/exit or Ctrl-D to leave)", err=True)
            continue
        if line is None or line.strip() in ("/exit", "/quit"):
            break
        command, _, argument = line.strip().partition(" ")
        if command == "/help":
            typer.echo(CHAT_HELP, err=True)
        elif command == "/clear":
            session.reset()
            pending = []
            typer.echo("(new conversation)", err=True)
        elif command == "/image":
            try:
                path = Path(argument.strip()).expanduser()
                load_image(path, len(session.images) + len(pending))
                pending.append(path)
                typer.echo(f"(image {len(session.images) + len(pending)} attached)", err=True)
            except ValueError as e:
                typer.echo(f"error: {e}", err=True)
        elif line.strip():
            chunks = session.stream(line, images=pending, num_crops=num_crops, **options)
            pending = []
            try:
                _echo(chunks)
            except KeyboardInterrupt:
                chunks.close()
                typer.echo("\n(stopped)", err=True)
            except ValueError as e:
                typer.echo(f"error: {e}", err=True)


@app.command()
def convert(
    hf_path: Annotated[str, typer.Option("--hf-path", help="Source folder or Hub id.")],
    mlx_path: Annotated[str, typer.Option("--mlx-path", help="Output folder.")] = "mlx_model",
    quantize: Annotated[bool, typer.Option("--quantize", "-q", help="Quantize.")] = False,
    q_bits: Annotated[int, typer.Option("--q-bits", help="2, 3, 4, 5, 6 or 8.")] = 4,
    q_group_size: Annotated[int, typer.Option("--q-group-size", help="32, 64 or 128.")] = 64,
    dtype: Annotated[
        str | None, typer.Option("--dtype", help="float16, bfloat16 or float32 for the rest.")
    ] = None,
    quantize_vision: Annotated[
        bool, typer.Option("--quantize-vision/--no-quantize-vision", help="Also the CLIP tower.")
    ] = False,
    dequantize: Annotated[bool, typer.Option("--dequantize", "-d", help="Dequantize.")] = False,
    upload_repo: Annotated[
        str | None, typer.Option("--upload-repo", help="Hub repo to upload the result to.")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace a non-empty --mlx-path.")] = False,
    check: Annotated[
        bool, typer.Option("--check/--no-check", help="Fidelity report after quantizing.")
    ] = True,
) -> None:
    """Convert Hugging Face weights to MLX, optionally quantized (4-bit by default)."""
    from .convert import convert as run

    with _progress("Writing weights") as progress:
        run(
            hf_path, mlx_path, quantize=quantize, q_bits=q_bits, q_group_size=q_group_size,
            dtype=dtype, quantize_vision=quantize_vision, dequantize=dequantize,
            upload_repo=upload_repo, force=force, check=check,
            log=lambda line: typer.echo(line, err=True), progress=progress,
        )  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    """Entry point: one line on stderr for any user error, never a traceback."""
    args = (sys.argv[1:] if argv is None else argv) or ["--help"]
    try:
        code = app(args, standalone_mode=False)
    except UsageError as e:
        typer.echo(f"error: {e.format_message()}", err=True)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("", err=True)
        sys.exit(130)
    except (ValueError, OSError) as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(1)
    sys.exit(code or 0)
