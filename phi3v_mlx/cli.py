"""The ``phi3v`` command line: generation, chat and conversion (more commands register here)."""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from . import __version__  # noqa: E402
from .backend import cpu_advice  # noqa: E402
from .distributed import broadcast_text, launch_group  # noqa: E402
from .generate import (  # noqa: E402
    GenerationChunk,
    GenerationResult,
    SamplingOptions,
    chat_prompt,
    collect,
    stream_generate,
    summary,
)
from .loader import float_dtype, load_model, load_processor, model_config, resolve  # noqa: E402
from .models.base import DecoderModel  # noqa: E402
from .processor import Processor, load_image  # noqa: E402
from .recordings import audio_tokens, load_waves  # noqa: E402
from .session import ChatSession  # noqa: E402
from .speech import MAX_TOKENS as MAX_SPEECH_TOKENS  # noqa: E402
from .speech import instruction, stream_transcription  # noqa: E402
from .thinking import split_chunks, thinking_mode  # noqa: E402

DEFAULT_MODEL = "mlx-community/Phi-3.5-vision-instruct-4bit"
SPEECH_MODEL = "microsoft/Phi-4-multimodal-instruct"
# Bad flags raise click's UsageError, which typer re-exports only through BadParameter.
UsageError = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")
CHAT_HELP = """Type a message and press Enter. Commands:
  /image PATH   attach an image to the next message (repeat for several)
  /audio PATH   attach a recording to the next message (after its images)
  /thinking M   reasoning mode of the next answers: on, off or auto (models that have them)
  /clear        start a new conversation
  /help         show this help
  /exit         leave (Ctrl-D works too); Ctrl-C stops an answer, not the chat
A message that starts with / is written with two: //etc/hosts is sent as /etc/hosts."""


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"phi3v-mlx {__version__}")
        raise typer.Exit()


app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    help="Phi-3-Vision and Phi-3.5-Vision on MLX.",
)


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_show_version, is_eager=True, help="Show the version."),
    ] = False,
) -> None:
    """Phi-3-Vision and Phi-3.5-Vision on MLX."""


ModelOption = Annotated[
    str, typer.Option("--model", help="Local folder or Hugging Face Hub id of the model.")
]
ImagesOption = Annotated[
    list[Path] | None,
    typer.Option("--image", metavar="PATH", help="Image file; repeat for several."),
]
AudiosOption = Annotated[
    list[Path] | None,
    typer.Option("--audio", metavar="PATH", help="Audio file (WAV, FLAC, OGG, MP3); repeatable."),
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
MaxKvSizeOption = Annotated[
    int | None, typer.Option("--max-kv-size", help="Keep at most this many positions cached.")
]
DtypeOption = Annotated[
    str | None,
    typer.Option("--dtype", help="Compute in float32, float16 or bfloat16 (default: stored)."),
]
VerboseOption = Annotated[bool, typer.Option("--verbose", help="Statistics on stderr.")]
ThinkingOption = Annotated[
    str | None,
    typer.Option(
        "--thinking",
        help="Reasoning mode of a model that has them: on, off or auto (the model chooses; the "
        "default). The reasoning goes to stderr, dimmed in a terminal.",
    ),
]
BatchThinkingOption = Annotated[
    str | None,
    typer.Option(
        "--thinking",
        help="Reasoning mode of a model that has them: on, off or auto (the model chooses; the "
        "default). Each row's reasoning goes in its reasoning key, the answer in text.",
    ),
]
AdapterOption = Annotated[
    Path | None, typer.Option("--adapter-path", help="A fine-tuned adapter (phi3v lora).")
]
MergedOption = Annotated[
    bool,
    typer.Option(
        "--allow-merged-adapters",
        help="Load mlx-vlm's Phi-4-multimodal conversion: its adapters are merged into the "
        "decoder, so answers differ from the reference's (and images are refused).",
    ),
]


def _terminal() -> bool:
    return sys.stdout.isatty() and sys.stderr.isatty()


@contextmanager
def _bars() -> Iterator[Callable[[str], Callable[..., None] | None]]:
    """Rich progress bars on stderr when run in a terminal: ``bar(description)`` gives the
    callback ``(done, total, status="")`` of one bar, shown from its first report (None without
    a terminal)."""
    if not _terminal():
        yield lambda description: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeRemainingColumn,
    )

    display = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[status]}"),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    )

    def bar(description: str) -> Callable[..., None]:
        task = None

        def report(done: int, total: int, status: str = "") -> None:
            nonlocal task
            if task is None:
                task = display.add_task(description, total=total, status=status)
            display.update(task, completed=done, total=total, status=status)

        return report

    with display:
        yield bar


