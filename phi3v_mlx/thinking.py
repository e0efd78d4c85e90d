"""Reasoning modes, for a model that thinks before it answers (Phi-4-reasoning-vision): the
``thinking`` option checked against the model, and generated text split into reasoning and answer
as it streams.

A model's processor with thinking modes has ``thinking_modes`` (each mode's addition to the
generation prompt), ``apply_chat_template(..., thinking=mode)`` and ``reasoning_stream(mode)``
(an object with ``feed(text) -> (reasoning, answer)``, ``finish()`` and ``thinking``: whether the
thought is still open).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .generate import GenerationChunk, GenerationResult

DEFAULT_MODE = "auto"  # the model's template as it stands: the model chooses whether to think


class ThinkingError(ValueError):
    """A ``thinking`` option the model cannot take."""


def thinking_mode(processor: Any, thinking: str | None) -> str | None:
    """The reasoning mode of a prompt: ``thinking`` checked ("on", "off" or "auto"; None is
    "auto"), or None for a model without thinking modes, which takes no other value."""
    modes = getattr(processor, "thinking_modes", None)
    if not modes:
        if thinking is not None:
            raise ThinkingError("this model has no thinking modes")
        return None
    if thinking is None:
        return DEFAULT_MODE
    if not isinstance(thinking, str) or thinking not in modes:
        raise ThinkingError(f"thinking must be one of {', '.join(modes)}; got {thinking!r}")
    return thinking


def declared_mode(processor: Any, thinking: str | None) -> str | None:
    """The reasoning mode a prompt built beforehand was rendered in: ``thinking`` checked as by
    :func:`thinking_mode`, or None when it is not given (the text is then left as generated)."""
    return None if thinking is None else thinking_mode(processor, thinking)


def check_rendered(processor: Any, mode: str, prompt: str) -> None:
    """Refuse a chat-formatted ``prompt`` whose generation prompt ends as another reasoning
    mode's than ``mode`` (each mode's addition is in ``processor.thinking_modes``)."""
    modes = processor.thinking_modes
    ends = [m for m, suffix in modes.items() if suffix and prompt.endswith(suffix)]
    found = ends[0] if ends else next((m for m, suffix in modes.items() if not suffix), mode)
    if found != mode:
        raise ThinkingError(f"the prompt is rendered in thinking mode {found!r}, not {mode!r}")


def template_options(mode: str | None) -> dict[str, str]:
    """The keyword arguments of ``apply_chat_template`` that select ``mode``."""
    return {} if mode is None else {"thinking": mode}


def render(
    processor: Any, messages: list[dict[str, Any]], thinking: str | None = None
) -> tuple[str, str | None]:
    """The conversation's prompt with the answer's reasoning mode (see :func:`thinking_mode`),
    and that mode."""
    mode = thinking_mode(processor, thinking)
    return processor.apply_chat_template(messages, **template_options(mode)), mode


class ReasoningSplit:
    """One generation's text split into reasoning and answer as it streams (all answer for a
    model without thinking modes)."""

    def __init__(self, processor: Any, mode: str | None):
        self.stream = None if mode is None else processor.reasoning_stream(mode)

    @property
    def enabled(self) -> bool:
        """Whether the text is split (the model has thinking modes)."""
        return self.stream is not None

    def feed(self, text: str) -> tuple[str, str]:
        """The (reasoning, answer) deltas of the next piece of generated text."""
        return ("", text) if self.stream is None else self.stream.feed(text)

    def finish(self, finish_reason: str | None) -> tuple[str, str, str | None]:
        """The (reasoning, answer) text held back at the end, and the generation's finish
        reason: "length" if it ended inside its thought (the answer never came)."""
        if self.stream is None:
            return "", "", finish_reason
        reasoning, answer = self.stream.finish()
        return reasoning, answer, "length" if self.stream.thinking else finish_reason


def split_text(processor: Any, mode: str | None, text: str) -> tuple[str, str, str | None]:
    """A whole generated text's reasoning and answer, and "length" if the thought was left
    open (else None); the reasoning is "" for a model without thinking modes."""
    split = ReasoningSplit(processor, mode)
    reasoning, answer = split.feed(text)
    more_reasoning, more_answer, finish = split.finish(None)
    return reasoning + more_reasoning, answer + more_answer, finish


def split_result(processor: Any, mode: str | None, result: GenerationResult) -> GenerationResult:
    """``result`` with its text split into ``reasoning`` and ``text`` (the answer), as
    :func:`split_text` splits it; unchanged for ``mode`` None."""
    if mode is None:
        return result
    reasoning, answer, finish = split_text(processor, mode, result.text)
    return replace(result, text=answer, reasoning=reasoning,
                   finish_reason=finish or result.finish_reason)  # fmt: skip


def split_chunks(
    chunks: Iterator[GenerationChunk], processor: Any, mode: str | None
) -> Iterator[GenerationChunk]:
    """``chunks`` with each one's text split into ``reasoning`` and ``text`` (the answer). A
    generation that ends inside its thought (the answer never came) finishes with "length".
    Closing this stream closes ``chunks``."""
    split = ReasoningSplit(processor, mode)
    try:
        for chunk in chunks:
            reasoning, answer = split.feed(chunk.text)
            if chunk.finish_reason is not None:
                more_reasoning, more_answer, finish = split.finish(chunk.finish_reason)
                reasoning, answer = reasoning + more_reasoning, answer + more_answer
                chunk = replace(chunk, finish_reason=finish)
            yield replace(chunk, text=answer, reasoning=reasoning)
    finally:
        chunks.close()
