"""Phi-4-reasoning-vision-15B side by side with mlx-vlm's ``phi4_siglip``: time to first token for
one 1280x960 image, decoding speed and peak memory, on full-width random checkpoints with a few
decoder layers, and the linear extrapolation to the model's 40.

    flock /tmp/bench.lock env LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 \\
        python benchmarks/bench_phi4rv.py --max-tokens 8 \\
        --checkpoint /work/ckpt/phi4rv-1l-f32 /work/ckpt/phi4rv-2l-f32
    python benchmarks/bench_phi4rv.py --extrapolate results/<1-layer>.json results/<2-layer>.json

The checkpoints come from ``make_checkpoint.py --model phi-4-reasoning-vision-15b``. Each side
runs in a fresh process, the sides alternating. Every checkpoint writes
``results/<date>-phi4rv-<N>l-<machine>.json``; ``--extrapolate`` takes two of them (two layer
counts; two checkpoints given at once are extrapolated at the end) and writes
``results/<date>-phi4rv-<machine>.json``: each metric's cost of one decoder
layer (the difference between the two, divided by the layer difference) and its value at 40
layers (the smaller count's plus the missing layers' cost), for each side and their ratio.

mlx-vlm 0.7.10 does not run the Hub checkpoint as it is, for two reasons recorded in the results:
its loader reads the decoder's sizes from a ``text_config`` that the Hub's config.json does not
have (it builds its defaults, the 40-layer model, so a checkpoint cut to fewer layers fails with
missing parameters; the whole model would load), and its processor builds transformers'
``Siglip2ImageProcessor``, which needs PyTorch (not installed here). It is therefore given the
checkpoint with ``text_config`` added (a folder of links beside it) and a processor without an
image processor, and fed the same prompt ids (its own ``tokenizer_image_token``) and the same
patches (this package's NaFlex preprocessing of the image: 1280x960 has more than 3600 patches,
so both processors resize it to the same 3600-patch budget); its time to first token leaves out
that preprocessing, which is reported on its own (``preprocess_s``), while phi3v-mlx's includes it.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from bench import make_images
from common import alternate, combine, metric_table, print_result, run_worker, write_report

SIDES = ("phi3v_mlx", "mlx_vlm")
NAMES = ["load_s", "ttft_s", "decode_tps", "decode_s_per_token", "peak_gb", "rss_gb"]
QUESTION = "Describe the image in detail."
TEXT_KEYS = ("vocab_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
             "rms_norm_eps", "hidden_size", "num_key_value_heads", "rope_theta",
             "partial_rotary_factor", "rope_scaling")  # fmt: skip
FULL_LAYERS = 40
# What mlx_vlm.load does with this checkpoint's processor without PyTorch (seen on the tiny
# fixture checkpoint with a tokenizer: about 7 minutes and 7.5 GB).
PROCESSOR = (
    "Phi4SigLipProcessor.from_pretrained falls back to AutoProcessor.from_pretrained, which "
    "mlx-vlm patched to call Phi4SigLipProcessor.from_pretrained again: it recurses, loading "
    "the tokenizer at every level, until a RecursionError, then tries the Hub's remote code "
    "(OSError: no processing_phi4_visionr.py; on the Hub it needs PyTorch too)"
)


def prompt_text(checkpoint: Path) -> str:
    """The question about one image in the model's chat format (its own template, thinking
    "off": the NOTHINK marker, so both sides read the same prompt)."""
    from phi3v_mlx.generate import chat_prompt
    from phi3v_mlx.models.phi4rv import ModelConfig, load_processor

    processor = load_processor(checkpoint, ModelConfig.from_file(checkpoint))
    return chat_prompt(processor, QUESTION, 1, thinking="off")


def mlx_vlm_view(checkpoint: Path) -> Path:
    """The checkpoint as mlx-vlm can load it: links to its files and a config.json with the
    decoder's sizes also under ``text_config``."""
    view = checkpoint.with_name(checkpoint.name + "-mlx-vlm")
    view.mkdir(exist_ok=True)
    for file in checkpoint.iterdir():
        link = view / file.name
        if file.name != "config.json" and not link.exists():
            link.symlink_to(file.resolve())
    config = json.loads((checkpoint / "config.json").read_text())
    config["text_config"] = {k: config[k] for k in TEXT_KEYS if k in config}
    (view / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return view


def one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


def timed(stream: Iterator) -> list[float]:
    """Arrival time of every chunk, from the call."""
    start = time.perf_counter()
    return [time.perf_counter() - start for _ in stream]


class Phi3vMlx:
    """phi3v-mlx through its public API: the prompt text and the image file."""

    def __init__(self, checkpoint: Path):
        import phi3v_mlx

        self.lib = phi3v_mlx
        self.model, self.processor = phi3v_mlx.load(checkpoint)
        self.notes: dict[str, str] = {}

    def stream(self, prompt: str, image: Path | None, max_tokens: int) -> Iterator:
        return self.lib.stream_generate(self.model, self.processor, prompt,
                                        images=[image] if image else None,
                                        max_tokens=max_tokens)  # fmt: skip


class MlxVlm:
    """mlx-vlm through ``mlx_vlm.load`` and ``mlx_vlm.stream_generate`` (see the module for
    what it is given); its stream's last result, which repeats the last token, is not counted."""

    def __init__(self, checkpoint: Path):
        import mlx_vlm
        from mlx_vlm.models.phi4_siglip import processing_phi4_siglip as processing

        self.lib, self.processing = mlx_vlm, processing
        self.notes = {}
        try:
            config = mlx_vlm.utils.load_config(checkpoint)
            self.notes["hub_config"] = (
                "no text_config: mlx-vlm builds its default decoder (40 layers), so a checkpoint "
                "with fewer layers fails to load with missing parameters"
                if "text_config" not in config
                else "text_config present"
            )
        except Exception as e:  # noqa: BLE001 - recorded, not raised
            self.notes["hub_config"] = one_line(e)
        try:  # what its processor builds first (loading it here would recurse: see PROCESSOR)
            from transformers.models.siglip2.image_processing_siglip2 import (  # noqa: F401
                Siglip2ImageProcessor,
            )

            self.notes["processor"] = "Siglip2ImageProcessor imports"
        except ImportError as e:
            self.notes["processor"] = f"{one_line(e)}; {PROCESSOR}"
        original = processing.Phi4SigLipProcessor.from_pretrained

        def without_images(path, **kwargs):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)  # no prompt
            return processing.Phi4SigLipProcessor(None, tokenizer)

        processing.Phi4SigLipProcessor.from_pretrained = without_images
        try:
            self.model, self.processor = mlx_vlm.load(str(mlx_vlm_view(checkpoint)))
        finally:
            processing.Phi4SigLipProcessor.from_pretrained = original
        from phi3v_mlx.models.phi4rv.images import ImageProcessor

        self.images = ImageProcessor()

    def stream(self, prompt: str, image: Path | None, max_tokens: int) -> Iterator:
        import mlx.core as mx

        ids = self.processing.tokenizer_image_token(prompt, self.processor.tokenizer)
        media = {}
        if image is not None:
            media = self.images([image])
            media = {k: media[k] for k in ("pixel_values", "pixel_attention_mask",
                                           "spatial_shapes")}  # fmt: skip
        results = self.lib.stream_generate(
            self.model, self.processor, prompt, input_ids=mx.array([ids]), max_tokens=max_tokens,
            temperature=0.0, **media,
        )  # fmt: skip
        return (r for r in results if r.finish_reason is None)


