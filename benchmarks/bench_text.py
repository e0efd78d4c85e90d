"""Phi-3.5-mini (full size, float32) side by side with mlx-lm: load, prefill and decode.

    python benchmarks/make_checkpoint.py --text --dtype float32 \\
        --out benchmarks/checkpoints/phi35-mini-f32
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 \\
        python benchmarks/bench_text.py --checkpoint benchmarks/checkpoints/phi35-mini-f32

The same 1,000 token ids go to both: prefill speed is the prompt over the time to the first token,
decode speed the tokens after the first over the time they took. Below 4,096 tokens phi3v-mlx
uses the short rope factors, as the reference does, and mlx-lm the long ones: the same work.
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

from common import alternate, combine, metric_table, print_result, run_worker, write_report

NAMES = ["load_s", "load_peak_gb", "prefill_tps", "decode_tps"]


def prompt_ids(checkpoint: Path, length: int) -> list[int]:
    import phi3v_mlx

    processor = phi3v_mlx.loader.load_processor(checkpoint)
    words = " ".join(["lighthouse"] * length)
    text = processor.apply_chat_template([{"role": "user", "content": f"Summarize: {words}"}])
    return processor.tokenize(text, [])[:length]


def timed(stream) -> tuple[float, list[float]]:
    start = time.perf_counter()
    times = [time.perf_counter() - start for _ in stream]
    return times[0], times


def worker(side: str, checkpoint: Path, ids: list[int], max_tokens: int) -> dict:
    started = time.perf_counter()
    if side == "phi3v_mlx":
        import phi3v_mlx

        model, processor = phi3v_mlx.load(checkpoint)

        def stream():
            return phi3v_mlx.stream_generate(model, processor, ids, max_tokens=max_tokens)
    else:
        import mlx_lm

        model, tokenizer = mlx_lm.load(str(checkpoint))

        def stream():
            return mlx_lm.stream_generate(model, tokenizer, ids, max_tokens=max_tokens)

    out = {
        "load_s": time.perf_counter() - started,
        "load_peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
    }
    timed(stream())  # warm-up
    first, times = timed(stream())
    out["prefill_tps"] = len(ids) / first
    out["decode_tps"] = (len(times) - 1) / (times[-1] - times[0])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=1000)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    ids = prompt_ids(args.checkpoint, args.prompt_tokens)
    if args.worker:
        print_result(worker(args.worker, args.checkpoint, ids, args.max_tokens))
        return
    sides = ["phi3v_mlx", "mlx_lm"]
    runs = {side: [] for side in sides}
    for r, side in alternate(sides, args.runs):
        print(f"run {r + 1}: {side} ...", flush=True)
        runs[side].append(
            run_worker(
                Path(__file__),
                [
                    "--worker",
                    side,
                    "--checkpoint",
                    str(args.checkpoint),
                    "--prompt-tokens",
                    str(args.prompt_tokens),
                    "--max-tokens",
                    str(args.max_tokens),
                ],
            )
        )
        print(f"  {runs[side][-1]}", flush=True)
    metrics = combine(runs, NAMES)
    print(metric_table(metrics, sides))
    path = write_report(
        "text",
        {
            "checkpoint": str(args.checkpoint),
            "runs": args.runs,
            "prompt_tokens": len(ids),
            "max_tokens": args.max_tokens,
            "metrics": metrics,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
