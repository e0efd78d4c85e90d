"""``phi3v batch``: inputs from files, folders and manifests; a resumable JSONL output; the same
run split across the ranks of ``mlx.launch`` (data parallel, coordinated by ``mx.distributed``)."""

from __future__ import annotations

import json
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx

from .batch import BatchEngine, Request, RowEvent
from .generate import GenerationResult, SamplingOptions, chat_prompt
from .models.base import DecoderModel
from .processor import Processor
from .thinking import split_result, thinking_mode

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
AUDIO_EXTENSIONS = {".wav", ".flac", ".ogg", ".oga", ".mp3", ".aiff", ".aif"}


class InputError(ValueError):
    """Inputs that cannot be run, found before any model is loaded."""


@dataclass
class Item:
    """One input: its id, its image paths (as written) and where they are, its question, and
    its recordings (paths as written, and where they are)."""

    id: str
    images: list[str]
    files: list[Path]
    prompt: str
    audios: list[str] = field(default_factory=list)
    audio_files: list[Path] = field(default_factory=list)


def _media_in(folder: Path) -> list[Path]:
    return sorted(
        path
        for path in folder.rglob("*")
        if path.suffix.lower() in IMAGE_EXTENSIONS | AUDIO_EXTENSIONS and path.is_file()
    )


def _single(path: str, prompt: str) -> Item:
    """The item of one image or audio file."""
    if Path(path).suffix.lower() in AUDIO_EXTENSIONS:
        return Item(path, [], [], prompt, [path], [Path(path)])
    return Item(path, [path], [Path(path)], prompt)


def _paths(row: dict[str, Any], one: str, many: str, where: str) -> list[str]:
    if one in row and many in row:
        raise InputError(f"{where}: give either {one} or {many}, not both")
    paths = row.get(many, [row[one]] if one in row else [])
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        raise InputError(f"{where}: {many} must be a list of paths")
    return paths


def _manifest_items(path: Path, default_prompt: str | None) -> Iterator[Item]:
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise InputError(f"{where}: a row must be a JSON object")
        images = _paths(row, "image", "images", where)
        audios = _paths(row, "audio", "audios", where)
        prompt = row.get("prompt", default_prompt)
        if not isinstance(prompt, str) or not prompt.strip():
            raise InputError(f"{where}: no prompt (give one in the row or --prompt)")
        if "id" in row:
            item_id = str(row["id"])
        elif images or audios:
            named = images + audios
            item_id = named[0] if len(named) == 1 else ",".join(named)
        else:
            raise InputError(f"{where}: a text-only row needs an id")
        files = [path.parent / image for image in images]
        yield Item(item_id, images, files, prompt, audios, [path.parent / a for a in audios])


def collect_inputs(inputs: Sequence[str], prompt: str | None) -> list[Item]:
    """Every input in order: image and audio files, those found in folders (recursively,
    sorted) and the rows of ``.jsonl`` manifests. Problems are one-line :class:`InputError`s."""
    items: list[Item] = []
    for text in inputs:
        path = Path(text).expanduser()
        if not path.exists():
            raise InputError(f"{text}: no such file or folder")
        if path.is_dir():
            found = _media_in(path)
            if not found:
                raise InputError(f"{text}: no images in this folder (nor audio files)")
            images = [str(image) for image in found]
        elif path.suffix.lower() == ".jsonl":
            items.extend(_manifest_items(path, prompt))
            continue
        else:
            images = [text]
        if prompt is None:
            raise InputError("--prompt is needed for image inputs (and audio files)")
        items.extend(_single(image, prompt) for image in images)
    if not items:
        raise InputError("no inputs")
    seen: set[str] = set()
    for item in items:
        if item.id in seen:
            raise InputError(f"duplicate id {item.id!r}")
        seen.add(item.id)
    return items


def drop_cut_line(output: Path) -> None:
    """Remove from an output file a last line that a crash cut short."""
    data = output.read_bytes() if output.exists() else b""
    if data and not data.endswith(b"\n"):
        output.write_bytes(data[: data.rfind(b"\n") + 1])


def answered_ids(output: Path) -> set[str]:
    """Ids already in an output file."""
    if not output.exists():
        return set()
    done = set()
    for line in output.read_text(encoding="utf-8").splitlines():
        try:
            done.add(str(json.loads(line)["id"]))
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    return done


def output_row(
    item: Item, result: GenerationResult | None, error: str | None, reasoning: bool = False
) -> dict[str, Any]:
    """An input's line of the output: its result (with its ``reasoning`` beside the ``text``
    when ``reasoning``: a model with thinking modes), or its error."""
    row: dict[str, Any] = {"id": item.id, "images": item.images, "prompt": item.prompt}
    if item.audios:
        row["audios"] = item.audios
    if error is not None:
        row["error"] = error
        return row
    if reasoning:
        row["reasoning"] = result.reasoning
    row.update(
        text=result.text,
        finish_reason=result.finish_reason,
        prompt_tokens=result.prompt_tokens,
        generation_tokens=result.generation_tokens,
    )
    return row