class Interrupt:
    """Ctrl-C while a generation runs: the first press asks it to stop at its next safe point
    (between prompt chunks or tokens, so the session keeps a consistent cache); a second press
    stops at once."""

    def __init__(self):
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> Interrupt:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._press)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def _press(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def checked(self, report: Callable[[int, int], None] | None) -> Callable[[int, int], None]:
        """A progress callback that also stops the work when Ctrl-C was pressed."""

        def progress(done: int, total: int) -> None:
            if report is not None:
                report(done, total)
            if self.requested:
                raise KeyboardInterrupt

        return progress

    def stream(self, chunks: Iterator[GenerationChunk]) -> Iterator[GenerationChunk]:
        """``chunks`` until Ctrl-C is pressed, then the stream is closed."""
        for chunk in chunks:
            yield chunk
            if self.requested:
                chunks.close()
                return


def _options(**values: Any) -> SamplingOptions:
    """Sampling options checked before anything is loaded."""
    return SamplingOptions(**values)


def _processor(
    model: str, dtype: str | None, num_crops: int | None, quiet: bool = False
) -> tuple[Path, Processor]:
    """The model folder and its processor (cheap: ``num_crops`` and ``dtype`` are checked here,
    before the weights load), with a one-line note on what the checkpoint's precision costs on
    the CPU backend."""
    if dtype is not None:
        float_dtype(dtype)
    path = resolve(model)
    processor = load_processor(path)
    processor.crops(num_crops)
    config = model_config(path)
    note = cpu_advice(config.torch_dtype, bool(config.quantization), dtype)
    if note and not quiet:
        typer.echo(note, err=True)
    return path, processor


def _ranks() -> tuple[Any, bool]:
    """The group of an ``mlx.launch`` run (None alone), over whose ranks the model is split, and
    whether this is its first rank: the others follow it and print nothing on stdout."""
    group = launch_group()
    first = group is None or group.rank() == 0
    if not first:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the rest of the process)
    return group, first


def _weights(
    path: Path,
    dtype: str | None,
    adapter_path: Path | None = None,
    group: Any = None,
    allow_merged_adapters: bool = False,
) -> DecoderModel:
    """The model's weights (a bar shows them loading), with a fine-tuned adapter on them if
    given, split across the ranks of ``group`` if given; a checkpoint with merged modality
    adapters only if allowed (one line on stderr says what then differs)."""
    if group is not None and adapter_path is not None:
        raise ValueError("a model split across ranks takes no --adapter-path: fuse it first")
    with _bars() as bar:
        return load_model(path, dtype, progress=bar("Loading weights"), group=group,
                          adapter_path=adapter_path, allow_merged_adapters=allow_merged_adapters,
                          log=lambda line: typer.echo(line, err=True))  # fmt: skip


