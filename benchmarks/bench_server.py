"""phi3v serve under load: 8 concurrent clients against the same requests one after another.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 \\
        python benchmarks/bench_server.py --checkpoint benchmarks/checkpoints/phi35v-f32
    ... python benchmarks/bench_server.py --scenario text --checkpoint /work/ckpt/phi35v-8l-f32

The server runs in this process on a free loopback port, a fresh one for each mode (so no mode
finds the other's prompts in the prompt cache); every request is streamed at temperature 0.

- ``image``: each client sends one picture and a question (prompt cache off).
- ``text``: each client asks a text question, then a follow-up that repeats the first turn and
  its answer (prompt cache on: the second turn reads only what is new).

Aggregate speed is all completion tokens over the wall time from the first request sent to the
last answer finished; time to first token is per request, from its sending.
"""

from __future__ import annotations

import argparse
import base64
import os
import socket
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench_batch import make_images
from common import write_report

QUESTION = "Describe this image."
CLIENTS = 8
TOPICS = ["a bakery", "a bicycle shop", "a library", "a rowing club", "a print shop",
          "a tea house", "a repair cafe", "a bus depot"]  # fmt: skip
FOLLOW_UP = "Which of those figures would you check first, and why?"


@dataclass
class Answer:
    """One streamed request: time to its first content token, its tokens and text, and the
    prompt tokens the server read and found cached."""

    ttft: float | None
    tokens: int
    text: str
    prompt_tokens: int
    cached_tokens: int


def ask(client: Any, messages: list[dict], max_tokens: int, extra: dict) -> Answer:
    """Send one streamed chat completion and collect its answer."""
    started = time.perf_counter()
    first, parts, usage = None, [], None
    stream = client.chat.completions.create(
        model="bench",
        stream=True,
        stream_options={"include_usage": True},
        temperature=0,
        max_tokens=max_tokens,
        extra_body=extra,
        messages=messages,
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            if first is None:
                first = time.perf_counter() - started
            parts.append(chunk.choices[0].delta.content)
        if chunk.usage:
            usage = chunk.usage
    details = usage.prompt_tokens_details
    return Answer(first, usage.completion_tokens, "".join(parts), usage.prompt_tokens,
                  details.cached_tokens if details else 0)  # fmt: skip


def text_question(i: int, words: int) -> str:
    """Client ``i``'s first question: a few figures about a small business, about ``words``
    words long, each client's different from the first words on."""
    lines = [f"I keep the books of {TOPICS[i % len(TOPICS)]}. Here is last month, week by week."]
    week = 0
    while sum(len(line.split()) for line in lines) < words:
        week += 1
        lines.append(f"Week {week}: takings {1200 + 37 * week * (i + 1)} euros, costs "
                     f"{800 + 19 * week * (i + 3)} euros, {3 + (week * (i + 2)) % 5} staff, "
                     f"{40 + (week * 7 * (i + 1)) % 60} customers a day.")  # fmt: skip
    lines.append("What do these figures say about how the month went?")
    return "\n".join(lines)


def image_client(url: str, max_tokens: int, crops: int) -> Callable[[Any], list[Answer]]:
    """One picture and a question."""
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": QUESTION}]

    def run(client: Any) -> list[Answer]:
        messages = [{"role": "user", "content": content}]
        return [ask(client, messages, max_tokens, {"num_crops": crops})]

    return run


def text_client(question: str, max_tokens: int) -> Callable[[Any], list[Answer]]:
    """A question, then a follow-up that sends the first turn and its answer back."""

    def run(client: Any) -> list[Answer]:
        messages = [{"role": "user", "content": question}]
        first = ask(client, messages, max_tokens, {})
        messages += [
            {"role": "assistant", "content": first.text},
            {"role": "user", "content": FOLLOW_UP},
        ]
        return [first, ask(client, messages, max_tokens, {})]

    return run


@contextmanager
def serving(model: Any, processor: Any, settings: Any) -> Iterator[Any]:
    """A fresh server on a free loopback port, and an OpenAI client for it."""
    import openai
    import uvicorn

    from phi3v_mlx.server import create_app

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    app = create_app(model, processor, settings)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.1)
    try:
        yield openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="x", timeout=7200, max_retries=0
        )
    finally:
        server.should_exit = True
        thread.join(timeout=60)


