"""The engine thread: one batch engine decoding every request in flight, fed by the web
handlers' event loop and answering it with row events."""

from __future__ import annotations

import asyncio
import logging
import queue
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import mlx.core as mx
from mlx_lm.generate import generation_stream

from ..batch import BatchEngine, Request, RowEvent
from ..distributed import broadcast_object, seed_alike
from ..generate import SamplingOptions
from ..models.base import DecoderModel
from ..processor import Processor
from ..thinking import ReasoningSplit
from .settings import ApiError, ServerSettings
from .store import PromptStore

log = logging.getLogger("phi3v_mlx.server")


@dataclass
class Job:
    """One chat completion in the engine: what to run and where its events go."""

    request: Request
    options: SamplingOptions
    keys: list[Any]  # the prompt's positions, image-aware
    image_keys: list[Any]
    loop: asyncio.AbstractEventLoop | None  # where its events go (None on a following rank)
    events: asyncio.Queue | None
    row: int | None = None
    cached_tokens: int = 0
    prompt_tokens: int = 0
    audio_seconds: float = 0.0  # of recordings, held against the in-flight limit
    # the answer's text into reasoning_content and content (a model with thinking modes)
    split: ReasoningSplit = field(default_factory=lambda: ReasoningSplit(None, None))

    def without_replies(self) -> Job:
        """This job as the other ranks of a split model replay it: no event loop to answer."""
        return replace(self, loop=None, events=None, split=ReasoningSplit(None, None))

    def error(self, event: RowEvent) -> ApiError:
        """The answer to a row that ended with an error: a 400 if the request is to blame,
        else a 500."""
        if event.fault:
            return ApiError(500, event.error, code="generation_failed")
        return ApiError(400, event.error, param="messages")


Command = tuple[str, "Job"]  # ("submit" | "cancel", the job)