def _show_reasoning(chunks: Iterator[GenerationChunk]) -> Iterator[GenerationChunk]:
    """``chunks`` passed on, the reasoning of each written to stderr as it comes (dimmed in a
    terminal) and ended with a line break when the answer starts."""
    dim, reset = ("\x1b[2m", "\x1b[0m") if sys.stderr.isatty() else ("", "")
    thinking = False
    try:
        for chunk in chunks:
            if chunk.reasoning:
                sys.stderr.write(("" if thinking else dim) + chunk.reasoning)
                sys.stderr.flush()
                thinking = True
            if thinking and (chunk.text or chunk.finish_reason):
                sys.stderr.write(reset + "\n")
                sys.stderr.flush()
                thinking = False
            yield chunk
    finally:
        if thinking:
            sys.stderr.write(reset + "\n")
        chunks.close()


def _echo(chunks: Iterator[GenerationChunk]) -> GenerationResult:
    result = collect(_show_reasoning(chunks), sys.stdout)
    sys.stdout.write("\n")
    sys.stdout.flush()
    return result


def _check_images(images: list[Path], first: int = 0) -> list[Any]:
    """Every image decoded now, before the model loads (errors name the file)."""
    return [load_image(path, first + i) for i, path in enumerate(images)]


@app.command()
def generate(
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="The question; - reads stdin.")],
    model: ModelOption = DEFAULT_MODEL,
    image: ImagesOption = None,
    audio: AudiosOption = None,
    system: SystemOption = None,
    max_tokens: MaxTokensOption = 256,
    temp: TempOption = 0.0,
    top_p: TopPOption = 1.0,
    seed: SeedOption = None,
    num_crops: NumCropsOption = None,
    kv_bits: KvBitsOption = None,
    max_kv_size: MaxKvSizeOption = None,
    dtype: DtypeOption = None,
    adapter_path: AdapterOption = None,
    allow_merged_adapters: MergedOption = False,
    verbose: VerboseOption = False,
    thinking: ThinkingOption = None,
) -> None:
    """Answer one prompt about images, streamed to stdout.

    Recordings (--audio) go after the images and before the question.
    """
    options = _options(max_tokens=max_tokens, temperature=temp, top_p=top_p, seed=seed,
                       kv_bits=kv_bits, max_kv_size=max_kv_size)  # fmt: skip
    group, first = _ranks()
    if group is not None and prompt == "-":
        raise ValueError("under mlx.launch the prompt cannot come from stdin: give it in --prompt")
    text = sys.stdin.read() if prompt == "-" else prompt
    images = _check_images(list(image or []))
    path, processor = _processor(model, dtype, num_crops, quiet=not first)
    waves = load_waves(processor, list(audio)) if audio else []
    mode = thinking_mode(processor, thinking)
    prompt_text = chat_prompt(processor, text, len(images), system, len(waves), mode)
    crops = processor.crops(num_crops)
    counts = [processor.image_tokens(im, crops) for im in images]
    if waves:
        processor.tokenize(prompt_text, counts, audio_tokens(processor, waves))
    else:
        processor.tokenize(prompt_text, counts)
    media = {"audios": waves} if waves else {}
    loaded_model = _weights(path, dtype, adapter_path, group, allow_merged_adapters)
    with Interrupt() as interrupt, _bars() as bar:
        chunks = stream_generate(
            loaded_model, processor, prompt_text, images=images or None, num_crops=num_crops,
            progress=interrupt.checked(bar("Reading the prompt")), **media, **vars(options),
        )  # fmt: skip
        try:
            result = _echo(interrupt.stream(split_chunks(chunks, processor, mode)))
        except KeyboardInterrupt:
            result = None
    if interrupt.requested:
        typer.echo("(stopped)", err=True)
        raise typer.Exit(130)
    if verbose and result is not None and first:
        typer.echo(summary(result), err=True)


