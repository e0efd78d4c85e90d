"""The OpenAI-compatible server, driven live on 127.0.0.1 with the official openai client."""

import base64
import http.server
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest

import phi3v_mlx
from tests.conftest import IMAGES, load_variant
from tests.helpers import serving

QUESTION = "Describe the picture."


@contextmanager
def live_server(variant="tiny-phi35v", **settings):
    """A server for a fixture variant on a free loopback port in this process, stopped after
    the block."""
    with serving(*load_variant(variant), **settings) as base:
        yield base


def client(base, key="unused"):
    return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=120)


def data_url(name):
    return (
        "data:image/png;base64," + base64.b64encode((IMAGES / f"{name}.png").read_bytes()).decode()
    )


def image_message(url, text=QUESTION):
    return {
        "role": "user",
        "content": [
            {"type": "image_url", "image_url": {"url": url}},
            {"type": "text", "text": text},
        ],
    }


def reference(messages, images, max_tokens, num_crops=4, variant="tiny-phi35v"):
    """generate() on the same conversation, images as this package's parts."""
    model, processor = load_variant(variant)
    converted = []
    for message in messages:
        content = message["content"]
        if not isinstance(content, str):
            content = [
                {"type": "image"} if part["type"] == "image_url" else part for part in content
            ]
        converted.append({"role": message["role"], "content": content})
    prompt = processor.apply_chat_template(converted)
    return phi3v_mlx.generate(
        model, processor, prompt, images or None, num_crops, max_tokens=max_tokens
    )


def error_of(response):
    body = response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


@pytest.fixture(scope="module")
def server():
    with live_server() as base:
        yield base


def test_answers_equal_generate_streamed_or_not(server):
    messages = [image_message(data_url("b_small"))]
    want = reference(messages, [IMAGES / "b_small.png"], 8)
    api = client(server)
    answer = api.chat.completions.create(
        model="tiny", messages=messages, max_tokens=8, temperature=0, extra_body={"num_crops": 4}
    )
    choice = answer.choices[0]
    assert choice.message.content == want.text and choice.finish_reason == "length"
    assert answer.usage.prompt_tokens == want.prompt_tokens
    assert answer.usage.completion_tokens == 8
    assert answer.usage.total_tokens == want.prompt_tokens + 8
    stream = api.chat.completions.create(
        model="tiny",
        messages=messages,
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"num_crops": 4},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 700  # same prompt again
    assert [m.id for m in api.models.list().data] == ["tiny"]
    assert httpx.get(f"{server}/health").json()["status"] == "ok"


