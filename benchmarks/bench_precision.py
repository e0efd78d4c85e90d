"""What precision costs on MLX's CPU backend: a 4-bit checkpoint with its stored 16-bit scales
against ``--dtype float32``, and the dense model in bfloat16 and float32.

    python benchmarks/make_checkpoint.py --decoder-layers 4 --vision-layers 2 \\
        --out benchmarks/checkpoints/phi35v-4layers-bf16
    phi3v convert --hf-path benchmarks/checkpoints/phi35v-4layers-bf16 \\
        --mlx-path benchmarks/checkpoints/phi35v-4layers-q4 -q --no-check
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 \\
        python benchmarks/bench_precision.py --dense benchmarks/checkpoints/phi35v-4layers-bf16 \\
        --quantized benchmarks/checkpoints/phi35v-4layers-q4

A 4-decoder-layer checkpoint (full width) keeps the slow configurations measurable: a 64-token
prompt, then 8 tokens, each configuration in a fresh process with a time limit.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from common import print_result, write_report

CONFIGS = {
    "q4_stored": ("quantized", None),
    "q4_float32": ("quantized", "float32"),
    "dense_bfloat16": ("dense", None),
    "dense_float32": ("dense", "float32"),
}


def worker(checkpoint: Path, dtype: str | None, prompt_tokens: int, max_tokens: int) -> dict:
    import phi3v_mlx

    model, processor = phi3v_mlx.load(checkpoint, dtype=dtype)
    ids = processor.tokenize("<|user|>\n" + "word " * 400, [])[:prompt_tokens]
    started = time.perf_counter()
    times = []
    for _ in phi3v_mlx.stream_generate(model, processor, ids, max_tokens=max_tokens):
        times.append(time.perf_counter() - started)
    return {
        "prefill_tps": len(ids) / times[0],
        "decode_tps": (len(times) - 1) / (times[-1] - times[0]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dense", type=Path)
    parser.add_argument("--quantized", type=Path)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=1200)
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        dtype = None if args.worker[1] == "stored" else args.worker[1]
        print_result(worker(Path(args.worker[0]), dtype, args.prompt_tokens, args.max_tokens))
        return
    metrics = {}
    for name, (kind, dtype) in CONFIGS.items():
        checkpoint = args.dense if kind == "dense" else args.quantized
        print(f"{name} ...", flush=True)
        command = [
            sys.executable,
            __file__,
            "--worker",
            str(checkpoint),
            dtype or "stored",
            "--prompt-tokens",
            str(args.prompt_tokens),
            "--max-tokens",
            str(args.max_tokens),
        ]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
            result = json.loads(done.stdout.strip().splitlines()[-1])
        except subprocess.TimeoutExpired:
            result = {"prefill_tps": None, "decode_tps": None}
        print(f"  {result}", flush=True)
        for key, value in result.items():
            metrics[f"{name}_{key}"] = {"phi3v_mlx": value, "ratio": None}
    path = write_report(
        "precision",
        {
            "dense": str(args.dense),
            "quantized": str(args.quantized),
            "prompt_tokens": args.prompt_tokens,
            "max_tokens": args.max_tokens,
            "timeout_s": args.timeout,
            "metrics": metrics,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