def _read_line(interactive: bool) -> str | None:
    """The next input line, or None at the end of input."""
    if interactive:
        try:
            return input("> ")
        except EOFError:
            sys.stdout.write("\n")
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
    max_kv_size: MaxKvSizeOption = None,
    dtype: DtypeOption = None,
    adapter_path: AdapterOption = None,
    allow_merged_adapters: MergedOption = False,
    verbose: VerboseOption = False,
    thinking: ThinkingOption = None,
) -> None:
    """An interactive chat about images, one conversation.

    /image and /audio attach images and recordings to the next message.
    """
    options = _options(max_tokens=max_tokens, temperature=temp, top_p=top_p, seed=seed,
                       kv_bits=kv_bits, max_kv_size=max_kv_size)  # fmt: skip
    pending = list(image or [])
    _check_images(pending)
    sounds: list[Any] = []  # recordings for the next message, as 16 kHz waveforms
    interactive = sys.stdin.isatty()
    group, first = _ranks()
    path, processor = _processor(model, dtype, num_crops, quiet=not first)
    thinking_mode(processor, thinking)
    loaded_model = _weights(path, dtype, adapter_path, group, allow_merged_adapters)
    session = ChatSession(loaded_model, processor, system=system)
    failed = False
    if interactive:
        typer.echo(CHAT_HELP, err=True)

    def error(message: str) -> None:
        nonlocal failed
        failed = True
        typer.echo(f"error: {message}", err=True)

    while True:
        try:
            line = _read_line(interactive) if first else None
        except KeyboardInterrupt:
            typer.echo("\n(/exit or Ctrl-D to leave)", err=True)
            continue
        if group is not None:  # the first rank reads, the others hear its line
            line = broadcast_text(line, group)
        if line is None:
            break
        stripped = line.strip()
        command, _, argument = stripped.partition(" ")
        if stripped.startswith("/") and not stripped.startswith("//"):
            if command in ("/exit", "/quit"):
                break
            if command == "/help":
                typer.echo(CHAT_HELP, err=True)
            elif command == "/thinking":
                try:
                    thinking = thinking_mode(processor, argument.strip())
                except ValueError as e:
                    error(str(e))
                    continue
                typer.echo(f"(thinking {thinking} from the next answer)", err=True)
            elif command == "/clear":
                session.reset()
                pending, sounds = [], []
                typer.echo("(new conversation)", err=True)
            elif command == "/image":
                if not argument.strip():
                    error("/image needs a path: /image PATH")
                    continue
                path = Path(argument.strip()).expanduser()
                try:
                    load_image(path, len(session.images) + len(pending))
                except ValueError as e:
                    error(str(e))
                    continue
                pending.append(path)
                typer.echo(f"(image {len(session.images) + len(pending)} attached)", err=True)
            elif command == "/audio":
                if not argument.strip():
                    error("/audio needs a path: /audio PATH")
                    continue
                heard = len(session.recordings.digests) + len(sounds)
                try:
                    sounds += load_waves(processor, Path(argument.strip()).expanduser(), heard)
                except ValueError as e:
                    error(str(e))
                    continue
                seconds = len(sounds[-1]) / 16_000
                typer.echo(f"(audio {heard + 1} attached, {seconds:.1f} s)", err=True)
            else:
                error(f"unknown command {command} (/help lists them)")
            continue
        if not stripped:
            continue
        text = line[1:] if stripped.startswith("//") else line
        turns = len(session.messages)
        with Interrupt() as interrupt, _bars() as bar:
            try:
                chunks = session.stream(
                    text, images=pending, num_crops=num_crops, audios=sounds or None,
                    progress=interrupt.checked(bar("Reading the prompt")), thinking=thinking,
                    **vars(options),
                )  # fmt: skip
                result = _echo(interrupt.stream(chunks))
            except KeyboardInterrupt:
                result = None
            except ValueError as e:
                error(str(e))
                continue
        if len(session.messages) > turns:
            pending, sounds = [], []  # the media went with the message (stopped early: none)
        if interrupt.requested or result is None:
            typer.echo("(stopped)", err=True)
        elif verbose:
            typer.echo(summary(result), err=True)
    if failed and not interactive:
        raise typer.Exit(1)