def test_stop_strings_end_the_answer_and_are_not_shown(server):
    messages = [{"role": "user", "content": "Say something long."}]
    want = reference(messages, [], 20)
    stop = want.text[6:9]
    assert stop and stop in want.text[6:]
    expected = want.text[: want.text.index(stop)]
    api = client(server)
    answer = api.chat.completions.create(
        model="tiny", messages=messages, max_tokens=20, temperature=0, stop=[stop, "never seen"]
    )
    assert answer.choices[0].message.content == expected
    assert answer.choices[0].finish_reason == "stop"
    stream = api.chat.completions.create(
        model="tiny", messages=messages, max_tokens=20, temperature=0, stop=stop, stream=True
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_a_second_turn_reuses_the_cache_and_another_image_does_not(server):
    api = client(server)
    first = [image_message(data_url("d_tall"), "What is this?")]
    answer = api.chat.completions.create(
        model="tiny", messages=first, max_tokens=6, temperature=0, extra_body={"num_crops": 4}
    )
    follow = [
        *first,
        {"role": "assistant", "content": answer.choices[0].message.content},
        {"role": "user", "content": "And the colours?"},
    ]
    second = api.chat.completions.create(
        model="tiny", messages=follow, max_tokens=6, temperature=0, extra_body={"num_crops": 4}
    )
    want = reference(follow, [IMAGES / "d_tall.png"], 6)
    assert second.choices[0].message.content == want.text
    # The first turn's prompt, image included, is not read again.
    assert second.usage.prompt_tokens_details.cached_tokens >= answer.usage.prompt_tokens
    other = [image_message(data_url("c_wide"), "What is this?")]  # same text, other image
    third = api.chat.completions.create(
        model="tiny", messages=other, max_tokens=6, temperature=0, extra_body={"num_crops": 4}
    )
    assert third.choices[0].message.content == reference(other, [IMAGES / "c_wide.png"], 6).text
    assert third.usage.prompt_tokens_details.cached_tokens < 10  # stops before the image


def test_eight_concurrent_clients_are_each_answered_right(server):
    names = ["b_small", "c_wide", "d_tall", "e_first"] * 2
    jobs = [[image_message(data_url(name), f"Question {i}?")] for i, name in enumerate(names)]
    jobs[3] = [{"role": "user", "content": "A question without images."}]
    want = [
        reference(m, [IMAGES / f"{n}.png"] if i != 3 else [], 6).text
        for i, (m, n) in enumerate(zip(jobs, names, strict=True))
    ]
    api = client(server)

    def ask(messages):
        answer = api.chat.completions.create(
            model="tiny",
            messages=messages,
            max_tokens=6,
            temperature=0,
            extra_body={"num_crops": 4},
        )
        return answer.choices[0].message.content

    with ThreadPoolExecutor(max_workers=8) as pool:
        got = list(pool.map(ask, jobs))
    assert got == want


def test_bad_requests_are_one_line_4xx(server):
    post = lambda body, **kw: httpx.post(f"{server}/v1/chat/completions", timeout=60, **kw)  # noqa: E731
    hello = [{"role": "user", "content": "Hi"}]
    cases = [
        ({"messages": hello, "n": 2}, "n"),
        ({"messages": hello, "max_tokens": 10**6}, "max_tokens"),
        ({"messages": [image_message("data:image/png;base64,%%%not base64")]}, "messages"),
        ({"messages": [image_message("data:image/png;base64,anVuaw==")]}, "messages"),
        ({"messages": [image_message(data_url("b_small"))] * 9}, "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages"),
        ({"messages": hello, "tools": [{"type": "function"}]}, "tools"),
        ({"messages": hello, "temperature": "hot"}, "temperature"),
        ({"messages": [{"role": "user", "content": "word " * 40000}]}, "messages"),
        ({"messages": [image_message("/etc/passwd")]}, "messages"),
        ({"messages": [image_message("https://example.com/x.png")]}, "messages"),
    ]
    for body, param in cases:
        response = post(None, json=body)
        assert response.status_code == 400, (body, response.text)
        error = error_of(response)
        assert error["param"] == param and "\n" not in error["message"], error
        if param == "tools":  # refused with the reason
            assert "does not parse tool calls" in error["message"], error
    assert error_of(post(None, content=b"{not json"))["message"] == "the body is not valid JSON"


def test_media_dir_allows_inside_and_refuses_escapes(tmp_path):
    media = tmp_path / "media"
    media.mkdir()
    (media / "pic.png").write_bytes((IMAGES / "b_small.png").read_bytes())
    (tmp_path / "secret.png").write_bytes((IMAGES / "c_wide.png").read_bytes())
    (media / "link.png").symlink_to(tmp_path / "secret.png")
    want = reference([image_message("x")], [IMAGES / "b_small.png"], 5).text
    with live_server(media_dir=media) as base:
        api = client(base)
        for url in ("pic.png", str(media / "pic.png"), f"file://{media / 'pic.png'}"):
            answer = api.chat.completions.create(
                model="tiny",
                messages=[image_message(url)],
                max_tokens=5,
                temperature=0,
                extra_body={"num_crops": 4},
            )
            assert answer.choices[0].message.content == want
        for url in (
            "../secret.png",
            str(tmp_path / "secret.png"),
            "link.png",
            f"file://{tmp_path / 'secret.png'}",
        ):
            response = httpx.post(
                f"{base}/v1/chat/completions", timeout=60, json={"messages": [image_message(url)]}
            )
            assert response.status_code == 403, url
            assert "outside the media folder" in error_of(response)["message"]


@contextmanager
def image_host(tmp_path):
    """A loopback HTTP server with an image, a redirect and a large file."""
    (tmp_path / "pic.png").write_bytes((IMAGES / "b_small.png").read_bytes())
    (tmp_path / "big.png").write_bytes(b"\0" * 3_000_000)

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(tmp_path), **kwargs)

        def do_GET(self):
            if self.path == "/moved.png":
                self.send_response(302)
                self.send_header("Location", "/pic.png")
                self.end_headers()
                return
            super().do_GET()

        def log_message(self, *args):
            pass

    host = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=host.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{host.server_address[1]}"
    finally:
        host.shutdown()


