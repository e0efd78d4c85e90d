"""Batched throughput on a full-size checkpoint, phi3v-mlx against mlx-vlm's batch_generate.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 \\
        python benchmarks/bench_batch.py --checkpoint benchmarks/checkpoints/phi35v-f32

Eight pictures of one size (mlx-vlm batches only images of the same shape), one question each,
decoded at batch sizes 1, 4 and 8: phi3v-mlx's engine with that many rows; mlx-vlm's
batch_generate called on groups of that many (it decodes a call's prompts together). Each
(side, batch size) runs in a fresh process, the sides alternating. Aggregate decode speed is each
library's own count: generated tokens over the time spent decoding (reading prompts excluded);
images per minute cover the whole run.

Next to the measured batch-8 speed-up stands the one the matrix products allow on this machine:
the decoder's products (one layer's, times its layer count, and the head's) timed on 8 rows
against 1 row, in float32, in one process.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from common import alternate, combine, metric_table, run_worker, write_report

QUESTION = "Describe this image."
SIZES = (1, 4, 8)
# Phi-3.5-vision's decoder products, weights stored [out, in]: qkv_proj, o_proj, gate_up_proj,
# down_proj, then the head
LAYER_SHAPES = {"qkv": (9216, 3072), "o": (3072, 3072), "gate_up": (16384, 3072),
                "down": (3072, 8192)}  # fmt: skip
HEAD_SHAPE = (32064, 3072)


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


def matmul_ratio(layers: int, rows: int = 8, repeats: int = 7) -> dict:
    """The decode speed-up the matrix products allow: ``rows`` rows of every decoder product
    against one row, as ``rows * t(1) / t(rows)``, per product and for a whole step (the layer
    products ``layers`` times, the head once); times are medians over ``repeats``."""
    import mlx.core as mx

    def seconds(x: mx.array, w: mx.array) -> float:
        started = time.perf_counter()
        mx.eval(x @ w.T)
        return time.perf_counter() - started

    shapes = {**LAYER_SHAPES, "head": HEAD_SHAPE}
    counts = {name: layers for name in LAYER_SHAPES} | {"head": 1}
    medians = {1: {}, rows: {}}
    for name, shape in shapes.items():
        w = 0.02 * mx.random.normal(shape, key=mx.random.key(0))
        xs = {n: mx.random.normal((n, shape[1]), key=mx.random.key(n)) for n in medians}
        mx.eval(w, *xs.values())
        times = {n: [] for n in medians}
        for r in range(repeats + 2):  # the first two warm up; 1 and 8 rows take turns first
            for n in medians if r % 2 == 0 else reversed(medians):
                t = seconds(xs[n], w)
                if r >= 2:
                    times[n].append(t)
        for n in medians:
            medians[n][name] = float(np.median(times[n]))
        del w
    step = {n: sum(counts[k] * t for k, t in medians[n].items()) for n in medians}
    return {
        "rows": rows,
        "decoder_layers": layers,
        "repeats": repeats,
        "seconds_1_row": medians[1],
        f"seconds_{rows}_rows": medians[rows],
        "ratio_per_product": {k: rows * medians[1][k] / medians[rows][k] for k in shapes},
        "step_seconds_1_row": step[1],
        f"step_seconds_{rows}_rows": step[rows],
        "ratio_step": rows * step[1] / step[rows],
    }


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
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument(
        "--pictures", type=int, default=8, help="pictures per batch size (at least the size)"
    )
    parser.add_argument("--matmul-repeats", type=int, default=7)
    parser.add_argument("--note", default="", help="what was cut, recorded in the results")
    parser.add_argument("--worker", nargs=2, metavar=("SIDE", "BATCH"), help=argparse.SUPPRESS)
    parser.add_argument("--images", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        side, batch = args.worker[0], int(args.worker[1])
        run = ours if side == "phi3v_mlx" else theirs
        images = sorted(args.images.glob("*.png"))[: max(batch, args.pictures)]
        print(json.dumps(run(args.checkpoint, images, batch, args.max_tokens, args.num_crops)))
        return
    folder = Path(tempfile.mkdtemp())
    make_images(folder)
    sides = ["phi3v_mlx", "mlx_vlm"]
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    flat = {side: {} for side in sides}
    last_theirs = {}
    for batch in args.sizes:
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
                    "--pictures",
                    str(args.pictures),
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
    names = [
        f"batch_{m}_b{b}" for b in args.sizes for m in ("decode_tps", "images_per_min", "peak_gb")
    ]
    metrics = combine(runs, names)
    print(metric_table(metrics, sides))
    first, last = min(args.sizes), max(args.sizes)
    speedup = {
        side: metrics[f"batch_decode_tps_b{last}"][side]
        / metrics[f"batch_decode_tps_b{first}"][side]
        for side in sides
    }
    layers = json.loads((args.checkpoint / "config.json").read_text())["num_hidden_layers"]
    print("matrix products, 1 row against 8 ...", flush=True)
    allowed = matmul_ratio(layers, rows=last, repeats=args.matmul_repeats)
    step = {f"b{b}": b / metrics[f"batch_decode_tps_b{b}"]["phi3v_mlx"] for b in args.sizes}
    path = write_report(
        "batch",
        {
            "checkpoint": str(args.checkpoint),
            "note": args.note,
            "runs": args.runs,
            "images": {f"b{b}": max(b, args.pictures) for b in args.sizes},
            "image_size": [1280, 960],
            "num_crops": args.num_crops,
            "max_tokens": args.max_tokens,
            "decoder_layers": layers,
            "metrics": metrics,
            f"phi3v_mlx_b{last}_over_b{first}": speedup["phi3v_mlx"],
            f"mlx_vlm_b{last}_over_b{first}": speedup["mlx_vlm"],
            f"matmul_b{last}_over_b{first}_allowed": allowed["ratio_step"],
            "phi3v_mlx_decode_step_s": step,
            "load_average_at_end": os.getloadavg(),
            "matmul": allowed,
            "mlx_vlm_batch_fallback": {f"b{b}": why for b, why in fallbacks.items() if why},
        },
    )
    print(
        f"decode step (phi3v-mlx): b{first} {step[f'b{first}']:.3f} s, b{last} "
        f"{step[f'b{last}']:.3f} s; its matrix products {allowed['step_seconds_1_row']:.3f} s "
        f"and {allowed[f'step_seconds_{last}_rows']:.3f} s"
    )
    print(
        f"b{last} / b{first} decode: phi3v-mlx {speedup['phi3v_mlx']:.2f}, "
        f"mlx-vlm {speedup['mlx_vlm']:.2f}; the matrix products allow "
        f"{allowed['ratio_step']:.2f}; wrote {path}"
    )


if __name__ == "__main__":
    main()
