"""Batched throughput on a full-size checkpoint, phi3v-mlx against mlx-vlm's batch_generate.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 \\
        python benchmarks/bench_batch.py --checkpoint benchmarks/checkpoints/phi35v-f32

Eight pictures of one size (mlx-vlm batches only images of the same shape), one question each,
decoded at batch sizes 1, 4 and 8: phi3v-mlx's engine with that many rows; mlx-vlm's
batch_generate called on groups of that many (it decodes a call's prompts together). Each
(side, batch size) runs in a fresh process, the sides alternating. Aggregate decode speed is each
library's own count: generated tokens over the time spent decoding (reading prompts excluded);
images per minute cover the whole run.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from common import alternate, combine, metric_table, run_worker, write_report

QUESTION = "Describe this image."
SIZES = (1, 4, 8)


def make_images(folder: Path, count: int = 8) -> list[Path]:
    """Deterministic 1280x960 pictures, each different: gradients, discs and bars."""
    from PIL import Image

    paths = []
    y, x = np.mgrid[0:960, 0:1280]
    for i in range(count):
        rgb = np.stack([(x * (i + 1)) % 256, (y * (8 - i)) % 256, ((x + y) // (i + 2)) % 256], -1)
        rgb[(x - 160 * i - 200) ** 2 + (y - 480) ** 2 < 150**2] = (40 * i, 200 - 20 * i, 90)
        rgb[100 + 50 * i : 160 + 50 * i, 300:900] = (20, 30 * i, 200)
        paths.append(folder / f"picture-{i}.png")
        Image.fromarray(rgb.astype(np.uint8)).save(paths[-1])
    return paths


def ours(checkpoint: Path, images: list[Path], batch: int, max_tokens: int, crops: int) -> dict:
    import mlx.core as mx

    import phi3v_mlx
    from phi3v_mlx.batch import BatchEngine, Request
    from phi3v_mlx.generate import SamplingOptions

    model, processor = phi3v_mlx.load(checkpoint)
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    )
    engine = BatchEngine(model, processor, batch_size=batch)
    mx.reset_peak_memory()
    started = time.perf_counter()
    for image in images:
        engine.submit(Request(prompt, [image], crops), SamplingOptions(max_tokens=max_tokens))
    tokens = 0
    while engine.pending():
        for event in engine.step():
            if event.result is not None:
                tokens += event.result.generation_tokens
    seconds = time.perf_counter() - started
    engine.close()
    return {
        "decode_tps": engine.stats.decode_tps,
        "images_per_min": 60 * len(images) / seconds,
        "peak_gb": mx.get_peak_memory() / 1e9,
        "tokens": tokens,
        "seconds": seconds,
    }


def theirs(checkpoint: Path, images: list[Path], batch: int, max_tokens: int, crops: int) -> dict:
    """mlx-vlm's batch_generate on groups of ``batch`` images; where it refuses a group (its
    phi3_v processor takes one image per call), the group's images go one call each."""
    import mlx.core as mx
    import mlx_vlm
    from mlx_vlm.generate.ar import batch_generate

    model, processor = mlx_vlm.load(str(checkpoint))
    processor.image_processor.num_crops = crops
    mx.reset_peak_memory()
    started = time.perf_counter()
    decode_tokens, decode_seconds, fallback = 0, 0.0, None

    def call(group: list[Path]) -> None:
        nonlocal decode_tokens, decode_seconds
        response = batch_generate(
            model,
            processor,
            images=[str(p) for p in group],
            prompts=[QUESTION] * len(group),
            max_tokens=max_tokens,
        )
        decode_tokens += response.stats.generation_tokens
        decode_seconds += response.stats.generation_time

    for first in range(0, len(images), batch):
        group = images[first : first + batch]
        try:
            call(group)
        except ValueError as e:
            if len(group) == 1:
                raise
            fallback = str(e).splitlines()[0]
            for image in group:
                call([image])
    seconds = time.perf_counter() - started
    return {
        "decode_tps": decode_tokens / decode_seconds,
        "images_per_min": 60 * len(images) / seconds,
        "peak_gb": mx.get_peak_memory() / 1e9,
        "tokens": decode_tokens,
        "seconds": seconds,
        "fallback": fallback,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--num-crops", type=int, default=1)
    parser.add_argument("--worker", nargs=2, metavar=("SIDE", "BATCH"), help=argparse.SUPPRESS)
    parser.add_argument("--images", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        side, batch = args.worker[0], int(args.worker[1])
        run = ours if side == "phi3v_mlx" else theirs
        images = sorted(args.images.glob("*.png"))
        print(json.dumps(run(args.checkpoint, images, batch, args.max_tokens, args.num_crops)))
        return
    folder = Path(tempfile.mkdtemp())
    make_images(folder)
    sides = ["phi3v_mlx", "mlx_vlm"]
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    flat = {side: {} for side in sides}
    last_theirs = {}
    for batch in SIZES:
        per_side = {side: [] for side in sides}
        for r, side in alternate(sides, args.runs):
            print(f"batch {batch}, run {r + 1}: {side} ...", flush=True)
            result = run_worker(
                Path(__file__),
                [
                    "--worker",
                    side,
                    str(batch),
                    "--checkpoint",
                    str(args.checkpoint),
                    "--images",
                    str(folder),
                    "--max-tokens",
                    str(args.max_tokens),
                    "--num-crops",
                    str(args.num_crops),
                ],
            )
            print(f"  {result}", flush=True)
            per_side[side].append(result)
        last_theirs[batch] = per_side["mlx_vlm"][-1]
        for side in sides:
            for run_index, result in enumerate(per_side[side]):
                row = flat[side].setdefault(run_index, {})
                row[f"batch_decode_tps_b{batch}"] = result["decode_tps"]
                row[f"batch_images_per_min_b{batch}"] = result["images_per_min"]
                row[f"batch_peak_gb_b{batch}"] = result["peak_gb"]
    runs = {side: list(flat[side].values()) for side in sides}
    fallbacks = {b: r.get("fallback") for b, r in last_theirs.items()}
    names = [f"batch_{m}_b{b}" for b in SIZES for m in ("decode_tps", "images_per_min", "peak_gb")]
    metrics = combine(runs, names)
    print(metric_table(metrics, sides))
    speedup = (
        metrics["batch_decode_tps_b8"]["phi3v_mlx"] / metrics["batch_decode_tps_b1"]["phi3v_mlx"]
    )
    path = write_report(
        "batch",
        {
            "checkpoint": str(args.checkpoint),
            "runs": args.runs,
            "images": 8,
            "image_size": [1280, 960],
            "num_crops": args.num_crops,
            "max_tokens": args.max_tokens,
            "metrics": metrics,
            "phi3v_mlx_b8_over_b1": speedup,
            "mlx_vlm_batch_fallback": {f"b{b}": why for b, why in fallbacks.items() if why},
        },
    )
    print(f"b8 / b1 (phi3v-mlx): {speedup:.2f}; wrote {path}")


if __name__ == "__main__":
    main()
