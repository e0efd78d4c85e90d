"""``phi3v fuse``: an adapter fused into its base, written as the converter writes checkpoints,
with a check that the result answers as base + adapter does."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .adapters import fused_weights
from .convert import convert
from .fidelity import compare
from .loader import load_model, resolve


@dataclass
class FuseReport:
    """How close the fused model is to base + adapter, and how far the adapter moves the base
    (so that an adapter lost in fusing shows: the fused model would sit where the base does)."""

    positions: int
    top1_agreement: float
    mean_kl: float
    base_top1_agreement: float
    base_mean_kl: float

    def __str__(self) -> str:
        return (
            f"Fused vs base + adapter on {self.positions} calibration positions: top-1 agreement "
            f"{100 * self.top1_agreement:.1f}%, mean KL {self.mean_kl:.4g} nats "
            f"(the base alone: {100 * self.base_top1_agreement:.1f}%, "
            f"{self.base_mean_kl:.4g} nats)"
        )


def fuse(
    model_path: str | Path,
    adapter_path: str | Path,
    save_path: str | Path,
    *,
    dequantize: bool = False,
    quantize: bool = False,
    q_bits: int | None = None,
    q_group_size: int | None = None,
    dtype: str | None = None,
    force: bool = False,
    log: Callable[[str], None] = print,
    progress: Callable[[int, int], None] | None = None,
    check_progress: Callable[[int, int], None] | None = None,
) -> FuseReport:
    """Fuse an adapter into its base and write the result as the converter writes checkpoints.

    Every adapted layer is fused in float32 (a quantized base is dequantized first); the result
    is quantized again as the base was (or as ``quantize`` asks), or kept unquantized with
    ``dequantize``. The report compares the fused model with base + adapter."""
    base = resolve(model_path)
    config = json.loads((base / "config.json").read_text(encoding="utf-8"))
    quantization = config.get("quantization") or {}
    if quantize and dequantize:
        raise ValueError("--dequantize and --quantize exclude each other")
    fused = fused_weights(load_model(base, "float32", adapter_path=adapter_path))
    requantize = quantize or (bool(quantization) and not dequantize)
    convert(
        base, save_path, quantize=requantize, dequantize=bool(quantization) and not requantize,
        q_bits=q_bits or quantization.get("bits", 4),
        q_group_size=q_group_size or quantization.get("group_size", 64), dtype=dtype,
        force=force, check=False, replace=fused, log=log, progress=progress,
    )  # fmt: skip
    save_path = Path(save_path).expanduser()
    log("Comparing the fused model with base + adapter on the calibration prompts")
    positions, [merged, alone] = compare(
        base,
        lambda d: load_model(base, d, adapter_path=adapter_path),
        [lambda d: load_model(save_path, d), lambda d: load_model(base, d)],
        progress=check_progress,
    )
    report = FuseReport(positions, *merged, *alone)
    log(str(report))
    return report
