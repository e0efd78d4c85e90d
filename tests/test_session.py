"""ChatSession: every turn equals generate() on the rendered conversation, only faster."""

import pytest

import phi3v_mlx
from phi3v_mlx import ChatSession
from tests.conftest import open_image


@pytest.fixture
def counted(loaded, monkeypatch):
    """The model with a counter of vision-tower runs (crops through CLIP)."""
    model, processor = loaded
    runs = []
    original = model.vision.crop_features

    def counting(pixel_values):
        runs.append(pixel_values.shape[0])
        return original(pixel_values)

    monkeypatch.setattr(model.vision, "crop_features", counting)
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