def test_remote_images_only_when_allowed(tmp_path, server):
    with image_host(tmp_path) as images:
        refused = httpx.post(
            f"{server}/v1/chat/completions",
            timeout=60,
            json={"messages": [image_message(f"{images}/pic.png")]},
        )
        assert refused.status_code == 400
        assert "--allow-remote-images" in error_of(refused)["message"]
        with live_server(allow_remote_images=True, remote_image_mb=1) as base:
            api = client(base)
            answer = api.chat.completions.create(
                model="tiny",
                messages=[image_message(f"{images}/pic.png")],
                max_tokens=5,
                temperature=0,
                extra_body={"num_crops": 4},
            )
            want = reference([image_message("x")], [IMAGES / "b_small.png"], 5).text
            assert answer.choices[0].message.content == want
            for path, needle in (
                ("moved.png", "redirects"),
                ("big.png", "larger than 1 MB"),
                ("missing.png", "answered 404"),
            ):
                response = httpx.post(
                    f"{base}/v1/chat/completions",
                    timeout=60,
                    json={"messages": [image_message(f"{images}/{path}")]},
                )
                assert response.status_code == 400 and needle in error_of(response)["message"]


def test_api_key_body_size_and_cors():
    hello = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    with live_server(api_key="sesame", max_body_mb=0.5) as base:
        url = f"{base}/v1/chat/completions"
        assert httpx.post(url, json=hello).status_code == 401
        assert (
            error_of(httpx.post(url, json=hello, headers={"Authorization": "Bearer no"}))["code"]
            == "invalid_api_key"
        )
        answer = client(base, key="sesame").chat.completions.create(model="tiny", **hello)
        assert answer.usage.completion_tokens == 2
        big = {"messages": [image_message("data:image/png;base64," + "A" * 600_000)]}
        response = httpx.post(url, json=big, headers={"Authorization": "Bearer sesame"})
        assert response.status_code == 413 and error_of(response)["code"] == "body_too_large"
        assert (
            "access-control-allow-origin"
            not in httpx.options(
                url,
                headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"},
            ).headers
        )
        assert httpx.get(f"{base}/health").status_code == 200  # no key needed
    with live_server(cors_origins=["http://app.example"]) as base:
        preflight = httpx.options(
            f"{base}/v1/chat/completions",
            headers={"Origin": "http://app.example", "Access-Control-Request-Method": "POST"},
        )
        assert preflight.headers["access-control-allow-origin"] == "http://app.example"


def _stream_until(base, body, events):
    """Open a streamed request, read ``events`` SSE lines, then drop the connection."""
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        seen = 0
        for line in response.iter_lines():
            if line.startswith("data: "):
                seen += 1
                if seen == events:
                    break


def _wait_idle(base, seconds=30):
    deadline = time.time() + seconds
    while httpx.get(f"{base}/health").json()["in_flight"]:
        assert time.time() < deadline, "a request was never released"
        time.sleep(0.05)


def test_full_queue_is_503_and_disconnects_free_their_slot():
    long = {
        "messages": [{"role": "user", "content": "Go on forever."}],
        "max_tokens": 3000,
        "temperature": 0,
        "stream": True,
    }
    with live_server(batch_size=1, queue_size=0) as base:
        url = f"{base}/v1/chat/completions"
        with httpx.stream("POST", url, json=long, timeout=60) as response:
            lines = response.iter_lines()
            next(line for line in lines if line.startswith("data: "))
            busy = httpx.post(url, json={"messages": [{"role": "user", "content": "Hi"}]})
            assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
            assert error_of(busy)["code"] == "queue_full"
        _wait_idle(base)  # leaving the stream cancelled the generation
        _stream_until(base, long, 3)
        _wait_idle(base)
        answer = client(base).chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=3, temperature=0
        )
        assert (
            answer.choices[0].message.content
            == reference([{"role": "user", "content": "Hi"}], [], 3).text
        )


