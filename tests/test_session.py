"""ChatSession: every turn equals generate() on the rendered conversation, only faster."""

from concurrent.futures import ThreadPoolExecutor

import mlx.nn as nn
import pytest

import phi3v_mlx
from phi3v_mlx import ChatSession
from phi3v_mlx.generate import collect
from tests.conftest import open_image
from tests.helpers import count_vision_runs


@pytest.fixture
def counted(loaded, monkeypatch):
    """The model with a counter of vision-tower runs (crops through CLIP)."""
    model, processor = loaded
    runs = count_vision_runs(model, monkeypatch)
    return model, processor, runs


def reference(session, images, num_crops, max_tokens):
    """generate() on the whole conversation so far, without the session's last answer."""
    prompt = session.processor.apply_chat_template(session.messages[:-1])
    return phi3v_mlx.generate(
        session.model, session.processor, prompt, images=images or None, num_crops=num_crops,
        max_tokens=max_tokens,
    )  # fmt: skip


def test_turns_equal_generate_on_the_conversation(counted):
    model, processor, runs = counted
    first, second = open_image("b_small"), open_image("d_tall")
    session = ChatSession(model, processor, system="You answer briefly.")
    turns = [
        ("What is in this picture?", [first]),
        ("What colour dominates it?", []),
        ("Now compare it with this one.", [second]),
        ("Which one is taller?", []),
    ]
    shown = []
    for text, images in turns:
        runs.clear()
        shown += images
        answer = session.send(text, images=images, num_crops=4, max_tokens=6)
        vision_runs = list(runs)
        want = reference(session, shown, 4, 6)
        assert answer.tokens == want.tokens and answer.text == want.text
        # Only new images go through the vision tower, each once.
        assert vision_runs == [len(processor.preprocess(images, 4).pixel_values)] * bool(images)
    assert [m["role"] for m in session.messages] == ["system"] + ["user", "assistant"] * 4
    assert session.messages[5]["content"][0] == {"type": "image"}


def test_follow_up_reuses_cache_and_image(counted):
    model, processor, runs = counted
    session = ChatSession(model, processor)
    image = open_image("b_small")
    first = session.send("Describe the image.", images=[image], num_crops=4, max_tokens=4)
    assert first.prompt_tokens > 757 and runs == [5]
    runs.clear()
    second = session.send("And the colours?", max_tokens=4)
    assert runs == []  # no CLIP run
    assert second.prompt_tokens < 40  # only the new turn was prefilled, not the 757 image slots
    runs.clear()
    again = session.send("Once more.", images=[image.copy()], num_crops=4, max_tokens=2)
    assert runs == [] and again.prompt_tokens > 757  # same pixels: features reused


def test_stream_equals_send_and_reset_forgets(loaded):
    model, processor = loaded
    session = ChatSession(model, processor)
    chunks = list(session.stream("Hello!", max_tokens=5))
    text = "".join(c.text for c in chunks)
    assert session.messages[-1] == {"role": "assistant", "content": text}
    session.reset()
    assert session.messages == [] and session.images == []
    again = session.send("Hello!", max_tokens=5)
    assert again.text == text


def test_interrupted_answer_is_kept_and_cache_stays_consistent(loaded):
    model, processor = loaded
    session = ChatSession(model, processor)
    stream = session.stream("Tell me a story.", max_tokens=50)
    partial = "".join(next(stream).text for _ in range(3))
    stream.close()
    assert session.messages[-1] == {"role": "assistant", "content": partial}
    answer = session.send("Go on.", max_tokens=4)
    want = reference(session, [], None, 4)
    assert answer.tokens == want.tokens


def test_bad_image_changes_nothing(loaded, tmp_path):
    model, processor = loaded
    session = ChatSession(model, processor)
    with pytest.raises(ValueError, match="no such file"):
        session.send("What is it?", images=[tmp_path / "missing.png"])
    assert session.messages == [] and session.images == []


def _roles(session):
    return [m["role"] for m in session.messages]


def test_a_new_turn_closes_an_abandoned_stream(loaded):
    """stream(A) read twice, then send(B): A's answer stays as far as it was read, B follows it,
    closing A afterwards changes nothing, and later turns still equal generate()."""
    model, processor = loaded
    session = ChatSession(model, processor)
    stream_a = session.stream("Tell me a story.", max_tokens=40)
    shown = "".join(next(stream_a).text for _ in range(2))
    answer_b = session.send("Shorter, please.", max_tokens=5)
    stream_a.close()
    assert _roles(session) == ["user", "assistant", "user", "assistant"]
    assert session.messages[1]["content"] == shown
    assert session.messages[3]["content"] == answer_b.text
    assert list(stream_a) == []
    assert answer_b.tokens == reference(session, [], None, 5).tokens
    answer_c = session.send("Thanks.", max_tokens=4)
    assert answer_c.tokens == reference(session, [], None, 4).tokens
    assert answer_c.prompt_tokens < 20  # the cache survived: only the new turn was read


class FailingHead(nn.Module):
    """An LM head that raises ``error`` on its ``after``-th call."""

    def __init__(self, head, after, error):
        super().__init__()
        self.head, self.after, self.error, self.calls = head, after, error, 0

    def __call__(self, h):
        self.calls += 1
        if self.calls == self.after:
            raise self.error
        return self.head(h)


