"""A running answer while image prompts arrive: the server's engine reading prompts in pieces
with the decoding steps, against reading every admitted prompt whole first.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 \\
        python benchmarks/bench_streaming.py --checkpoint /work/ckpt/phi35v-8l-f32

One text answer is decoding when seven picture prompts (1280x960, one question each) arrive at
once. ``pieces`` is the engine as ``phi3v serve`` runs it (``interleave``: each step one row's
vision run or one prompt chunk, and a decoding step of every row, in the chunk's forward where
the decoder can); ``whole`` reads every
admitted prompt, images and all, before decoding again (the engine before chunked prefill). Each
side runs in a fresh process, the sides alternating. Reported: the longest gap between two
tokens of the running answer until the last picture's first token, time to first token of the
pictures (p50, p95, from their arrival), and all tokens over the wall time; temperature 0, so
both sides must give the same tokens (checked).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from bench_batch import make_images
from common import alternate, combine, metric_table, print_result, run_worker, write_report

TALK = "Tell me a long story about a lighthouse keeper."
QUESTION = "Describe this image."
METRICS = ("longest_gap_s", "ttft_p50_s", "ttft_p95_s", "aggregate_tps")


def worker(args: argparse.Namespace) -> dict:
    """One side: the running answer, then the pictures at once, every event timed."""
    import phi3v_mlx
    from phi3v_mlx.generate import SamplingOptions

    model, processor = phi3v_mlx.load(args.checkpoint)
    images = sorted(Path(args.images).glob("*.png"))[: args.pictures]
    engine = phi3v_mlx.BatchEngine(model, processor, batch_size=args.pictures + 1,
                                   interleave=args.side == "pieces")  # fmt: skip
    talk = processor.apply_chat_template([{"role": "user", "content": TALK}])
    look = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    )
    running = engine.submit(talk, SamplingOptions(max_tokens=args.running_tokens))
    while not engine.step():
        pass
    arrived = time.perf_counter()
    rows = {engine.submit({"prompt": look, "images": [str(p)], "num_crops": args.num_crops},
                          SamplingOptions(max_tokens=args.max_tokens)): p.name
            for p in images}  # fmt: skip
    first, tokens, ticks, count = {}, {}, [arrived], 0
    while len(tokens) < len(rows):
        events = engine.step()
        now = time.perf_counter()
        for event in events:
            if event.error is not None:
                raise SystemExit(f"error: {event.error}")
            if event.row == running and len(first) < len(rows):
                ticks.append(now)
            if event.row in rows and event.row not in first:
                first[event.row] = now - arrived
            if event.result is not None and event.row in rows:
                tokens[event.row] = event.result.tokens
                count += len(event.result.tokens)
    wall = time.perf_counter() - arrived
    ranks = sorted(first.values())
    gaps = [b - a for a, b in zip(ticks, ticks[1:], strict=False)]
    engine.close()
    return {
        "longest_gap_s": max(gaps) if gaps else wall,
        "ttft_p50_s": statistics.median(ranks),
        "ttft_p95_s": ranks[min(len(ranks) - 1, round(0.95 * (len(ranks) - 1)))],
        "aggregate_tps": count / wall,
        "tokens": {rows[row]: tokens[row] for row in rows},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--pictures", type=int, default=7)
    parser.add_argument("--num-crops", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=8, help="of each picture's answer")
    parser.add_argument("--running-tokens", type=int, default=4000)
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--side", choices=["pieces", "whole"])
    parser.add_argument("--images")
    args = parser.parse_args()
    if args.worker:
        print_result(worker(args))
        return
    runs = {"pieces": [], "whole": []}
    with tempfile.TemporaryDirectory() as folder:
        make_images(Path(folder), args.pictures)
        for _, side in alternate(list(runs), args.runs):
            common = ["--checkpoint", args.checkpoint, "--pictures", str(args.pictures),
                      "--num-crops", str(args.num_crops), "--max-tokens", str(args.max_tokens),
                      "--running-tokens", str(args.running_tokens), "--images", folder]  # fmt: skip
            result = run_worker(Path(__file__), ["--worker", "--side", side, *common])
            print(side, {k: round(result[k], 3) for k in METRICS}, flush=True)
            runs[side].append(result)
    same = all(r["tokens"] == runs["whole"][0]["tokens"] for r in runs["pieces"] + runs["whole"])
    metrics = combine({s: [{k: r[k] for k in METRICS} for r in v] for s, v in runs.items()},
                      METRICS)  # fmt: skip
    print(metric_table(metrics, list(runs)))
    path = write_report("streaming", {
        "checkpoint": args.checkpoint, "runs": args.runs, "pictures": args.pictures,
        "image_size": [1280, 960], "num_crops": args.num_crops, "max_tokens": args.max_tokens,
        "same_tokens": same, "metrics": metrics,
    })  # fmt: skip
    print(f"wrote {path}; same tokens on both sides: {same}")


if __name__ == "__main__":
    main()
