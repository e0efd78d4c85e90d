"""Run under ``mlx.launch -n 2``: each rank loads every variant whole and split across the ranks,
and rank 0 prints one JSON line per variant comparing the two (logits, greedy tokens).

    mlx.launch --backend ring -n 2 -- python tests/distributed_ranks.py QUANTIZED_DIR...
"""

import json
import sys
import threading
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

import phi3v_mlx
from phi3v_mlx.distributed import launch_group, seed_alike
from phi3v_mlx.models.phi3 import Model as TextModel
from phi3v_mlx.models.phi3 import TextConfig

FIXTURES = Path(__file__).parent / "fixtures"
TEXT_MODELS = FIXTURES / "text" / "models"
IMAGE = FIXTURES / "images" / "b_small.png"
PROMPT = "<|user|>\nDescribe the picture in detail.<|end|>\n<|assistant|>\n"


def compare(name: str, whole, split, processor, images) -> dict:
    """Logits of the prompt and greedy tokens of the whole model and the split one."""
    prompt = PROMPT.replace("<|user|>\n", "<|user|>\n<|image_1|>\n") if images else PROMPT
    inputs = processor(prompt, images=images)
    outputs = []
    for model in (whole, split):
        logits = model(**inputs).astype(mx.float32)
        result = phi3v_mlx.generate(
            model, processor, prompt, images=images, max_tokens=12, temperature=0.0
        )
        outputs.append((np.array(logits), result.tokens))
    (a, tokens_a), (b, tokens_b) = outputs
    return {
        "name": name,
        "max_diff": float(np.abs(a - b).max()),
        "tokens": tokens_a,
        "split_tokens": tokens_b,
        "layer_bytes": _nbytes(whole.layers),
        "split_layer_bytes": _nbytes(split.layers),
    }


def _nbytes(layers) -> int:
    return sum(v.nbytes for layer in layers for _, v in tree_flatten(layer.parameters()))


def checkpoint(name: str, path: Path, group, images=None) -> dict:
    whole, processor = phi3v_mlx.load(path, dtype="float32")
    split, _ = phi3v_mlx.load(path, dtype="float32", group=group)
    return compare(name, whole, split, processor, images)


def repeated_kv_heads(group) -> dict:
    """A random decoder with one key-value head: each rank keeps a copy of it."""
    values = json.loads((TEXT_MODELS / "tiny-phi3-4k" / "config.json").read_text())
    values["num_key_value_heads"] = 1
    config = TextConfig.from_dict(values)
    models = []
    for _ in range(2):
        mx.random.seed(3)
        model = TextModel(config)
        mx.eval(model.parameters())
        models.append(model)
    models[1].shard(group)
    _, processor = phi3v_mlx.load(TEXT_MODELS / "tiny-phi3-4k")
    return compare("repeated-kv-heads", *models, processor, None)


def thread_draws(group) -> dict:
    """Unseeded draws in a new thread (MLX's generator is per thread), seeded alike or not,
    as every rank made them."""
    draws = {}

    def draw(alike: bool) -> None:
        if alike:
            seed_alike(group)
        draws["alike" if alike else "unseeded"] = mx.random.randint(0, 2**31 - 1, (4,)).tolist()

    for alike in (False, True):
        thread = threading.Thread(target=draw, args=(alike,))
        thread.start()
        thread.join()
    gathered = {k: mx.distributed.all_gather(mx.array([v]), group=group, stream=mx.cpu).tolist()
                for k, v in draws.items()}  # fmt: skip
    return {"name": "thread-draws", **gathered}


def main() -> None:
    group = launch_group()
    assert group is not None and group.size() == 2, "run under mlx.launch -n 2"
    quantized = [Path(p) for p in sys.argv[1:]]
    results = [
        checkpoint("phi35v-image", FIXTURES / "models" / "tiny-phi35v", group, [IMAGE]),
        checkpoint("phi3-gqa", TEXT_MODELS / "tiny-phi3-4k", group),
        checkpoint("phimoe", TEXT_MODELS / "tiny-phi35-moe", group),
        *(checkpoint(path.name, path, group) for path in quantized),
        repeated_kv_heads(group),
        thread_draws(group),
    ]
    if group.rank() == 0:
        for result in results:
            print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
