"""How far mlx-lm and phi3v-mlx are from the references on the text fixtures (float32).

    python benchmarks/text_divergence.py [--fixtures DIR] [--out FILE.json]

Per variant, over every prompt position of every case: the share of positions whose argmax
equals the reference's and the largest error on the reference's top-5 logits; and the checks of
``parity_text.py`` computed the same way for both sides (per case: the prompt logits, and the
no-cache greedy tokens; case d of the variants with their own inputs also the step logits).
mlx-lm's phi3small indexes the batch axis when it masks its unused ids, which crashes on the CPU
backend: that one line is replaced by the equivalent ``mx.where`` here.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_map

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-4
MASKED = -1e30


def float32(model):
    model.update(tree_map(lambda x: x.astype(mx.float32) if x.dtype == mx.bfloat16 else x,
                          model.parameters()))  # fmt: skip
    return model


def close(got: np.ndarray, want: np.ndarray) -> bool:
    masked = want <= MASKED
    ok = np.abs(got[~masked] - want[~masked]) <= TOL + TOL * np.abs(want[~masked])
    return bool(ok.all() and (got[masked] <= MASKED).all())


def logsumexp(x: np.ndarray) -> np.ndarray:
    top = x.max(-1, keepdims=True)
    return (top + np.log(np.exp(x - top).sum(-1, keepdims=True)))[..., 0]


def measure(forward, variant: str, text: Path, inputs_dir: Path, stops: set[int]) -> dict:
    agree = total = passed = checks = 0
    worst = 0.0
    for inputs in sorted(inputs_dir.glob("case_*.npz")):
        ids = np.load(inputs)["input_ids"].astype(np.int32)
        gold = np.load(text / "golden" / variant / inputs.name)
        logits = np.array(forward(mx.array(ids)).astype(mx.float32))[0]
        agree += int((logits.argmax(-1) == gold["argmax"]).sum())
        total += len(gold["argmax"])
        top = np.take_along_axis(logits, gold["top5_ids"].astype(np.int64), -1)
        worst = max(worst, float(np.abs(top - gold["top5_logits"]).max()))
        ok = close(top, gold["top5_logits"]) and close(logits[-1], gold["logits"][0])
        ok = ok and close(logsumexp(np.maximum(logits, -1e30)), gold["logsumexp"])
        passed, checks = passed + ok, checks + 1
        sequence = ids[0].tolist()
        want = gold["greedy_tokens"].tolist()
        if any(t in stops for t in want):
            want = want[: min(want.index(t) for t in stops if t in want)]
        got = []
        for _ in want:
            got.append(int(np.array(forward(mx.array([sequence + got])))[0, -1].argmax()))
        passed, checks = passed + (got == want), checks + 1
        if "greedy_step_logits" in gold.files and inputs.parent != text / "golden" / "inputs":
            full = sequence + gold["greedy_tokens"].tolist()
            ok = all(
                close(np.array(forward(mx.array([full[: int(gold["greedy_seq_len"][s])]])))[0, -1],
                      want_logits)
                for s, want_logits in zip(gold["greedy_step_logits_steps"],
                                          gold["greedy_step_logits"], strict=True)
            )  # fmt: skip
            passed, checks = passed + ok, checks + 1
    return {
        "argmax_agreement": agree / total,
        "max_top5_logit_error": worst,
        "positions": total,
        "checks_passed": passed,
        "checks": checks,
    }


def mlx_lm_model(folder: Path):
    """mlx-lm's model of a fixture folder in float32 (its phi3small made to run on the CPU)."""
    from mlx_lm.models import phi3small
    from mlx_lm.utils import load_model

    def call(self, inputs, cache=None):
        out = self.model.embed_tokens.as_linear(self.model(inputs, cache))
        if self.mup_width_multiplier:
            out = out / self.mup_width_multiplier
        unused = mx.zeros(out.shape[-1], dtype=mx.bool_)
        unused[self._dummy_tokenizer_ids] = True
        return mx.where(unused, -mx.inf, out)

    phi3small.Model.__call__ = call
    model, _ = load_model(folder)
    return float32(model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fixtures", type=Path, default=ROOT / "tests" / "fixtures" / "text")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--variant", action="append", help="only these variants")
    args = parser.parse_args()
    import mlx_lm

    import phi3v_mlx

    text = args.fixtures
    manifest = json.loads((text / "golden" / "manifest.json").read_text())
    variants = {v: (text / "golden" / "inputs", {32000, 32007, 2}) for v in manifest["variants"]}
    for variant, meta in manifest.get("variants_own_inputs", {}).items():
        variants[variant] = (text / "golden" / "inputs" / variant, set(meta["stop_ids"]))
    results = {"mlx_lm_version": mlx_lm.__version__, "variants": {}}
    for variant, (inputs_dir, stops) in variants.items():
        folder = text / "models" / variant
        if args.variant and variant not in args.variant or not folder.is_dir():
            continue
        ours, _ = phi3v_mlx.load(folder, dtype="float32")
        results["variants"][variant] = {
            "phi3v_mlx": measure(ours, variant, text, inputs_dir, stops),
            "mlx_lm": measure(mlx_lm_model(folder), variant, text, inputs_dir, stops),
        }
        for side, row in results["variants"][variant].items():
            print(f"{variant:16s} {side:10s} argmax {row['argmax_agreement']:7.1%}  "
                  f"max top-5 logit error {row['max_top5_logit_error']:.2g}  "
                  f"checks {row['checks_passed']}/{row['checks']}")  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