def percentile(values: list[float], q: int) -> float:
    """The ``q``-th percentile (of 100), between the closest ranks."""
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--scenario", choices=["image", "text"], default="image")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--num-crops", type=int, default=1)
    parser.add_argument("--prompt-words", type=int, default=150, help="text: first question")
    parser.add_argument("--prompt-cache-gb", type=float, default=2.0, help="text scenario")
    parser.add_argument("--note", default="", help="what was cut, recorded in the results")
    args = parser.parse_args()
    import mlx.core as mx

    import phi3v_mlx
    from phi3v_mlx.server import ServerSettings

    if args.scenario == "image":
        images = make_images(Path(tempfile.mkdtemp()), CLIENTS)
        urls = ["data:image/png;base64," + base64.b64encode(p.read_bytes()).decode()
                for p in images]  # fmt: skip
        clients = [image_client(url, args.max_tokens, args.num_crops) for url in urls]
        cache_gb = 0.0
    else:
        clients = [text_client(text_question(i, args.prompt_words), args.max_tokens)
                   for i in range(CLIENTS)]  # fmt: skip
        cache_gb = args.prompt_cache_gb
    model, processor = phi3v_mlx.load(args.checkpoint)
    settings = ServerSettings(model_name="bench", batch_size=CLIENTS, prompt_cache_gb=cache_gb)
    results = {}
    for mode in ("sequential", "concurrent"):
        print(f"{mode} ...", flush=True)
        with serving(model, processor, settings) as client:
            started = time.perf_counter()
            if mode == "sequential":
                conversations = [run(client) for run in clients]
            else:
                with ThreadPoolExecutor(max_workers=len(clients)) as pool:
                    conversations = list(pool.map(lambda run: run(client), clients))
            seconds = time.perf_counter() - started
        turns = [[c[t] for c in conversations] for t in range(len(conversations[0]))]
        results[mode] = {
            "tps": sum(a.tokens for c in conversations for a in c) / seconds,
            "seconds": seconds,
            "turns": [
                {
                    "ttft_s": [a.ttft for a in turn],
                    "completion_tokens": [a.tokens for a in turn],
                    "prompt_tokens": [a.prompt_tokens for a in turn],
                    "cached_tokens": [a.cached_tokens for a in turn],
                }
                for turn in turns
            ],
        }
        print(f"  {results[mode]}", flush=True)
    concurrent, sequential = results["concurrent"], results["sequential"]
    ratio = concurrent["tps"] / sequential["tps"]
    ttfts = [t for turn in concurrent["turns"] for t in turn["ttft_s"] if t is not None]
    metrics = {
        "server_tps_concurrent8": {"phi3v_mlx": concurrent["tps"], "ratio": ratio},
        "server_tps_sequential8": {"phi3v_mlx": sequential["tps"], "ratio": None},
        "server_ttft_p50_s": {"phi3v_mlx": statistics.median(ttfts), "ratio": None},
        "server_ttft_p95_s": {"phi3v_mlx": percentile(ttfts, 95), "ratio": None},
    }
    path = write_report(
        "server" if args.scenario == "image" else "server-text",
        {
            "checkpoint": str(args.checkpoint),
            "scenario": args.scenario,
            "note": args.note,
            "clients": CLIENTS,
            "turns": len(concurrent["turns"]),
            "num_crops": args.num_crops if args.scenario == "image" else None,
            "prompt_words": args.prompt_words if args.scenario == "text" else None,
            "prompt_cache_gb": cache_gb,
            "max_tokens": args.max_tokens,
            "peak_gb": mx.get_peak_memory() / 1e9,
            "load_average_at_end": os.getloadavg(),
            "metrics": metrics,
            "concurrent_over_sequential": ratio,
            "sequential": sequential,
            "concurrent": concurrent,
        },
    )
    for name, value in metrics.items():
        print(f"{name}: {value['phi3v_mlx']:.3f}")
    print(f"concurrent / sequential: {ratio:.2f}; wrote {path}")


if __name__ == "__main__":
    main()