def test_text_models_are_served_without_images(caplog):
    caplog.set_level(logging.INFO, logger="phi3v_mlx.server")
    messages = [{"role": "user", "content": "Why is the sky blue?"}]
    with live_server("tiny-phi35-moe") as base:
        answer = client(base).chat.completions.create(
            model="tiny", messages=messages, max_tokens=5, temperature=0
        )
        response = httpx.post(
            f"{base}/v1/chat/completions",
            timeout=60,
            json={"messages": [image_message(data_url("b_small"))]},
        )
    assert (
        answer.choices[0].message.content
        == reference(messages, [], 5, variant="tiny-phi35-moe").text
    )
    assert response.status_code == 400 and "text model" in error_of(response)["message"]
    lines = [r.getMessage() for r in caplog.records if "/v1/chat/completions" in r.getMessage()]
    assert len(lines) == 2 and lines[0].startswith("POST /v1/chat/completions 200 prompt=")
    assert lines[1].startswith("POST /v1/chat/completions 400")


def test_serve_command_binds_loopback_and_warns_otherwise(monkeypatch):
    from typer.testing import CliRunner

    from phi3v_mlx import cli, server

    calls = []
    monkeypatch.setattr(
        server,
        "serve",
        lambda model, processor, settings, host, port, group: calls.append((host, port, settings)),
    )
    tiny = str(Path(__file__).parent / "fixtures" / "models" / "tiny-phi35v")
    quiet = CliRunner().invoke(cli.app, ["serve", "--model", tiny, "--port", "9999"])
    assert quiet.exit_code == 0, quiet.output
    assert calls[0][:2] == ("127.0.0.1", 9999) and "warning" not in quiet.stderr
    assert calls[0][2].api_key is None and calls[0][2].cors_origins == ()
    loud = CliRunner().invoke(cli.app, ["serve", "--model", tiny, "--host", "0.0.0.0"])
    assert "warning: listening on 0.0.0.0" in loud.stderr and "no --api-key" in loud.stderr
    bad = CliRunner().invoke(cli.app, ["serve", "--model", tiny, "--media-dir", "/nonexistent"])
    assert bad.exit_code != 0 and "not a folder" in str(bad.exception)
    assert os.environ.get("PHI3V_NEVER_SET") is None


def test_an_engine_fault_is_a_500_and_the_server_goes_on(monkeypatch):
    from phi3v_mlx.batch import BatchEngine

    original, calls = BatchEngine.step, []

    def failing_once(self):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("device lost")
        return original(self)

    monkeypatch.setattr(BatchEngine, "step", failing_once)
    hello = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "temperature": 0}
    with live_server() as base:
        failed = httpx.post(f"{base}/v1/chat/completions", json=hello, timeout=60)
        assert failed.status_code == 500 and error_of(failed)["code"] == "generation_failed"
        assert "device lost" in error_of(failed)["message"]
        again = httpx.post(f"{base}/v1/chat/completions", json=hello, timeout=60)
    assert again.status_code == 200
    want = reference([{"role": "user", "content": "Hi"}], [], 3).text
    assert again.json()["choices"][0]["message"]["content"] == want


def test_null_fields_are_unset_and_no_op_fields_are_accepted(server):
    post = lambda body: httpx.post(f"{server}/v1/chat/completions", json=body, timeout=60)  # noqa: E731
    hello = [{"role": "user", "content": "Hi"}]
    nulls = dict.fromkeys(
        ["max_completion_tokens", "temperature", "top_p", "stop", "n", "stream", "stream_options",
         "num_crops", "tools", "tool_choice", "functions", "function_call", "logprobs",
         "top_logprobs", "response_format", "presence_penalty", "frequency_penalty", "user"]
    )  # fmt: skip
    answer = post({"messages": hello, "max_tokens": 3, "seed": -1, **nulls})
    assert answer.status_code == 200, answer.text
    assert answer.json()["usage"]["completion_tokens"] == 3
    no_ops = {"response_format": {"type": "text"}, "tool_choice": "none", "tools": [],
              "logprobs": False, "top_logprobs": 0, "parallel_tool_calls": False}  # fmt: skip
    assert post({"messages": hello, "max_tokens": 2, **no_ops}).status_code == 200
    for name, value in (("top_logprobs", 2), ("response_format", {"type": "json_object"}),
                        ("tool_choice", "auto"), ("logprobs", True)):  # fmt: skip
        refused = post({"messages": hello, "max_tokens": 2, name: value})
        assert refused.status_code == 400 and error_of(refused)["param"] == name, name


