"""Side-by-side benchmark of phi3v-mlx and mlx-vlm on one checkpoint, image set and prompt.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 \\
        python benchmarks/bench.py --checkpoint benchmarks/checkpoints/phi35v-f32 --runs 2

Each measurement runs in a fresh process per library, the libraries alternating, so neither
inherits the other's memory or warm caches. mlx-vlm is the optional ``bench`` extra
(``pip install -e ".[bench]"``); without it only phi3v-mlx is measured.

The other workloads have a script each, writing ``results/<date>-<scenario>-<machine>.json`` in
the same metric schema (each side and the ratio): ``bench_batch.py`` (batched throughput against
mlx-vlm's ``batch_generate``), ``bench_server.py`` (concurrent clients against sequential ones),
``bench_text.py`` (Phi-3.5-mini against mlx-lm), ``bench_lora.py`` (one training step) and
``bench_precision.py`` (what 4-bit and bfloat16 cost on the CPU backend).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from phi3v_mlx.backend import blas_library

HERE = Path(__file__).resolve().parent
SIDES = ("phi3v_mlx", "mlx_vlm")
METRICS = {  # name: (higher is better, unit)
    "load_s": (False, "s"),
    "load_peak_gb": (False, "GB"),
    "ttft_first_s": (False, "s"),
    "prefill_tps": (True, "tok/s"),
    "decode_tps": (True, "tok/s"),
    "ttft_second_turn_s": (False, "s"),
    "ttft_two_images_s": (False, "s"),
    "peak_gb": (False, "GB"),
}
EXTRA = {"ttft_first_nc16_s": (False, "s"), "ttft_second_turn_uncached_s": (False, "s")}
QUESTION = "Describe the image in detail."
FOLLOW_UP = "What colours stand out?"


def chat_prompt(turns: list[tuple[str, str | None]], n_images: int) -> str:
    """The official chat format; images tagged at the start of the first user turn."""
    tags = "".join(f"<|image_{i + 1}|>\n" for i in range(n_images))
    text = ""
    for i, (question, answer) in enumerate(turns):
        text += f"<|user|>\n{tags if i == 0 else ''}{question}<|end|>\n<|assistant|>\n"
        if answer is not None:
            text += f"{answer}<|end|>\n"
    return text


def make_images(folder: Path) -> dict[str, Path]:
    """Deterministic photo-sized pictures: a 4:3 landscape (2x2 crops at num_crops 4, 3x4 at 16)
    and a 2:1 panorama (1x2 crops at num_crops 4)."""
    from PIL import Image

    out = {}
    for name, (w, h) in {"landscape": (1280, 960), "wide": (1000, 500)}.items():
        y, x = np.mgrid[0:h, 0:w]
        rgb = np.stack([x * 255 // w, y * 255 // h, ((x // 40 + y // 40) % 2) * 200], -1)
        rgb[(x - w // 3) ** 2 + (y - h // 2) ** 2 < (h // 5) ** 2] = (220, 50, 40)
        out[name] = folder / f"{name}.png"
        Image.fromarray(rgb.astype(np.uint8)).save(out[name])
    return out


# ---------------------------------------------------------------- the two libraries, same scenarios


class Phi3vMlx:
    """phi3v-mlx driven through its public API."""

    def __init__(self, checkpoint: Path):
        import phi3v_mlx

        self.lib = phi3v_mlx
        self.model, self.processor = phi3v_mlx.load(checkpoint)

    def stream(self, prompt: str, images: list[Path], num_crops: int, max_tokens: int) -> Iterator:
        return self.lib.stream_generate(
            self.model, self.processor, prompt, images=images or None, num_crops=num_crops,
            max_tokens=max_tokens,
        )  # fmt: skip

    def second_turn(self, image: Path, num_crops: int, max_tokens: int) -> tuple[str, Iterator]:
        """Ask about an image, then return the follow-up's stream (its first token timed)."""
        chat = self.lib.ChatSession(self.model, self.processor)
        first = chat.send(QUESTION, images=[image], num_crops=num_crops, max_tokens=max_tokens)
        return first.text, chat.stream(FOLLOW_UP, max_tokens=max_tokens)


