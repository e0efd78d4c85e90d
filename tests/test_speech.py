"""Audio everywhere a user meets Phi-4-multimodal: generate, the chat session, batches, the CLI
(generate, chat, transcribe, batch) and the server (chat input_audio, the speech-to-text
endpoints with the official client), each giving generate()'s answer on the same clip."""

import base64
import json
import shutil
from pathlib import Path

import httpx
import pytest
from PIL import Image
from typer.testing import CliRunner

import phi3v_mlx
from phi3v_mlx import cli
from phi3v_mlx.generate import chat_prompt
from phi3v_mlx.speech import speech_prompt, stream_transcription
from tests.helpers import serving
from tests.test_server import client

FIXTURES = Path(__file__).parent / "fixtures" / "phi4mm"
CHECKPOINT = FIXTURES / "models" / "tiny-phi4mm"
STAND_IN = Path(__file__).parent / "fixtures" / "text" / "models" / "tiny-phi4-mini"
AUDIO = FIXTURES / "audio"
SHORT, LONGER, SLOW = (AUDIO / f"{n}.wav" for n in ("speech16k_1p0s", "speech16k_3p3s",
                                                     "speech8k_2p1s"))  # fmt: skip
IMAGE = FIXTURES / "images" / "d_tiny.png"
QUESTION = "What is said?"


