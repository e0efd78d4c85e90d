"""phi3v serve under load on a full-size checkpoint: 8 concurrent clients against the same 8
requests one after another.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 \\
        python benchmarks/bench_server.py --checkpoint benchmarks/checkpoints/phi35v-f32

The server runs in this process on a free loopback port; each request is one picture and a
question, streamed. Aggregate speed is all completion tokens over the wall time from the first
request sent to the last answer finished; time to first token is per request, from its sending.
"""

from __future__ import annotations

import argparse
import base64
import socket
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench_batch import make_images
from common import write_report

QUESTION = "Describe this image."


def ask(client, url: str, max_tokens: int, crops: int) -> tuple[float, int]:
    """Time to the first content token and the completion tokens of one streamed request."""
    started = time.perf_counter()
    first, tokens = None, 0
    stream = client.chat.completions.create(
        model="bench",
        stream=True,
        stream_options={"include_usage": True},
        temperature=0,
        max_tokens=max_tokens,
        extra_body={"num_crops": crops},
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": url}},
                    {"type": "text", "text": QUESTION},
                ],
            }
        ],
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content and first is None:
            first = time.perf_counter() - started
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return first, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--num-crops", type=int, default=1)
    args = parser.parse_args()
    import openai
    import uvicorn

    import phi3v_mlx
    from phi3v_mlx.server import ServerSettings, create_app

    images = make_images(Path(tempfile.mkdtemp()))
    urls = ["data:image/png;base64," + base64.b64encode(p.read_bytes()).decode() for p in images]
    model, processor = phi3v_mlx.load(args.checkpoint)
    app = create_app(
        model, processor, ServerSettings(model_name="bench", batch_size=8, prompt_cache_gb=0)
    )
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.1)
    client = openai.OpenAI(
        base_url=f"http://127.0.0.1:{port}/v1", api_key="x", timeout=7200, max_retries=0
    )
    results = {}
    for mode in ("sequential", "concurrent"):
        print(f"{mode} ...", flush=True)
        started = time.perf_counter()
        if mode == "sequential":
            answers = [ask(client, url, args.max_tokens, args.num_crops) for url in urls]
        else:
            with ThreadPoolExecutor(max_workers=len(urls)) as pool:
                answers = list(
                    pool.map(lambda u: ask(client, u, args.max_tokens, args.num_crops), urls)
                )
        seconds = time.perf_counter() - started
        ttfts = sorted(first for first, _ in answers)
        results[mode] = {
            "tps": sum(tokens for _, tokens in answers) / seconds,
            "seconds": seconds,
            "ttft": ttfts,
        }
        print(f"  {results[mode]}", flush=True)
    server.should_exit = True
    thread.join(timeout=60)
    concurrent = results["concurrent"]
    p95 = statistics.quantiles(concurrent["ttft"], n=20)[-1]
    metrics = {
        "server_tps_concurrent8": {"phi3v_mlx": concurrent["tps"], "ratio": None},
        "server_tps_sequential8": {"phi3v_mlx": results["sequential"]["tps"], "ratio": None},
        "server_ttft_p50_s": {"phi3v_mlx": statistics.median(concurrent["ttft"]), "ratio": None},
        "server_ttft_p95_s": {"phi3v_mlx": p95, "ratio": None},
    }
    ratio = concurrent["tps"] / results["sequential"]["tps"]
    path = write_report(
        "server",
        {
            "checkpoint": str(args.checkpoint),
            "requests": len(urls),
            "num_crops": args.num_crops,
            "max_tokens": args.max_tokens,
            "metrics": metrics,
            "concurrent_over_sequential": ratio,
            "sequential_ttft_s": results["sequential"]["ttft"],
            "concurrent_ttft_s": concurrent["ttft"],
        },
    )
    for name, value in metrics.items():
        print(f"{name}: {value['phi3v_mlx']:.3f}")
    print(f"concurrent / sequential: {ratio:.2f}; wrote {path}")


if __name__ == "__main__":
    main()