@app.command()
def batch(
    inputs: Annotated[
        list[str],
        typer.Argument(help="Image and audio files, folders, manifests.", metavar="INPUTS"),
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="Results (JSONL), appended.")],
    prompt: Annotated[
        str | None, typer.Option("--prompt", "-p", help="The question for every input.")
    ] = None,
    model: ModelOption = DEFAULT_MODEL,
    system: SystemOption = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Rows decoded together.")] = 8,
    max_tokens: MaxTokensOption = 256,
    temp: TempOption = 0.0,
    top_p: TopPOption = 1.0,
    seed: SeedOption = None,
    num_crops: NumCropsOption = None,
    dtype: DtypeOption = None,
    adapter_path: AdapterOption = None,
    allow_merged_adapters: MergedOption = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Start over instead of resuming.")
    ] = False,
    thinking: BatchThinkingOption = None,
) -> None:
    """Answer one question about many images, resumably, into a JSONL file.

    A model with thinking modes writes each answer's reasoning apart (--thinking).
    """
    from .batch_run import collect_inputs, run

    options = _options(max_tokens=max_tokens, temperature=temp, top_p=top_p, seed=seed)
    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
    items = collect_inputs(inputs, prompt)
    if not output.parent.is_dir():
        raise ValueError(f"--output {output}: the folder {output.parent} does not exist")
    if output.is_dir():
        raise ValueError(f"--output {output} is a folder")

    def load(first: bool) -> tuple[DecoderModel, Processor]:
        path, processor = _processor(model, dtype, num_crops, quiet=not first)
        thinking_mode(processor, thinking)
        return _weights(path, dtype, adapter_path, None, allow_merged_adapters), processor

    with _bars() as bar:
        show = bar("Answering")

        def report(tally: Any) -> None:
            if show is not None:
                show(tally.done, tally.total, tally.status())

        try:
            tally = run(
                load, items, output, system=system, batch_size=batch_size, options=options,
                num_crops=num_crops, overwrite=overwrite, report=report, thinking=thinking,
            )  # fmt: skip
        except KeyboardInterrupt:
            typer.echo(f"(stopped; the rows written are kept in {output}: the same command "
                       "resumes)", err=True)  # fmt: skip
            raise typer.Exit(130) from None
    if tally is not None:
        typer.echo(tally.line(output), err=True)


@app.command()
def transcribe(
    files: Annotated[
        list[Path], typer.Argument(help="Audio files (WAV, FLAC, OGG, MP3).", metavar="FILES")
    ],
    model: ModelOption = SPEECH_MODEL,
    translate_to: Annotated[
        str | None,
        typer.Option("--translate-to", help="Translate to this language (name or ISO code)."),
    ] = None,
    hint: Annotated[
        str | None,
        typer.Option("--prompt", "-p", help="Context for the model: names, spellings, topic."),
    ] = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Also write the texts (.jsonl or .txt).")
    ] = None,
    max_tokens: MaxTokensOption = MAX_SPEECH_TOKENS,
    temp: TempOption = 0.0,
    top_p: TopPOption = 1.0,
    seed: SeedOption = None,
    dtype: DtypeOption = None,
    adapter_path: AdapterOption = None,
    allow_merged_adapters: MergedOption = False,
    verbose: VerboseOption = False,
) -> None:
    """Transcribe (or translate) recordings, each text streamed to stdout as it comes."""
    import json
    import time

    options = _options(max_tokens=max_tokens, temperature=temp, top_p=top_p, seed=seed)
    instruction(translate_to, hint)  # the language is checked before anything loads
    if output is not None and output.suffix.lower() not in (".jsonl", ".txt"):
        raise ValueError(f"--output {output}: write .jsonl or .txt")
    if output is not None and not output.parent.is_dir():
        raise ValueError(f"--output {output}: the folder {output.parent} does not exist")
    path, processor = _processor(model, dtype, None)
    for i, file in enumerate(files):  # every file checked before the model loads
        load_waves(processor, file, i)
    loaded_model = _weights(path, dtype, adapter_path, None, allow_merged_adapters)
    rows = []
    for i, file in enumerate(files):
        wave = load_waves(processor, file, i)[0]  # one recording in memory at a time
        if len(files) > 1:
            typer.echo(f"== {file}", err=True)
        seconds = len(wave) / 16_000
        started = time.perf_counter()
        with Interrupt() as interrupt, _bars() as bar:
            chunks = stream_transcription(
                loaded_model, processor, wave, translate_to, hint,
                listening=interrupt.checked(bar(f"Listening ({seconds:.0f} s)")),
                progress=interrupt.checked(bar("Reading")), **vars(options),
            )  # fmt: skip
            try:
                result = _echo(interrupt.stream(chunks))
            except KeyboardInterrupt:
                result = None
        if interrupt.requested or result is None:
            typer.echo("(stopped)", err=True)
            raise typer.Exit(130)
        elapsed = time.perf_counter() - started
        rows.append({"file": str(file), "text": result.text, "seconds": round(seconds, 3),
                     "tokens": result.generation_tokens})  # fmt: skip
        if verbose:
            typer.echo(f"{summary(result)}\nAudio: {seconds:.1f} s in {elapsed:.1f} s "
                       f"(real-time factor {elapsed / seconds:.3f})", err=True)  # fmt: skip
    if output is not None:
        if output.suffix.lower() == ".jsonl":
            text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        else:
            text = "".join(row["text"].strip() + "\n" for row in rows)
        output.write_text(text, encoding="utf-8")


