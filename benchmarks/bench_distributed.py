"""One model split across ranks: memory per rank, the all-sum floor between ranks, and where the
vision tower should run. Each command prints one JSON line per rank.

    python benchmarks/make_checkpoint.py --text --decoder-layers 8 --out /tmp/mid-text
    python benchmarks/bench_distributed.py memory --model /tmp/mid-text
    mlx.launch --backend ring -n 2 -- python benchmarks/bench_distributed.py memory \\
        --model /tmp/mid-text
    mlx.launch --backend ring -n 2 -- python benchmarks/bench_distributed.py allsum
    python benchmarks/make_checkpoint.py --decoder-layers 2 --out /tmp/mid-vision
    mlx.launch --backend ring -n 2 -- python benchmarks/bench_distributed.py vision \\
        --model /tmp/mid-vision --dtype float32 --image tests/fixtures/images/p_rgb_640x480.png

``memory``: MLX's peak memory and the process's peak resident size after loading and after
generating (caches included). ``allsum``: microseconds per all-sum of one decode step's hidden
state (each evaluated alone, and 64 chained in one graph as a decode step of 32 layers has
them), and of a 512-token prefill chunk. ``vision``: the tower's weights, the time it takes for
one image, and the time rank 0 would need to hand the features to the other ranks instead.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

import phi3v_mlx
from phi3v_mlx.distributed import launch_group

PROMPT = "Summarize: " + " ".join(["lighthouse"] * 40)


def _gb(n: float) -> float:
    return round(n / 1e9, 3)


def _rss_gb() -> float:
    return _gb(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def _report(group, **values) -> None:
    rank = 0 if group is None else group.rank()
    ranks = 1 if group is None else group.size()
    print(json.dumps({"rank": rank, "ranks": ranks, **values}), flush=True)


def memory(args: argparse.Namespace) -> None:
    group = launch_group()
    start = time.perf_counter()
    model, processor = phi3v_mlx.load(args.model, args.dtype, group=group)
    load_s = time.perf_counter() - start
    weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    loaded = (_gb(mx.get_peak_memory()), _rss_gb())
    prompt = processor.apply_chat_template([{"role": "user", "content": PROMPT}])
    result = phi3v_mlx.generate(model, processor, prompt, max_tokens=args.tokens)
    _report(
        group, weights_gb=_gb(weights), load_s=round(load_s, 2), load_peak_gb=loaded[0],
        load_rss_gb=loaded[1], prompt_tokens=result.prompt_tokens,
        generated=result.generation_tokens, peak_gb=_gb(mx.get_peak_memory()),
        rss_gb=_rss_gb(), decode_tps=round(result.generation_tps, 2),
    )  # fmt: skip


def _per_call_us(x: mx.array, group, repeats: int, chain: int = 1) -> float:
    """The median time of one all-sum of ``x``, each evaluated alone or ``chain`` in a row in
    one graph (the time of the chain over its length)."""
    mx.eval(mx.distributed.all_sum(x, group=group))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        y = x
        for _ in range(chain):
            y = mx.distributed.all_sum(y, group=group) * 0.5
        mx.eval(y)
        times.append((time.perf_counter() - start) / chain)
    return round(sorted(times)[len(times) // 2] * 1e6, 1)


def allsum(args: argparse.Namespace) -> None:
    group = launch_group()
    if group is None:
        raise SystemExit("run under mlx.launch -n 2")
    out = {}
    for hidden in (3072, 4096, 5120):
        x = mx.ones((1, 1, hidden), mx.bfloat16)
        out[f"decode_{hidden}_us"] = _per_call_us(x, group, 500)
        out[f"decode_{hidden}_chained64_us"] = _per_call_us(x, group, 20, chain=64)
    out["prefill_512x3072_us"] = _per_call_us(mx.ones((1, 512, 3072), mx.bfloat16), group, 20)
    _report(group, **out)


def vision(args: argparse.Namespace) -> None:
    group = launch_group()
    model, processor = phi3v_mlx.load(args.model, args.dtype, group=group)
    tower = sum(
        v.nbytes for k, v in tree_flatten(model.parameters()) if not k.startswith("language.")
    )
    pre = processor.preprocess([args.image], args.num_crops)
    mx.eval(model.encode_images(pre.pixel_values, pre.image_sizes))
    start = time.perf_counter()
    features = model.encode_images(pre.pixel_values, pre.image_sizes)
    mx.eval(features)
    encode_s = time.perf_counter() - start
    values = {
        "tower_gb": _gb(tower),
        "encode_s": round(encode_s, 3),
        "features": list(features[0].shape),
        "features_mb": round(features[0].nbytes / 1e6, 2),
    }
    if group is not None:
        mine = features[0] if group.rank() == 0 else mx.zeros_like(features[0])
        values["broadcast_ms"] = round(_per_call_us(mine, group, 10) / 1e3, 2)
    _report(group, **values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("memory", "vision"):
        sub = commands.add_parser(name)
        sub.add_argument("--model", required=True, type=Path)
        sub.add_argument("--dtype", help="float32, float16 or bfloat16 (default: stored)")
    commands.choices["memory"].add_argument("--tokens", type=int, default=8)
    commands.choices["vision"].add_argument("--image", required=True, type=Path)
    commands.choices["vision"].add_argument("--num-crops", type=int, default=16)
    commands.add_parser("allsum")
    args = parser.parse_args()
    {"memory": memory, "allsum": allsum, "vision": vision}[args.command](args)


if __name__ == "__main__":
    main()