@pytest.mark.parametrize("where", ["option", "decode"])
def test_a_failed_turn_leaves_no_trace(loaded, where):
    model, processor = loaded
    session = ChatSession(model, processor)
    first = session.send("Hello!", max_tokens=4)
    before = [dict(m) for m in session.messages]
    if where == "option":
        with pytest.raises(ValueError, match="head size divisible by 32"):
            session.send("What now?", kv_bits=8, max_tokens=4)
    else:
        model.language.lm_head = FailingHead(model.language.lm_head, 3, RuntimeError("lost"))
        try:
            with pytest.raises(RuntimeError, match="lost"):
                session.send("What now?", max_tokens=6)
        finally:
            model.language.lm_head = model.language.lm_head.head
    assert session.messages == before and first.text == before[-1]["content"]
    again = session.send("What now?", max_tokens=4)
    assert again.tokens == reference(session, [], None, 4).tokens


def test_ctrl_c_while_decoding_keeps_the_cache_and_the_partial_answer(loaded):
    """A KeyboardInterrupt raised deep inside decoding (where Ctrl-C lands) keeps what was shown
    and the cache, trimmed to it: the next turn reads only its own tokens."""
    model, processor = loaded
    session = ChatSession(model, processor)
    image = open_image("b_small")
    model.language.lm_head = FailingHead(model.language.lm_head, 5, KeyboardInterrupt())
    shown = []
    try:
        with pytest.raises(KeyboardInterrupt):
            for chunk in session.stream("Describe it.", images=[image], num_crops=4,
                                        max_tokens=40):  # fmt: skip
                shown.append(chunk.text)
    finally:
        model.language.lm_head = model.language.lm_head.head
    assert shown and session.messages[-1] == {"role": "assistant", "content": "".join(shown)}
    follow = session.send("Go on.", max_tokens=4)
    assert follow.prompt_tokens < 20
    assert follow.tokens == reference(session, [image], 4, 4).tokens


def test_ctrl_c_while_reading_the_prompt_drops_the_turn_keeps_the_work(loaded):
    model, processor = loaded
    session = ChatSession(model, processor)
    image = open_image("b_small")
    session.send("Hi.", max_tokens=2)
    calls = []

    def progress(done, total):
        calls.append(done)
        if done > 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        collect(session.stream("Describe it.", images=[image], num_crops=4, max_tokens=4,
                               prefill_step_size=100, progress=progress))  # fmt: skip
    assert calls[-1] == 100 and _roles(session) == ["user", "assistant"]
    again = session.send("Describe it.", images=[image], num_crops=4, max_tokens=4,
                         prefill_step_size=100)  # fmt: skip
    assert again.prompt_tokens < 757  # the chunk read before the interrupt was kept
    assert again.tokens == reference(session, [image], 4, 4).tokens


def test_steps_from_other_threads(loaded):
    """A stream advanced from worker threads (as an async server does) answers the same."""
    model, processor = loaded
    want = ChatSession(model, processor).send("Count to five.", max_tokens=8)
    session = ChatSession(model, processor)
    stream = session.stream("Count to five.", max_tokens=8)
    with ThreadPoolExecutor(max_workers=3) as pool:
        chunks = []
        while True:
            chunk = pool.submit(next, stream, None).result()
            if chunk is None:
                break
            chunks.append(chunk)
    assert "".join(c.text for c in chunks) == want.text
    assert session.messages[-1]["content"] == want.text


def test_seeded_streams_interleaved_or_on_threads_reproduce(loaded):
    model, processor = loaded
    kw = dict(max_tokens=8, temperature=1.0, top_p=0.95)
    prompts = ["<|user|>\nOne<|end|>\n<|assistant|>\n", "<|user|>\nTwo<|end|>\n<|assistant|>\n"]
    alone = [phi3v_mlx.generate(model, processor, p, seed=7, **kw).tokens for p in prompts]
    streams = [phi3v_mlx.stream_generate(model, processor, p, seed=7, **kw) for p in prompts]
    interleaved = [[], []]
    active = {0, 1}
    while active:
        for i in sorted(active):
            chunk = next(streams[i], None)
            if chunk is None:
                active.discard(i)
            elif chunk.finish_reason != "stop":
                interleaved[i].append(chunk.token)
    assert interleaved == alone
    stream = phi3v_mlx.stream_generate(model, processor, prompts[0], seed=7, **kw)
    with ThreadPoolExecutor(max_workers=2) as pool:
        threaded = []
        while (chunk := pool.submit(next, stream, None).result()) is not None:
            if chunk.finish_reason != "stop":
                threaded.append(chunk.token)
    assert threaded == alone[0]
    other = phi3v_mlx.generate(model, processor, prompts[0], seed=8, **kw).tokens
    assert other != alone[0]


def test_repetition_penalty_turns_equal_generate(loaded):
    """The penalty sees the cached conversation, as generate() on it does."""
    model, processor = loaded
    session = ChatSession(model, processor)
    for text in ("Say a word.", "Again.", "Once more.", "And again.", "Last one."):
        answer = session.send(text, max_tokens=6, repetition_penalty=3.0)
        prompt = processor.apply_chat_template(session.messages[:-1])
        want = phi3v_mlx.generate(model, processor, prompt, max_tokens=6, repetition_penalty=3.0)
        assert answer.tokens == want.tokens, text