class Ranks:
    """The processes of an ``mlx.launch`` run, exchanging finished rows with ``mx.distributed``
    (rank 0 writes them); a single process is a group of one."""

    def __init__(self):
        self.group = mx.distributed.init()
        self.rank, self.size = self.group.rank(), self.group.size()

    def from_first(self, values: list[int]) -> list[int]:
        """Rank 0's ``values`` (ints, same length everywhere) on every rank."""
        if self.size == 1:
            return values
        mine = mx.array(values if self.rank == 0 else [0] * len(values), dtype=mx.int32)
        return mx.distributed.all_sum(mine, group=self.group, stream=mx.cpu).tolist()

    def exchange(self, lines: list[str], pending: int) -> tuple[list[str], int]:
        """Every rank's finished lines (in rank order) and the rows still pending everywhere."""
        if self.size == 1:
            return lines, pending
        payload = "".join(line + "\n" for line in lines).encode("utf-8")
        header = mx.array([len(payload), pending], dtype=mx.int32)
        headers = mx.distributed.all_gather(header, group=self.group, stream=mx.cpu).tolist()
        lengths, total_pending = headers[0::2], sum(headers[1::2])
        width = max(lengths)
        if width == 0:
            return [], total_pending
        padded = mx.array(list(payload.ljust(width, b"\0")), dtype=mx.uint8)
        blob = bytes(mx.distributed.all_gather(padded, group=self.group, stream=mx.cpu).tolist())
        out = []
        for rank, length in enumerate(lengths):
            text = blob[rank * width : rank * width + length].decode("utf-8")
            out.extend(text.splitlines())
        return out, total_pending


@dataclass
class Tally:
    """What a run has written, for the progress bar and the summary."""

    total: int
    started: float = field(default_factory=time.perf_counter)
    done: int = 0
    errors: int = 0
    images: int = 0
    tokens: int = 0

    def add(self, row: dict[str, Any]) -> None:
        self.done += 1
        if "error" in row:
            self.errors += 1
        else:
            self.images += len(row["images"])
            self.tokens += row["generation_tokens"]

    def status(self) -> str:
        """Inputs done, images per minute and generated tokens per second so far."""
        seconds = max(time.perf_counter() - self.started, 1e-9)
        return (
            f"{self.done}/{self.total} inputs, {60 * self.images / seconds:.1f} images/min, "
            f"{self.tokens / seconds:.2f} tok/s"
        )

    def line(self, output: Path) -> str:
        seconds = time.perf_counter() - self.started
        return (
            f"Answered {self.done} of {self.total} inputs ({self.errors} errors) in "
            f"{seconds:.1f} s: {60 * self.images / max(seconds, 1e-9):.1f} images/min, "
            f"{self.tokens / max(seconds, 1e-9):.2f} generated tokens/s; results in {output}"
        )


def run(
    model_loader: Callable[[bool], tuple[DecoderModel, Processor]],
    items: list[Item],
    output: Path,
    *,
    system: str | None,
    batch_size: int,
    options: SamplingOptions,
    num_crops: int | None,
    overwrite: bool,
    report: Callable[[Tally], None] | None = None,
    thinking: str | None = None,
) -> Tally | None:
    """Answer every item not yet in ``output`` (all of them with ``overwrite``), appending rows as
    they finish; under ``mlx.launch`` the ranks share the items and rank 0 writes. Returns what
    was written (None on the other ranks). ``model_loader(first)`` loads the model, ``first``
    telling whether this is rank 0 (which alone speaks). A model with thinking modes answers in
    mode ``thinking`` ("on", "off", "auto"; None is "auto"), each row's ``reasoning`` apart from
    its ``text``; a model without them refuses the option."""
    ranks = Ranks()
    first = ranks.rank == 0
    if first and overwrite and output.exists():
        output.unlink()
    if first:
        drop_cut_line(output)
    done = answered_ids(output) if first else set()
    mask = ranks.from_first([int(item.id in done) for item in items])
    todo = [item for item, skip in zip(items, mask, strict=True) if not skip]
    mine = todo[ranks.rank :: ranks.size]
    tally = Tally(total=len(todo))
    model, processor = model_loader(first)
    mode = thinking_mode(processor, thinking)
    engine = BatchEngine(model, processor, batch_size=batch_size)
    by_row: dict[int, Item] = {}
    try:
        for item in mine:
            settings = SamplingOptions(**{**vars(options), "seed": row_seed(options.seed, item)})
            prompt = chat_prompt(processor, item.prompt, len(item.images), system,
                                 audios=len(item.audios), thinking=mode)  # fmt: skip
            request = Request(prompt, item.files, num_crops, audios=item.audio_files)
            by_row[engine.submit(request, settings)] = item
        sink = output.open("a", encoding="utf-8") if first else None
        try:
            while True:
                events = engine.step() if engine.pending() else []
                rows = [
                    output_row(by_row[e.row], e.result and split_result(processor, mode, e.result),
                               e.error, reasoning=mode is not None)
                    for e in events if _ended(e)
                ]  # fmt: skip
                lines = [json.dumps(row, ensure_ascii=False) for row in rows]
                lines, pending = ranks.exchange(lines, engine.pending())
                if sink is not None:
                    for line in lines:
                        sink.write(line + "\n")
                        tally.add(json.loads(line))
                    sink.flush()
                    if report is not None and lines:
                        report(tally)
                if pending == 0:
                    break
        finally:
            if sink is not None:
                sink.close()
    finally:
        engine.close()
    return tally if first else None


def row_seed(seed: int | None, item: Item) -> int | None:
    """Each input's own seed, from the run's and its id: the same whatever the batch, the rank
    or a resume."""
    return None if seed is None else (seed + zlib.crc32(item.id.encode())) % 2**32


def _ended(event: RowEvent) -> bool:
    return event.result is not None or event.error is not None