@app.command()
def serve(
    model: ModelOption = DEFAULT_MODEL,
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port to listen on.")] = 8080,
    api_key: Annotated[
        str | None, typer.Option("--api-key", help="Require this Bearer key on /v1.")
    ] = None,
    cors_origin: Annotated[
        list[str] | None,
        typer.Option("--cors-origin", help="Allow browser calls from this origin; repeatable."),
    ] = None,
    media_dir: Annotated[
        Path | None, typer.Option("--media-dir", help="Allow local image paths inside it.")
    ] = None,
    allow_remote_images: Annotated[
        bool, typer.Option("--allow-remote-images", help="Fetch http(s) image URLs.")
    ] = False,
    max_body_mb: Annotated[float, typer.Option("--max-body-mb", help="Request size cap.")] = 32.0,
    max_image_pixels: Annotated[
        int, typer.Option("--max-image-pixels", help="Pixels per image cap.")
    ] = 50_000_000,
    max_images: Annotated[int, typer.Option("--max-images", help="Images per request cap.")] = 8,
    max_tokens: Annotated[int, typer.Option("--max-tokens", help="max_tokens cap.")] = 4096,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Requests decoded together.")] = 8,
    queue_size: Annotated[
        int, typer.Option("--queue-size", help="Requests waiting beyond those (503 past it).")
    ] = 32,
    prompt_cache_gb: Annotated[
        float, typer.Option("--prompt-cache-gb", help="Prompt and image cache budget.")
    ] = 2.0,
    max_audio_seconds: Annotated[
        float, typer.Option("--max-audio-seconds", help="Seconds of audio per request cap.")
    ] = 1800.0,
    max_audio_in_flight: Annotated[
        float, typer.Option("--max-audio-in-flight", help="Seconds of audio in flight (429).")
    ] = 3600.0,
    dtype: DtypeOption = None,
    adapter_path: AdapterOption = None,
    allow_merged_adapters: MergedOption = False,
) -> None:
    """Serve the OpenAI chat and speech-to-text APIs (and a chat page) on this machine."""
    from .server import ServerSettings, model_id
    from .server import serve as run

    if media_dir is not None and not media_dir.is_dir():
        raise ValueError(f"--media-dir {media_dir} is not a folder")
    if batch_size < 1 or queue_size < 0 or max_images < 0 or max_tokens < 1:
        raise ValueError("--batch-size and --max-tokens must be at least 1, --queue-size and "
                         "--max-images at least 0")  # fmt: skip
    if host not in ("127.0.0.1", "localhost", "::1"):
        typer.echo(f"warning: listening on {host}: other machines can reach this server"
                   + ("" if api_key else " (and no --api-key is set)"), err=True)  # fmt: skip
    settings = ServerSettings(
        model_name=model_id(model), api_key=api_key, cors_origins=cors_origin or (),
        media_dir=media_dir, allow_remote_images=allow_remote_images, max_body_mb=max_body_mb,
        max_image_pixels=max_image_pixels, max_images=max_images, max_tokens=max_tokens,
        batch_size=batch_size, queue_size=queue_size, prompt_cache_gb=prompt_cache_gb,
        max_audio_seconds=max_audio_seconds, max_audio_in_flight=max_audio_in_flight,
    )  # fmt: skip
    group, first = _ranks()
    path, processor = _processor(model, dtype, None, quiet=not first)
    loaded_model = _weights(path, dtype, adapter_path, group, allow_merged_adapters)
    if first:
        typer.echo(f"Serving {model} on http://{host}:{port} (OpenAI API at /v1)", err=True)
    run(loaded_model, processor, settings, host=host, port=port, group=group)