def speech_checkpoint(folder: Path) -> Path:
    """The tiny Phi-4-multimodal checkpoint with the stand-in Phi-4 tokenizer (its image and
    audio placeholders added), weights linked, in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for entry in CHECKPOINT.iterdir():
        (folder / entry.name).symlink_to(entry.resolve())
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(STAND_IN / name, folder / name)
    tokenizer = json.loads((STAND_IN / "tokenizer.json").read_text())
    for token_id, content in ((200010, "<|endoftext10|>"), (200011, "<|endoftext11|>")):
        tokenizer["model"]["vocab"][content] = token_id
        tokenizer["added_tokens"].append(
            {
                "id": token_id,
                "content": content,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }  # fmt: skip
        )
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    return folder


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return speech_checkpoint(tmp_path_factory.mktemp("speech") / "tiny-phi4mm")


@pytest.fixture(scope="module")
def loaded(checkpoint):
    return phi3v_mlx.load(checkpoint, dtype="float32")


def answer(loaded, text, images=(), audios=(), max_tokens=6):
    model, processor = loaded
    prompt = chat_prompt(processor, text, len(images), audios=len(audios))
    media = {"audios": list(audios)} if audios else {}
    return phi3v_mlx.generate(model, processor, prompt, images=list(images) or None,
                              max_tokens=max_tokens, **media)  # fmt: skip


def test_audio_goes_after_the_images_and_before_the_text_unless_tagged(loaded):
    _, processor = loaded
    prompt = chat_prompt(processor, QUESTION, images=1, audios=1)
    assert prompt == f"<|user|><|image_1|><|audio_1|>{QUESTION}<|end|><|assistant|>"
    tagged = chat_prompt(processor, f"Hear <|audio_1|> then {QUESTION}", images=1, audios=1)
    assert tagged.startswith("<|user|><|image_1|>Hear <|audio_1|> then")
    assert answer(loaded, QUESTION, audios=[SHORT]).prompt_tokens == 7 + 13  # 13 audio slots


def test_session_turns_equal_generate_and_a_follow_up_encodes_nothing(loaded):
    model, processor = loaded
    session = phi3v_mlx.ChatSession(model, processor)
    first = session.send(QUESTION, audios=SHORT, max_tokens=6)
    assert first.tokens == answer(loaded, QUESTION, audios=[SHORT]).tokens
    encoder = type(model.audio_embed)
    calls, original = [], encoder.__call__
    encoder.__call__ = lambda self, *a, **k: calls.append(1) or original(self, *a, **k)
    try:
        follow = session.send("And then?", max_tokens=6)
    finally:
        encoder.__call__ = original
    assert calls == [] and follow.prompt_tokens < 10  # only the new turn was read
    messages = [
        {"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": QUESTION}]},
        {"role": "assistant", "content": first.text},
        {"role": "user", "content": "And then?"},
    ]
    expected = phi3v_mlx.generate(model, processor, processor.apply_chat_template(messages),
                                  audios=[SHORT], max_tokens=6)  # fmt: skip
    assert follow.tokens == expected.tokens
    # an image and a second clip later: the vision adapter and projection, both clips together
    image = Image.open(IMAGE)
    third = session.send("Compare.", images=[image], audios=LONGER, max_tokens=6)
    messages += [
        {"role": "assistant", "content": follow.text},
        {"role": "user", "content": [{"type": "image"}, {"type": "audio"},
                                     {"type": "text", "text": "Compare."}]},
    ]  # fmt: skip
    expected = phi3v_mlx.generate(model, processor, processor.apply_chat_template(messages),
                                  images=[image], audios=[SHORT, LONGER], max_tokens=6)  # fmt: skip
    assert third.tokens == expected.tokens


def test_batch_rows_with_audio_equal_generate(loaded):
    model, processor = loaded
    image = Image.open(IMAGE)
    rows = [
        {"prompt": chat_prompt(processor, QUESTION, audios=1), "audios": [SLOW], "max_tokens": 6},
        {"prompt": chat_prompt(processor, QUESTION, 1, audios=2), "images": [image],
         "audios": [SHORT, LONGER], "max_tokens": 6},
        {"prompt": chat_prompt(processor, QUESTION), "max_tokens": 6},
    ]  # fmt: skip
    results = phi3v_mlx.batch_generate(model, processor, rows)
    assert results[0].tokens == answer(loaded, QUESTION, audios=[SLOW]).tokens
    assert results[1].tokens == answer(loaded, QUESTION, [image], [SHORT, LONGER]).tokens
    assert results[2].tokens == answer(loaded, QUESTION).tokens


def run_cli(args, input=None):
    result = CliRunner().invoke(cli.app, args, input=input)
    return result


def test_cli_generate_chat_and_transcribe_answer_as_the_api(loaded, checkpoint, tmp_path):
    model, processor = loaded
    base = ["--model", str(checkpoint), "--dtype", "float32", "--max-tokens", "6"]
    out = run_cli(["generate", *base, "--image", str(IMAGE), "--audio", str(SHORT), "-p",
                   QUESTION])  # fmt: skip
    assert out.exit_code == 0, out.output
    expected = answer(loaded, QUESTION, [Image.open(IMAGE)], [SHORT])
    assert out.stdout.strip() == expected.text.strip()
    chat = run_cli(["chat", *base], input=f"/audio {SHORT}\n{QUESTION}\n")
    assert chat.exit_code == 0, chat.output
    assert answer(loaded, QUESTION, audios=[SHORT]).text.strip() in chat.stdout
    target = tmp_path / "out.jsonl"
    done = run_cli(["transcribe", str(SLOW), str(SHORT), *base, "-o", str(target)])
    assert done.exit_code == 0, done.output
    rows = [json.loads(line) for line in target.read_text().splitlines()]
    for row, clip in zip(rows, (SLOW, SHORT), strict=True):
        prompt = speech_prompt(processor)
        expected = phi3v_mlx.generate(model, processor, prompt, audios=[clip], max_tokens=6)
        assert row["text"] == expected.text and row["file"] == str(clip)
    assert rows[0]["text"] in done.stdout


def test_cli_bad_audio_is_one_line(checkpoint, tmp_path):
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    junk = tmp_path / "junk.mp3"
    junk.write_bytes(b"not audio at all" * 10)
    base = ["--model", str(checkpoint), "-p", "x"]
    for path, message in ((empty, "is an empty file"), (junk, "cannot decode audio file"),
                          (tmp_path / "none.wav", "no such audio file")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            cli.app(["generate", *base, "--audio", str(path)], standalone_mode=False)
    with pytest.raises(ValueError, match="unknown speech language"):
        cli.app(["transcribe", str(SHORT), "--model", str(checkpoint), "--translate-to", "xx"],
                standalone_mode=False)  # fmt: skip


def test_phi3v_batch_reads_audio_manifests_and_folders(loaded, checkpoint, tmp_path):
    folder = tmp_path / "clips"
    folder.mkdir()
    shutil.copy(SHORT, folder / "a.wav")
    shutil.copy(SLOW, folder / "b.wav")
    manifest = tmp_path / "rows.jsonl"
    manifest.write_text(json.dumps({"id": "both", "image": str(IMAGE), "audios": [str(LONGER)],
                                    "prompt": QUESTION}) + "\n")  # fmt: skip
    target = tmp_path / "out.jsonl"
    out = run_cli(["batch", str(folder), str(manifest), "-p", "Transcribe the audio to text.",
                   "-o", str(target), "--model", str(checkpoint), "--dtype", "float32",
                   "--max-tokens", "6"])  # fmt: skip
    assert out.exit_code == 0, out.output
    rows = {row["id"]: row for row in map(json.loads, target.read_text().splitlines())}
    instruction = "Transcribe the audio to text."
    assert rows[str(folder / "a.wav")]["text"] == answer(loaded, instruction, audios=[SHORT]).text
    assert rows[str(folder / "b.wav")]["text"] == answer(loaded, instruction, audios=[SLOW]).text
    assert rows["both"]["text"] == answer(loaded, QUESTION, [Image.open(IMAGE)], [LONGER]).text


def test_transcription_streams_what_generate_returns(loaded):
    model, processor = loaded
    heard = []
    chunks = list(stream_transcription(model, processor, LONGER, "fr", max_tokens=6,
                                       listening=lambda d, t: heard.append((d, t))))  # fmt: skip
    prompt = speech_prompt(processor, "French")
    assert "Translate the audio to French." in prompt
    expected = phi3v_mlx.generate(model, processor, prompt, audios=[LONGER], max_tokens=6)
    assert "".join(c.text for c in chunks) == expected.text
    assert heard and heard[-1][0] == heard[-1][1]


@pytest.fixture(scope="module")
def server(loaded):
    with serving(*loaded, max_tokens=6) as base:  # transcriptions end where the CLI's do
        yield base


def test_server_transcribes_as_phi3v_transcribe(loaded, server, checkpoint):
    model, processor = loaded
    with SLOW.open("rb") as file:
        text = client(server).audio.transcriptions.create(model="tiny", file=file).text
    expected = "".join(c.text for c in stream_transcription(model, processor, SLOW, max_tokens=6))
    assert text == expected
    reply = httpx.post(f"{server}/v1/audio/translations", timeout=120,
                       data={"model": "tiny", "response_format": "text"},
                       files={"file": ("b.wav", SLOW.read_bytes(), "audio/wav")})  # fmt: skip
    english = stream_transcription(model, processor, SLOW, "en", max_tokens=6)
    assert reply.text == "".join(c.text for c in english)


MODALITIES = {"text": ((), ()), "image": ((IMAGE,), ()), "audio": ((), (SHORT,)),
              "image and audio": ((IMAGE,), (SHORT,))}  # fmt: skip


@pytest.mark.parametrize("modality", MODALITIES)
def test_each_modality_answers_as_generate_through_the_cli_and_the_server(
    loaded, checkpoint, server, modality
):
    images, audios = MODALITIES[modality]
    expected = answer(loaded, QUESTION, [Image.open(i) for i in images], audios).text
    media = [*(f for i in images for f in ("--image", str(i))),
             *(f for a in audios for f in ("--audio", str(a)))]  # fmt: skip
    out = run_cli(["generate", "--model", str(checkpoint), "--dtype", "float32",
                   "--max-tokens", "6", *media, "-p", QUESTION])  # fmt: skip
    assert out.exit_code == 0, out.output
    assert out.stdout.strip() == expected.strip()

    def encoded(path):
        return base64.b64encode(path.read_bytes()).decode()

    parts = [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + encoded(i)}}
             for i in images]  # fmt: skip
    parts += [{"type": "input_audio", "input_audio": {"data": encoded(a), "format": "wav"}}
              for a in audios]  # fmt: skip
    parts.append({"type": "text", "text": QUESTION})
    reply = client(server).chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": parts}], max_tokens=6, temperature=0
    )
    assert reply.choices[0].message.content == expected


def test_server_chat_input_audio_equals_generate_with_the_image_first(loaded, server):
    encoded = base64.b64encode(SHORT.read_bytes()).decode()
    image = "data:image/png;base64," + base64.b64encode(IMAGE.read_bytes()).decode()
    content = [
        {"type": "image_url", "image_url": {"url": image}},
        {"type": "input_audio", "input_audio": {"data": encoded, "format": "wav"}},
        {"type": "text", "text": QUESTION},
    ]
    reply = client(server).chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": content}], max_tokens=6,
        temperature=0,
    )  # fmt: skip
    expected = answer(loaded, QUESTION, [Image.open(IMAGE)], [SHORT])
    assert reply.choices[0].message.content == expected.text


def test_server_reuses_a_prompt_cache_only_under_its_adapter(loaded, server):
    model, processor = loaded
    long = "Please listen carefully to every word of the following recording, " * 3
    text = [{"role": "user", "content": long}]
    ask = {"model": "tiny", "max_tokens": 6, "temperature": 0}
    first = client(server).chat.completions.create(messages=text, **ask)
    encoded = base64.b64encode(SHORT.read_bytes()).decode()
    clip = {"type": "input_audio", "input_audio": {"data": encoded, "format": "wav"}}
    question = {"role": "user", "content": [clip, {"type": "text", "text": QUESTION}]}
    conversation = [*text, {"role": "assistant", "content": first.choices[0].message.content},
                    question]  # fmt: skip
    heard = client(server).chat.completions.create(messages=conversation, **ask)
    assert heard.usage.prompt_tokens_details.cached_tokens == 0  # read without the adapter
    rendered = processor.apply_chat_template([*conversation[:2], {"role": "user", "content": [
        {"type": "audio"}, {"type": "text", "text": QUESTION}]}])  # fmt: skip
    expected = phi3v_mlx.generate(model, processor, rendered, audios=[SHORT], max_tokens=6)
    assert heard.choices[0].message.content == expected.text
    conversation += [{"role": "assistant", "content": heard.choices[0].message.content},
                     {"role": "user", "content": "And then?"}]  # fmt: skip
    again = client(server).chat.completions.create(messages=conversation, **ask)
    assert again.usage.prompt_tokens_details.cached_tokens > 40  # the speech prefix, reused


def test_server_refusals_are_4xx_in_the_openai_shape(server, tmp_path):
    files = {"file": ("a.wav", SHORT.read_bytes(), "audio/wav")}
    url = f"{server}/v1/audio/transcriptions"
    for data, status, words in (
        ({"model": "tiny", "response_format": "srt"}, 400, "timestamps"),
        ({"model": "tiny", "response_format": "verbose_json"}, 400, "timestamps"),
        ({"model": "tiny", "language": "tlh"}, 400, "unknown speech language"),
    ):
        reply = httpx.post(url, data=data, files=files, timeout=60)
        assert reply.status_code == status and words in reply.json()["error"]["message"]
    reply = httpx.post(url, data={"model": "tiny"}, files={"file": ("a.mp3", b"junk" * 50)})
    assert reply.status_code == 400 and "cannot decode" in reply.json()["error"]["message"]
    reply = httpx.post(url, data={"model": "tiny"})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "file"
    bad = {"type": "input_audio", "input_audio": {"data": "%%%", "format": "wav"}}
    body = {"model": "tiny", "max_tokens": 4, "messages": [{"role": "user", "content": [bad]}]}
    reply = httpx.post(f"{server}/v1/chat/completions", json=body)
    assert reply.status_code == 400 and "base64" in reply.json()["error"]["message"]


def test_server_audio_limits(loaded):
    files = {"file": ("a.wav", LONGER.read_bytes(), "audio/wav")}
    with serving(*loaded, max_audio_seconds=2.0) as base:
        reply = httpx.post(f"{base}/v1/audio/transcriptions", data={"model": "t"}, files=files)
        assert reply.status_code == 400 and "over this server's limit" in reply.text
    with serving(*loaded, max_audio_in_flight=2.0) as base:
        reply = httpx.post(f"{base}/v1/audio/transcriptions", data={"model": "t"}, files=files)
        assert reply.status_code == 429 and reply.json()["error"]["code"] == "audio_busy"
    with serving(*loaded, max_body_mb=0.05) as base:
        reply = httpx.post(f"{base}/v1/audio/transcriptions", data={"model": "t"}, files=files)
        assert reply.status_code == 413
