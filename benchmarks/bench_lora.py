"""One LoRA training step on a full-size checkpoint (float32): seconds and peak memory, with and
without gradient checkpointing.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 \\
        python benchmarks/bench_lora.py --checkpoint benchmarks/checkpoints/phi35v-f32

The example is one picture at num_crops 4 and a short answer (``--text`` for a text-only
256-token example instead). Each configuration runs in a fresh process: a first step to warm
up, then the timed one; the adapter is mlx-lm's default shape on every decoder layer.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from bench_batch import make_images
from common import print_result, run_worker, write_report


def worker(checkpoint: Path, checkpointing: bool, text: bool) -> dict:
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim

    import phi3v_mlx
    from phi3v_mlx import adapters, lora

    model, processor = phi3v_mlx.load(checkpoint)
    folder = Path(tempfile.mkdtemp())
    if text:
        words = " ".join(["lighthouse"] * 250)
        row = {
            "messages": [
                {"role": "user", "content": f"Repeat: {words}"},
                {"role": "assistant", "content": "Lighthouse, lighthouse."},
            ]
        }
    else:
        make_images(folder, 1)
        row = {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image"},
                        {"type": "text", "text": "What is in this picture?"},
                    ],
                },
                {"role": "assistant", "content": "Coloured stripes, a disc and a blue bar."},
            ],
            "images": ["picture-0.png"],
        }
    (folder / "train.jsonl").write_text(json.dumps(row) + "\n")
    examples, images = lora.load_dataset(folder / "train.jsonl", processor, 4, 4096)
    adapters.add_adapters(model, adapters.AdapterSettings())
    features = lora.encode_dataset_images(model, processor, images)
    batch = lora._batch(model, examples, features)
    optimizer = optim.Adam(learning_rate=1e-5, bias_correction=True)
    step = nn.value_and_grad(model, lambda m, b: lora.loss(m, b, checkpointing))
    seconds = []
    mx.reset_peak_memory()
    for _ in range(2):
        started = time.perf_counter()
        (value, _), grads = step(model, batch)
        optimizer.update(model, grads)
        mx.eval(model.trainable_parameters(), optimizer.state, value)
        seconds.append(time.perf_counter() - started)
    return {
        "step_s": seconds[-1],
        "peak_gb": mx.get_peak_memory() / 1e9,
        "tokens": len(examples[0].ids),
        "loss": float(value.item()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--text", action="store_true")
    parser.add_argument("--worker", choices=["plain", "checkpointed"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print_result(worker(args.checkpoint, args.worker == "checkpointed", args.text))
        return
    results = {}
    for mode in ("checkpointed", "plain"):
        print(f"{mode} ...", flush=True)
        extra = ["--text"] if args.text else []
        try:
            results[mode] = run_worker(
                Path(__file__), ["--worker", mode, "--checkpoint", str(args.checkpoint), *extra]
            )
        except SystemExit as e:  # a step that does not fit in memory is killed
            print(f"  {mode} did not finish: {str(e).splitlines()[0]}", flush=True)
            continue
        print(f"  {results[mode]}", flush=True)
    if not results:
        raise SystemExit("error: no configuration finished")
    metrics = {
        f"lora_step_s_{m}": {"phi3v_mlx": r["step_s"], "ratio": None} for m, r in results.items()
    }
    metrics.update(
        {
            f"lora_peak_gb_{m}": {"phi3v_mlx": r["peak_gb"], "ratio": None}
            for m, r in results.items()
        }
    )
    path = write_report(
        "lora",
        {
            "checkpoint": str(args.checkpoint),
            "example": "text, 256 tokens" if args.text else "one 1280x960 picture at num_crops 4",
            "tokens": next(iter(results.values()))["tokens"],
            "did_not_finish": [m for m in ("checkpointed", "plain") if m not in results],
            "metrics": metrics,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
