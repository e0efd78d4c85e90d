"""The model's reasoning kept apart from its answer: the text between ``<think>`` and
``</think>`` (its THINK mode) is the reasoning, what follows it the answer; an answer opened by
the NOTHINK marker ``<|dummy_84|>``, or by neither, has no reasoning."""

from __future__ import annotations

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
NO_THINK = "<|dummy_84|>"


def _held_prefix(text: str, tag: str) -> int:
    """Length of the longest end of ``text`` that could begin ``tag``."""
    for size in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-size:]):
            return size
    return 0


class ReasoningStream:
    """Splits generated text, as it streams in, into reasoning and answer deltas.

    ``thinking`` True: the text starts inside the thought (the prompt ended with ``<think>``,
    thinking "on"). Otherwise a leading ``<think>`` opens one, a leading ``<|dummy_84|>`` is
    dropped, and anything else is answer. Whitespace around the reasoning and before the answer
    is dropped; text that may be the start of a tag is held back until it is known.
    """

    def __init__(self, thinking: bool = False):
        self.state = "reasoning" if thinking else "start"
        self.fresh = True  # no reasoning emitted yet: leading whitespace is dropped
        self.pending = ""

    @property
    def thinking(self) -> bool:
        """Whether the text so far ends inside an unclosed thought."""
        return self.state == "reasoning"

    def feed(self, text: str) -> tuple[str, str]:
        """The (reasoning, answer) deltas of the next piece of generated text."""
        buf, self.pending = self.pending + text, ""
        reasoning, answer = [], []
        while buf:
            if self.state == "start":
                head = buf.lstrip()
                if head.startswith(THINK_OPEN):
                    buf, self.state = head[len(THINK_OPEN) :], "reasoning"
                elif head.startswith(NO_THINK):
                    buf, self.state = head[len(NO_THINK) :], "answer_start"
                elif not head or THINK_OPEN.startswith(head) or NO_THINK.startswith(head):
                    self.pending = buf
                    break
                else:
                    self.state = "answer_start"
            elif self.state == "reasoning":
                if self.fresh:
                    buf = buf.lstrip()
                    if not buf:
                        break
                    self.fresh = False
                end = buf.find(THINK_CLOSE)
                if end >= 0:
                    reasoning.append(buf[:end].rstrip())
                    buf, self.state = buf[end + len(THINK_CLOSE) :], "answer_start"
                    continue
                cut = len(buf) - _held_prefix(buf, THINK_CLOSE)
                kept = len(buf[:cut].rstrip())
                reasoning.append(buf[:kept])
                self.pending = buf[kept:]
                break
            elif self.state == "answer_start":
                buf = buf.lstrip()
                if buf:
                    self.state = "answer"
            else:
                answer.append(buf)
                break
        return "".join(reasoning), "".join(answer)

    def finish(self) -> tuple[str, str]:
        """The (reasoning, answer) text held back at the end of the generation."""
        held, self.pending = self.pending, ""
        if self.state == "reasoning":
            return held.rstrip(), ""
        return "", held.strip() if self.state == "start" else held


def split_reasoning(text: str, thinking: bool = False) -> tuple[str, str]:
    """(reasoning, answer) of a whole generated text (``thinking`` as for
    :class:`ReasoningStream`); the reasoning is "" when the model did not think."""
    stream = ReasoningStream(thinking)
    reasoning, answer = stream.feed(text)
    tail_reasoning, tail_answer = stream.finish()
    return reasoning + tail_reasoning, answer + tail_answer