def test_errors_outside_the_handlers_have_the_openai_shape(server):
    missing = httpx.get(f"{server}/v1/nothing")
    assert missing.status_code == 404 and error_of(missing)["type"] == "not_found_error"
    wrong = httpx.get(f"{server}/v1/chat/completions")
    assert wrong.status_code == 405 and error_of(wrong)["message"]


def test_a_body_over_the_limit_is_answered_413_the_client_can_read():
    import urllib.error
    import urllib.request

    body = b'{"messages": [], "padding": "' + b"x" * 4_000_000 + b'"}'
    with live_server(max_body_mb=0.1) as base:
        request = urllib.request.Request(f"{base}/v1/chat/completions", data=body,
                                         headers={"Content-Type": "application/json"})  # fmt: skip
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=60)
        assert refused.value.code == 413
        assert "larger than 0.1 MB" in refused.value.read().decode()
        with pytest.raises(openai.APIStatusError) as official:
            client(base).chat.completions.create(
                model="tiny", max_tokens=2,
                messages=[{"role": "user", "content": "word " * 30_000}],
            )  # fmt: skip
        assert official.value.status_code == 413


def test_a_non_streaming_client_that_hangs_up_is_cancelled(monkeypatch):
    from phi3v_mlx.server.engine import EngineThread

    cancelled = []
    original = EngineThread.cancel
    monkeypatch.setattr(EngineThread, "cancel",
                        lambda self, job: (cancelled.append(job), original(self, job)))  # fmt: skip
    long = {"messages": [{"role": "user", "content": "Go on forever."}], "max_tokens": 3000,
            "temperature": 0}  # fmt: skip
    with live_server(batch_size=1, queue_size=0) as base:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{base}/v1/chat/completions", json=long, timeout=1.5)
        _wait_idle(base)
        assert len(cancelled) == 1  # the generation was stopped, not run to its end
        answer = httpx.post(f"{base}/v1/chat/completions", timeout=60,
                            json={**long, "max_tokens": 2})  # fmt: skip
        assert answer.status_code == 200


def test_models_are_listed_by_id_not_by_path(monkeypatch):
    from typer.testing import CliRunner

    from phi3v_mlx import cli, server

    calls = []
    monkeypatch.setattr(server, "serve", lambda model, processor, settings, host, port, group:
                        calls.append(settings))  # fmt: skip
    tiny = str(Path(__file__).parent / "fixtures" / "models" / "tiny-phi35v")
    assert CliRunner().invoke(cli.app, ["serve", "--model", tiny]).exit_code == 0
    assert calls[0].model_name == "tiny-phi35v"


def test_the_prompt_store_copies_only_a_useful_shared_prefix():
    import mlx.core as mx

    from phi3v_mlx.server.store import PromptStore

    model, _ = load_variant("tiny-phi35v")
    ids = list(range(100, 400))
    cache = model.make_cache()
    model.hidden(model.merge(mx.array([ids]), []), cache)
    store = PromptStore(10**9)
    store.keep_prompt(ids, cache)
    copied, length = store.copy_longest_prefix([*ids[:120], 7, 8, 9])
    assert length == 120 and copied.offset == 120
    assert all(layer.keys.shape[2] == 120 for layer in copied)  # not the whole entry
    model.hidden(model.merge(mx.array([[7, 8, 9]]), []), copied)
    kept, again = store.copy_longest_prefix(ids)
    assert again == 300 and mx.array_equal(kept[0].keys[..., :300, :], cache[0].keys[..., :300, :])
    assert store.copy_longest_prefix([*ids[:4], 1, 2]) == (None, 0)  # too short to be worth it


def test_stored_image_features_hold_only_their_own_bytes():
    import gc

    import mlx.core as mx

    from phi3v_mlx.server.store import PromptStore

    store = PromptStore(10**9)
    gc.collect()
    before = mx.get_active_memory()
    run = mx.random.normal((4000, 1000))  # one vision run's output, 16 MB
    mx.eval(run)
    first, _ = mx.split(run, [1000])
    store.put("key", first)
    del run, first, _
    gc.collect()
    held = mx.get_active_memory() - before
    assert store.nbytes == 4_000_000 and held < 2 * store.nbytes, held
