"""How far mlx-lm and phi3v-mlx are from transformers on the Phi-3 text fixtures (float32).

    python benchmarks/text_divergence.py [--out benchmarks/results/text-divergence.json]

Per variant, over every prompt position of every case: the share of positions whose argmax
equals the reference's, and the largest error on the reference's top-5 logits.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_map

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT / "tests" / "fixtures" / "text"


def float32(model):
    model.update(tree_map(lambda x: x.astype(mx.float32) if x.dtype == mx.bfloat16 else x,
                          model.parameters()))  # fmt: skip
    return model


def measure(forward, variant: str) -> dict[str, float]:
    agree = total = 0
    worst = 0.0
    for inputs in sorted((TEXT / "golden" / "inputs").glob("case_*.npz")):
        ids = np.load(inputs)["input_ids"].astype(np.int32)
        gold = np.load(TEXT / "golden" / variant / inputs.name)
        logits = np.array(forward(mx.array(ids)).astype(mx.float32))[0]
        agree += int((logits.argmax(-1) == gold["argmax"]).sum())
        total += len(gold["argmax"])
        top = np.take_along_axis(logits, gold["top5_ids"].astype(np.int64), -1)
        worst = max(worst, float(np.abs(top - gold["top5_logits"]).max()))
    return {"argmax_agreement": agree / total, "max_top5_logit_error": worst, "positions": total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    import mlx_lm

    import phi3v_mlx

    variants = json.loads((TEXT / "golden" / "manifest.json").read_text())["variants"]
    results = {"mlx_lm_version": mlx_lm.__version__, "variants": {}}
    for variant in variants:
        folder = TEXT / "models" / variant
        ours, _ = phi3v_mlx.load(folder, dtype="float32")
        theirs, _ = mlx_lm.load(str(folder))
        results["variants"][variant] = {
            "phi3v_mlx": measure(ours, variant),
            "mlx_lm": measure(float32(theirs), variant),
        }
        for side, row in results["variants"][variant].items():
            print(f"{variant:16s} {side:10s} argmax {row['argmax_agreement']:7.1%}  "
                  f"max top-5 logit error {row['max_top5_logit_error']:.2g}")  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