class EngineThread(threading.Thread):
    """Runs the batch engine: takes jobs and cancellations, steps, hands events back to the
    handlers' event loop. Admission is bounded: ``reserve`` refuses past the capacity. With the
    model split across ranks, this runs on rank 0 and the others replay its commands
    (:func:`follow`)."""

    def __init__(
        self,
        model: DecoderModel,
        processor: Processor,
        settings: ServerSettings,
        group: mx.distributed.Group | None = None,
    ):
        super().__init__(name="phi3v-engine", daemon=True)
        self.model, self.processor, self.settings = model, processor, settings
        self.group = group  # of the ranks the model is split across, this one the first
        self.capacity = settings.batch_size + settings.queue_size
        self.store = PromptStore(int(settings.prompt_cache_gb * 1e9))
        self._intake: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._reserved = 0
        self._audio = 0.0
        self._stopping = threading.Event()
        self._jobs: dict[int, Job] = {}

    def reserve(self) -> bool:
        with self._lock:
            if self._reserved >= self.capacity:
                return False
            self._reserved += 1
            return True

    def reserve_audio(self, job: Job) -> bool:
        """Hold the job's seconds of audio; False past the in-flight limit."""
        with self._lock:
            if job.audio_seconds and self._audio + job.audio_seconds > (
                self.settings.max_audio_in_flight
            ):
                return False
            self._audio += job.audio_seconds
            return True

    def release(self, job: Job | None = None) -> None:
        """Give back a job's place (and its seconds of audio)."""
        with self._lock:
            self._reserved -= 1
            self._audio -= job.audio_seconds if job is not None else 0.0

    def release_audio(self, job: Job) -> None:
        with self._lock:
            self._audio -= job.audio_seconds

    @property
    def in_flight(self) -> int:
        with self._lock:
            return self._reserved

    def submit(self, job: Job) -> None:
        self._intake.put(("submit", job))

    def cancel(self, job: Job) -> None:
        self._intake.put(("cancel", job))

    def stop(self) -> None:
        self._stopping.set()
        self._intake.put(("stop", None))

    def _engine(self) -> BatchEngine:
        return BatchEngine(self.model, self.processor, batch_size=self.settings.batch_size,
                           interleave=True, features=self.store)  # fmt: skip

    def run(self) -> None:
        if self.group is not None:  # the followers sample alike (MLX's generator is per thread)
            seed_alike(self.group)
        self.drive(self._next_commands)

    def drive(self, next_commands: Callable[[bool], list[Command] | None]) -> None:
        """Apply each list of commands ``next_commands(busy)`` gives and step the engine while
        it has rows, until it gives None (``busy``: rows are in the engine)."""
        engine = self._engine()
        try:
            while (commands := next_commands(engine.pending() > 0)) is not None:
                for command, job in commands:
                    self._apply(engine, command, job)
                if engine.pending():
                    engine = self._step(engine)
        finally:
            engine.close()

    def _next_commands(self, busy: bool) -> list[Command] | None:
        """The handlers' commands since the last step (waiting for one when idle), None once
        stopped; with the model split, every other rank is sent what this rank will do."""
        commands = None if self._stopping.is_set() else self._take(block=not busy)
        if self.group is not None and (commands is None or commands or busy):
            sent = None
            if commands is not None:  # one copy per job: a cancel may follow its submit here
                copies = {id(job): job.without_replies() for _, job in commands}
                sent = [(command, copies[id(job)]) for command, job in commands]
            replay(sent, self.group)
        return commands

    def _take(self, block: bool) -> list[Command]:
        """The commands queued by the handlers (submissions and cancellations), in order."""
        commands = []
        try:
            item = self._intake.get(timeout=0.5) if block else self._intake.get_nowait()
            while True:
                if item[0] != "stop":
                    commands.append(item)
                item = self._intake.get_nowait()
        except queue.Empty:
            return commands

    def _apply(self, engine: BatchEngine, command: str, job: Job) -> None:
        if command == "submit":
            try:
                cache, prefix = self.store.copy_longest_prefix(job.keys)
            except Exception:  # reuse is a saving, never a reason to fail the request
                log.exception("prompt cache reuse failed")
                cache, prefix = None, 0
            job.row = engine.submit(
                job.request,
                job.options,
                keep_cache=True,
                cache=cache,
                prefix=prefix,
                image_keys=job.image_keys,
            )
            self._jobs[job.row] = job
        elif command == "cancel" and job.row in self._jobs:
            engine.cancel(job.row)
            del self._jobs[job.row]
            self.release(job)

    def _step(self, engine: BatchEngine) -> BatchEngine:
        """One engine step, its events delivered; a fault fails what is in flight, and only
        that, and the engine is replaced."""
        try:
            events = engine.step()
        except Exception as e:
            log.exception("engine step failed")
            self._fail_all(engine, f"generation failed: {e}")
            engine.close()
            return self._engine()
        for event in events:
            self._deliver(event)
        return engine

    def _deliver(self, event: RowEvent) -> None:
        job = self._jobs.get(event.row)
        if job is None:
            return
        if event.result is not None or event.error is not None:
            del self._jobs[event.row]
            self.release(job)
            if event.fault:
                log.error("request failed: %s", event.error)
            if event.result is not None:
                job.prompt_tokens = len(job.keys)
                job.cached_tokens = len(job.keys) - event.result.prompt_tokens
                if event.cache is not None:
                    fed = job.keys + event.result.tokens
                    self.store.keep_prompt(fed[: event.cache.offset], event.cache)
        if job.loop is not None:  # None on the ranks that follow rank 0
            job.loop.call_soon_threadsafe(job.events.put_nowait, event)

    def _fail_all(self, engine: BatchEngine, message: str) -> None:
        for row in list(self._jobs):
            engine.cancel(row)
            self._deliver(RowEvent(row, error=message, fault=True))


def follow(
    model: DecoderModel,
    processor: Processor,
    settings: ServerSettings,
    group: mx.distributed.Group,
) -> None:
    """Run a rank other than the first of a split server: replay rank 0's engine commands, step
    for step, until rank 0 stops (an interrupt is rank 0's to handle)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    seed_alike(group)  # with rank 0's engine thread
    replica = EngineThread(model, processor, settings)
    replica.drive(lambda busy: replay(None, group))


def replay(commands: list[Command] | None, group: mx.distributed.Group) -> list[Command] | None:
    """Rank 0's commands on every rank, once the steps already queued have run (their
    all-sums must not interleave with this one's)."""
    mx.synchronize(generation_stream)
    return broadcast_object(commands, group)