def worker(side: str, checkpoint: Path, max_tokens: int) -> dict:
    """One side's measurements in this process."""
    import mlx.core as mx

    from phi3v_mlx.backend import blas_library
    from phi3v_mlx.models.phi4rv.images import ImageProcessor

    image = make_images(Path(tempfile.mkdtemp()))["landscape"]
    prompt = prompt_text(checkpoint)
    start = time.perf_counter()
    lib = (Phi3vMlx if side == "phi3v_mlx" else MlxVlm)(checkpoint)
    out: dict = {"load_s": time.perf_counter() - start}
    timed(lib.stream(prompt.replace("<image>\n", ""), None, 2))  # warm-up, text only
    mx.reset_peak_memory()
    times = timed(lib.stream(prompt, image, max_tokens))
    out["peak_gb"] = mx.get_peak_memory() / 1e9
    out["ttft_s"] = times[0]
    out["tokens"] = len(times)
    if len(times) > 2:
        out["decode_s_per_token"] = (times[-1] - times[0]) / (len(times) - 1)
        out["decode_tps"] = 1 / out["decode_s_per_token"]
    out["rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    started = time.perf_counter()
    pre = ImageProcessor()([image])
    out["preprocess_s"] = time.perf_counter() - started
    out["image_tokens"] = int(pre["num_image_tokens"][0].item())
    out["notes"] = lib.notes
    out["blas"] = blas_library()
    return out


def layers_of(checkpoint: Path) -> int:
    return json.loads((checkpoint / "config.json").read_text())["num_hidden_layers"]


def measure(checkpoint: Path, args: argparse.Namespace) -> Path:
    """Both sides on one checkpoint, alternating; its results file."""
    runs: dict[str, list[dict]] = {side: [] for side in SIDES}
    for r, side in alternate(SIDES, args.runs):
        print(f"run {r + 1}: {side} ...", flush=True)
        flags = ["--worker", side, "--checkpoint", str(checkpoint),
                 "--max-tokens", str(args.max_tokens)]  # fmt: skip
        runs[side].append(run_worker(Path(__file__), flags))
        print(f"  {runs[side][-1]}", flush=True)
    metrics = combine(runs, NAMES)
    print(metric_table(metrics, SIDES))
    layers = layers_of(checkpoint)
    path = write_report(
        f"phi4rv-{layers}l",
        {
            "checkpoint": str(checkpoint),
            "decoder_layers": layers,
            "dtype": "float32",
            "image": "1280x960",
            "image_tokens": runs["phi3v_mlx"][0]["image_tokens"],
            "runs": args.runs,
            "max_tokens": args.max_tokens,
            "metrics": metrics,
            "preprocess_s": runs["phi3v_mlx"][0]["preprocess_s"],
            "mlx_vlm_notes": runs["mlx_vlm"][0]["notes"],
            "raw": runs,
        },
    )
    print(f"wrote {path}")
    return path


def extrapolate(files: list[Path]) -> None:
    """Per-layer cost and the 40-layer value of every metric from two layer counts."""
    (a, b) = sorted((json.loads(f.read_text()) for f in files), key=lambda r: r["decoder_layers"])
    span = b["decoder_layers"] - a["decoder_layers"]
    if span <= 0:
        raise SystemExit("error: give results of two different layer counts")
    scaled = {}
    for name in ("ttft_s", "decode_s_per_token", "peak_gb"):
        row: dict[str, float | None] = {}
        for side in SIDES:
            low, high = a["metrics"][name][side], b["metrics"][name][side]
            per_layer = (high - low) / span
            row[f"{side}_per_layer"] = per_layer
            row[side] = low + (FULL_LAYERS - a["decoder_layers"]) * per_layer
        row["ratio"] = row[SIDES[0]] / row[SIDES[1]] if row[SIDES[1]] else None
        scaled[name] = row
    decode = scaled["decode_s_per_token"]
    scaled["decode_tps"] = {side: 1 / decode[side] for side in SIDES}
    scaled["decode_tps"]["ratio"] = scaled["decode_tps"][SIDES[0]] / scaled["decode_tps"][SIDES[1]]
    print(metric_table({k: {s: v[s] for s in (*SIDES, "ratio")} for k, v in scaled.items()},
                       SIDES))  # fmt: skip
    path = write_report(
        "phi4rv",
        {
            "what": f"linear extrapolation to {FULL_LAYERS} decoder layers: the value at "
            f"{a['decoder_layers']} layers plus {FULL_LAYERS - a['decoder_layers']} times one "
            f"layer's cost, one layer's cost being the difference between the "
            f"{b['decoder_layers']}- and {a['decoder_layers']}-layer runs divided by {span}",
            "dtype": "float32",
            "image": "1280x960",
            "layer_counts": [a["decoder_layers"], b["decoder_layers"]],
            "sources": [str(f) for f in files],
            f"metrics_{FULL_LAYERS}_layers": scaled,
            "measured": {str(r["decoder_layers"]): r["metrics"] for r in (a, b)},
            "mlx_vlm_notes": a["mlx_vlm_notes"],
        },
    )
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--checkpoint",
        type=Path,
        nargs="+",
        help="one or two checkpoints (two layer counts: then extrapolated)",
    )
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--extrapolate", type=Path, nargs=2, metavar="RESULTS")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.extrapolate:
        extrapolate(args.extrapolate)
    elif args.worker:
        print_result(worker(args.worker, args.checkpoint[0], args.max_tokens))
    elif args.checkpoint:
        files = [measure(checkpoint, args) for checkpoint in args.checkpoint]
        if len(files) == 2:
            extrapolate(files)
    else:
        parser.error("give --checkpoint or --extrapolate")


if __name__ == "__main__":
    main()