class MlxVlm:
    """mlx-vlm driven through its public API, prompts pre-formatted identically.

    Its phi3_v processor reads ``image_processor.num_crops`` (a keyword is ignored); its stream
    ends with one extra result repeating the last token, not counted here; a chat turn reuses
    the conversation's KV cache through ``PromptCacheState``, as its own chat command does.
    """

    def __init__(self, checkpoint: Path):
        import mlx_vlm

        self.lib = mlx_vlm
        self.model, self.processor = mlx_vlm.load(str(checkpoint))

    def stream(
        self, prompt: str, images: list[Path], num_crops: int, max_tokens: int, **kw
    ) -> Iterator:
        self.processor.image_processor.num_crops = num_crops
        results = self.lib.stream_generate(
            self.model, self.processor, prompt, image=[str(p) for p in images] or None,
            max_tokens=max_tokens, temperature=0.0, **kw,
        )  # fmt: skip
        return (r for r in results if r.finish_reason is None)

    def second_turn(self, image: Path, num_crops: int, max_tokens: int) -> tuple[str, Iterator]:
        """Ask about an image, then return the follow-up's stream (its first token timed)."""
        state = self.lib.PromptCacheState()
        first = chat_prompt([(QUESTION, None)], 1)
        chunks = self.stream(first, [image], num_crops, max_tokens, prompt_cache_state=state)
        answer = "".join(c.text for c in chunks)
        prompt = chat_prompt([(QUESTION, answer), (FOLLOW_UP, None)], 1)
        return answer, self.stream(prompt, [image], num_crops, max_tokens, prompt_cache_state=state)


def timed(stream: Iterator) -> tuple[float, list[float]]:
    """Time to the first chunk and the arrival time of every chunk."""
    start = time.perf_counter()
    times = [time.perf_counter() - start for _ in stream]
    return (times[0] if times else float("nan")), times