@app.command()
def lora(
    data: Annotated[Path, typer.Option("--data", help="Training rows (JSONL).")],
    adapter_path: Annotated[
        Path, typer.Option("--adapter-path", help="Folder the adapter is saved in.")
    ],
    model: ModelOption = DEFAULT_MODEL,
    val_data: Annotated[
        Path | None, typer.Option("--val-data", help="Validation rows (JSONL).")
    ] = None,
    iters: Annotated[int, typer.Option("--iters", help="Training steps.")] = 100,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Rows per step.")] = 1,
    learning_rate: Annotated[float, typer.Option("--learning-rate", help="Adam's rate.")] = 1e-5,
    rank: Annotated[int, typer.Option("--rank", help="Adapter rank.")] = 8,
    scale: Annotated[float, typer.Option("--scale", help="Adapter scale.")] = 20.0,
    dropout: Annotated[float, typer.Option("--dropout", help="Adapter dropout.")] = 0.0,
    num_layers: Annotated[
        int, typer.Option("--num-layers", help="Adapt the last K decoder layers (-1: all).")
    ] = -1,
    fine_tune_type: Annotated[str, typer.Option("--fine-tune-type", help="lora or dora.")] = "lora",
    target_modules: Annotated[
        list[str] | None,
        typer.Option(
            "--target-modules",
            help="Modules to adapt, comma-separated (self_attn.o_proj,lm_head); repeatable.",
        ),
    ] = None,
    grad_checkpoint: Annotated[
        bool, typer.Option("--grad-checkpoint", help="Recompute activations: less memory.")
    ] = False,
    steps_per_report: Annotated[
        int, typer.Option("--steps-per-report", help="Report train loss every N steps.")
    ] = 10,
    steps_per_eval: Annotated[
        int, typer.Option("--steps-per-eval", help="Validation loss every N steps.")
    ] = 50,
    save_every: Annotated[int, typer.Option("--save-every", help="Save every N steps.")] = 100,
    resume_adapter_file: Annotated[
        Path | None, typer.Option("--resume-adapter-file", help="Adapter weights to go on from.")
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Random seed.")] = 0,
    num_crops: NumCropsOption = None,
    max_seq_length: Annotated[
        int, typer.Option("--max-seq-length", help="Longest row, in tokens.")
    ] = 4096,
    dtype: DtypeOption = None,
    allow_merged_adapters: MergedOption = False,
) -> None:
    """Fine-tune an adapter (LoRA, DoRA; QLoRA on a quantized model)."""
    from .adapters import AdapterSettings
    from .lora import TrainSettings, fine_tune

    adapter = AdapterSettings(
        rank=rank,
        scale=scale,
        dropout=dropout,
        num_layers=num_layers,
        fine_tune_type=fine_tune_type,
        targets=[name for value in target_modules or [] for name in value.split(",") if name],
    )
    schedule = TrainSettings(
        iters=iters,
        batch_size=batch_size,
        learning_rate=learning_rate,
        steps_per_report=steps_per_report,
        steps_per_eval=steps_per_eval,
        save_every=save_every,
        grad_checkpoint=grad_checkpoint,
        seed=seed,
    )
    path, processor = _processor(model, dtype, num_crops)
    recorded = dict(model=model, data=str(data), iters=iters, batch_size=batch_size,
                    learning_rate=learning_rate, num_crops=num_crops,
                    max_seq_length=max_seq_length, seed=seed)  # fmt: skip
    with _bars() as bar:
        training = bar("Training")

        def report(entry: Any) -> None:
            if training is None:
                typer.echo(", ".join(f"{k.replace('_', ' ')} {v:.4g}"
                                     for k, v in entry.row().items()), err=True)  # fmt: skip

        start, last = fine_tune(
            lambda: _weights(path, dtype, allow_merged_adapters=allow_merged_adapters),
            processor, data, adapter_path, adapter, schedule,
            val_data=val_data, resume_adapter_file=resume_adapter_file, num_crops=num_crops,
            max_seq_length=max_seq_length, recorded=recorded,
            encoding=bar("Encoding images"), progress=training, report=report,
        )  # fmt: skip
    typer.echo(
        f"Saved the adapter in {adapter_path} (train loss {last.get('train_loss', 0):.3f}"
        f" after {start + iters} steps; metrics in {adapter_path / 'metrics.jsonl'})",
        err=True,
    )


@app.command()
def fuse(
    adapter_path: Annotated[Path, typer.Option("--adapter-path", help="The adapter to fuse.")],
    save_path: Annotated[str, typer.Option("--save-path", help="Output folder.")],
    model: ModelOption = DEFAULT_MODEL,
    dequantize: Annotated[
        bool, typer.Option("--dequantize", "-d", help="Keep a quantized base's result 16-bit.")
    ] = False,
    quantize: Annotated[
        bool, typer.Option("--quantize", "-q", help="Quantize the result.")
    ] = False,
    q_bits: Annotated[int | None, typer.Option("--q-bits", help="Bits (the base's).")] = None,
    q_group_size: Annotated[
        int | None, typer.Option("--q-group-size", help="Group size (the base's).")
    ] = None,
    dtype: Annotated[
        str | None, typer.Option("--dtype", help="float16, bfloat16 or float32 for the rest.")
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Replace an existing model folder at --save-path.")
    ] = False,
) -> None:
    """Fuse an adapter into its model and save the result."""
    from .fuse import fuse as run

    with _bars() as bar:
        run(
            model,
            adapter_path,
            save_path,
            dequantize=dequantize,
            quantize=quantize,
            q_bits=q_bits,
            q_group_size=q_group_size,
            dtype=dtype,
            force=force,
            log=lambda line: typer.echo(line, err=True),
            progress=bar("Writing weights"),
            check_progress=bar("Comparing"),
        )


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
    force: Annotated[
        bool, typer.Option("--force", help="Replace an existing model folder at --mlx-path.")
    ] = False,
    check: Annotated[
        bool, typer.Option("--check/--no-check", help="Fidelity report after quantizing.")
    ] = True,
) -> None:
    """Convert Hugging Face weights to MLX, optionally quantized."""
    from .convert import convert as run

    with _bars() as bar:
        run(
            hf_path, mlx_path, quantize=quantize, q_bits=q_bits, q_group_size=q_group_size,
            dtype=dtype, quantize_vision=quantize_vision, dequantize=dequantize,
            upload_repo=upload_repo, force=force, check=check,
            log=lambda line: typer.echo(line, err=True), progress=bar("Writing weights"),
            check_progress=bar("Checking fidelity"),
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
