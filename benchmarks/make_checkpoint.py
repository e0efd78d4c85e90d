"""Write a random-weight Phi-3(.5)-Vision checkpoint in the exact Hugging Face layout.

Speed and memory depend on tensor sizes, not values, so benchmarks run on these. Tensors are drawn
and written one at a time (a full-size model never sits in memory), sharded like the releases.

    python benchmarks/make_checkpoint.py --model phi-3.5-vision-instruct --dtype float32 \\
        --out benchmarks/checkpoints/phi35v-f32
    python benchmarks/make_checkpoint.py --decoder-layers 4 --vision-layers 4 --out /tmp/quick
    python benchmarks/make_checkpoint.py --text --dtype float32 \\
        --out benchmarks/checkpoints/phi35-mini-f32

``--text`` writes the text model that Phi-3.5-vision's decoder is, Phi-3.5-mini (``model_type``
``phi3``): the vision config keys and tensors are left out.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

import mlx.core as mx

from phi3v_mlx.convert import save_shards

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "tests" / "fixtures" / "configs"
NORMS = re.compile(r"(norm|layrnorm|layer_norm\d)\.weight$")


def tensor_list(
    decoder_layers: int | None, vision_layers: int | None, text: bool = False
) -> list[tuple[str, tuple]]:
    """Real tensor names and shapes, keeping only the first layers when asked (and no vision
    tensor for the text model)."""
    out = []
    for line in (CONFIGS / "tensor_names.txt").read_text().splitlines():
        name, shape = line.split("\t")
        if text and "vision_embed_tokens" in name:
            continue
        decoder = re.match(r"model\.layers\.(\d+)\.", name)
        vision = re.search(r"encoder\.layers\.(\d+)\.", name)
        if decoder and decoder_layers is not None and int(decoder.group(1)) >= decoder_layers:
            continue
        if vision and vision_layers is not None and int(vision.group(1)) >= vision_layers:
            continue
        out.append((name, tuple(json.loads(shape))))
    return out


def random_tensor(name: str, shape: tuple, dtype: mx.Dtype, key: mx.array) -> mx.array:
    """Values of the scale a trained model has, so no path meets overflow or denormals."""
    if NORMS.search(name):
        value = 1 + 0.1 * mx.random.normal(shape, key=key)
    elif name.endswith("_GN"):
        value = mx.random.normal(shape, key=key)
    elif name.endswith(".bias") or "embedding" in name or "embed_tokens" in name:
        value = 0.02 * mx.random.normal(shape, key=key)
    else:
        fan_in = 1
        for d in shape[1:]:
            fan_in *= d
        value = (0.5 / fan_in**0.5) * mx.random.normal(shape, key=key)
    return value.astype(dtype)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    models = ["phi-3.5-vision-instruct", "phi-3-vision-128k-instruct"]
    parser.add_argument("--model", default=models[0], choices=models)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    parser.add_argument("--decoder-layers", type=int, help="keep only this many decoder layers")
    parser.add_argument("--vision-layers", type=int, help="keep only this many CLIP layers")
    parser.add_argument("--shard-gb", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--text", action="store_true", help="the text model (Phi-3.5-mini)")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)

    if args.out.exists() and any(args.out.iterdir()):
        sys.exit(f"error: {args.out} exists and is not empty")
    source = CONFIGS / args.model
    config = json.loads((source / "config.json").read_text())
    config["torch_dtype"] = args.dtype
    config["_attn_implementation"] = "eager"
    if args.decoder_layers is not None:
        config["num_hidden_layers"] = args.decoder_layers
    if args.vision_layers is not None:  # the real config has no vision_config: CLIP ViT-L/14-336
        config["vision_config"] = {"num_hidden_layers": args.vision_layers}
    if args.text:
        for key in ("embd_layer", "img_processor", "vision_config", "auto_map"):
            config.pop(key, None)
        config.update(model_type="phi3", architectures=["Phi3ForCausalLM"])
        config["rope_scaling"]["type"] = "longrope"

    dtype = getattr(mx, args.dtype)
    tensors = {}
    for i, (name, shape) in enumerate(
        tensor_list(args.decoder_layers, args.vision_layers, args.text)
    ):
        tensors[name] = random_tensor(name, shape, dtype, mx.random.key(args.seed * 100_003 + i))

    args.out.mkdir(parents=True, exist_ok=True)

    def report(done: int, total: int) -> None:
        print(f"  {done / 1e9:.2f} / {total / 1e9:.2f} GB", flush=True)

    count = len(tensors)
    total = save_shards(args.out, tensors, int(args.shard_gb * 1e9), report, fmt="pt")
    (args.out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for file in source.iterdir():
        if file.name != "config.json" and not (args.text and "processor" in file.name):
            shutil.copy2(file, args.out / file.name)
    print(f"wrote {args.out}: {count} tensors, {total / 1e9:.3f} GB of {args.dtype}")


if __name__ == "__main__":
    main()