def run_worker(side: str, checkpoint: Path, max_tokens: int) -> dict[str, float]:
    """Every scenario for one library, in this process."""
    import mlx.core as mx

    images = make_images(Path(tempfile.mkdtemp()))
    start = time.perf_counter()
    lib = (Phi3vMlx if side == "phi3v_mlx" else MlxVlm)(checkpoint)
    out = {"load_s": time.perf_counter() - start}
    out["load_peak_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    timed(lib.stream(chat_prompt([("Hi", None)], 0), [], 4, 2))  # warm-up
    peaks = []

    def measure(run: Callable[[], Iterator]) -> tuple[float, list[float]]:
        mx.reset_peak_memory()
        result = timed(run())
        peaks.append(mx.get_peak_memory() / 1e9)
        return result

    one = chat_prompt([(QUESTION, None)], 1)
    out["ttft_first_s"], times = measure(
        lambda: lib.stream(one, [images["landscape"]], 4, max_tokens)
    )
    if len(times) > 2:
        out["decode_tps"] = (len(times) - 1) / (times[-1] - times[0])
    out["ttft_first_nc16_s"], _ = measure(lambda: lib.stream(one, [images["landscape"]], 16, 1))
    words = " ".join(["lighthouse"] * 1000)
    text_prompt = chat_prompt([(f"Summarize: {words}", None)], 0)
    ttft, _ = measure(lambda: lib.stream(text_prompt, [], 4, 1))
    out["prefill_tps"] = len(lib.processor.tokenizer.encode(text_prompt)) / ttft
    answer, follow_up = lib.second_turn(images["landscape"], 4, max_tokens)
    out["ttft_second_turn_s"], _ = measure(lambda: follow_up)
    again = chat_prompt([(QUESTION, answer), (FOLLOW_UP, None)], 1)
    out["ttft_second_turn_uncached_s"], _ = measure(
        lambda: lib.stream(again, [images["landscape"]], 4, 1)
    )
    two = chat_prompt([("Compare the two pictures.", None)], 2)
    out["ttft_two_images_s"], _ = measure(
        lambda: lib.stream(two, [images["landscape"], images["wide"]], 4, 1)
    )
    out["peak_gb"] = max(peaks)
    out["blas"] = blas_library()
    return out


# ---------------------------------------------------------------- the driver


def memory_bandwidth_gbs() -> float:
    """Read bandwidth of a 2 GB float32 matrix-vector product, the operation decoding does."""
    import mlx.core as mx

    w = mx.random.normal((16384, 32768))
    x = mx.random.normal((32768, 1))
    mx.eval(w, x)
    best = float("inf")
    for _ in range(4):
        start = time.perf_counter()
        mx.eval(w @ x)
        best = min(best, time.perf_counter() - start)
    return w.nbytes / best / 1e9


def decode_bytes_per_token(checkpoint: Path) -> int:
    """Weight bytes one decoding step reads: the decoder layers, final norm and LM head."""
    import mlx.core as mx

    index = json.loads((checkpoint / "model.safetensors.index.json").read_text())
    total = 0
    for file in sorted(set(index["weight_map"].values())):
        for name, value in mx.load(str(checkpoint / file)).items():
            if "vision" not in name and "embed_tokens" not in name:
                total += value.nbytes
    return total


def decode_bound(checkpoint: Path, results: dict[str, dict[str, float]]) -> dict[str, float]:
    """The machine's decode speed limit and the share of it each side reaches."""
    bandwidth = memory_bandwidth_gbs()
    per_token = decode_bytes_per_token(checkpoint)
    bound = bandwidth / (per_token / 1e9)
    return {
        "memory_bandwidth_gbs": bandwidth,
        "weight_bytes_per_token": per_token,
        "bound_tps": bound,
        **{side: metrics.get("decode_tps", 0) / bound for side, metrics in results.items()},
    }


def print_bound(bound: dict[str, float], sides: list[str]) -> None:
    print(
        f"decode bound: {bound['weight_bytes_per_token'] / 1e9:.2f} GB of weights per token at "
        f"{bound['memory_bandwidth_gbs']:.1f} GB/s = {bound['bound_tps']:.2f} tok/s; "
        + ", ".join(f"{side} reaches {100 * bound[side]:.0f}%" for side in sides)
    )


def rescore(path: Path) -> None:
    """Measure the decode bound again for a results file, leaving its metrics as they are."""
    report = json.loads(path.read_text())
    sides = [s for s in SIDES if s in report["decode_bound"]]
    metrics = report["metrics"]
    results = {s: {"decode_tps": metrics["decode_tps"][s]} for s in sides}
    report["decode_bound"] = decode_bound(Path(report["checkpoint"]), results)
    print_bound(report["decode_bound"], sides)
    path.write_text(json.dumps(report, indent=2) + "\n")


def worker_command(python: str, side: str, args: argparse.Namespace) -> list[str]:
    return [python, str(Path(__file__).resolve()), "--worker", side,
            "--checkpoint", str(args.checkpoint), "--max-tokens", str(args.max_tokens)]  # fmt: skip


def run_side(python: str, side: str, args: argparse.Namespace) -> dict[str, float]:
    done = subprocess.run(worker_command(python, side, args), capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"error: the {side} run failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def has_mlx_vlm(python: str) -> bool:
    return subprocess.run([python, "-c", "import mlx_vlm"], capture_output=True).returncode == 0


def table(results: dict[str, dict[str, float]], sides: list[str]) -> str:
    rows = [f"| metric | {' | '.join(sides)} | ratio (ours / theirs) |", "|---|---|---|---|"]
    for name, (_, unit) in {**METRICS, **EXTRA}.items():
        values = [results[s].get(name) for s in sides]
        cells = [f"{v:.3f} {unit}" if v is not None else "-" for v in values]
        ratio = values[0] / values[1] if len(values) > 1 and None not in values else None
        rows.append(f"| {name} | {' | '.join(cells)} | {f'{ratio:.2f}' if ratio else '-'} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument(
        "--rescore", type=Path, help="re-measure the decode bound of a results file"
    )
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--their-python", default=sys.executable, help="python with mlx-vlm")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.rescore:
        rescore(args.rescore)
        return
    if args.checkpoint is None:
        parser.error("--checkpoint is required")

    if args.worker:
        print(json.dumps(run_worker(args.worker, args.checkpoint, args.max_tokens)))
        return

    sides = ["phi3v_mlx"] + (["mlx_vlm"] if has_mlx_vlm(args.their_python) else [])
    python = {"phi3v_mlx": sys.executable, "mlx_vlm": args.their_python}
    runs: dict[str, list[dict[str, float]]] = {s: [] for s in sides}
    for r in range(args.runs):
        for side in sides if r % 2 == 0 else sides[::-1]:
            print(f"run {r + 1}/{args.runs}: {side} ...", flush=True)
            runs[side].append(run_side(python[side], side, args))
    blas = {run["blas"] for side in sides for run in runs[side]}
    if len(blas) != 1:
        raise SystemExit(f"error: the two sides ran under different BLAS libraries: {blas}")
    results = {
        side: {
            name: statistics.median(run[name] for run in runs[side])
            for name in {**METRICS, **EXTRA}
            if all(name in run for run in runs[side])
        }
        for side in sides
    }
    config = json.loads((args.checkpoint / "config.json").read_text())
    report = {
        "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores",
        "backend": "mlx cpu" if platform.system() != "Darwin" else "mlx metal",
        "blas": blas.pop(),
        "dtype": config.get("torch_dtype"),
        "checkpoint": str(args.checkpoint),
        "runs": args.runs,
        "metrics": {
            name: {
                **{side: results[side].get(name) for side in sides},
                "ratio": (results[sides[0]].get(name) / results[sides[1]][name])
                if len(sides) > 1 and name in results[sides[1]] and name in results[sides[0]]
                else None,
            }
            for name in {**METRICS, **EXTRA}
        },
        "decode_bound": decode_bound(args.checkpoint, results),
    }
    print(table(results, sides))
    print_bound(report["decode_bound"], sides)
    print(f"machine: {report['machine']}; backend: {report['backend']}; BLAS: {report['blas']}; "
          f"dtype: {report['dtype']}")  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    machine = f"{platform.system().lower()}-{platform.machine()}-{os.cpu_count()}cpu"
    path = args.out / f"{dt.date.today().isoformat()}-{machine}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
