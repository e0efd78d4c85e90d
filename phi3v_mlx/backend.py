"""What the MLX backend in use makes fast or slow, and the one-line advice that follows."""

from __future__ import annotations

import platform
from pathlib import Path

import mlx.core as mx

OPENBLAS_DEBIAN = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3"


def blas_library() -> str:
    """The BLAS library this process has mapped (what MLX's CPU backend multiplies with)."""
    maps = Path("/proc/self/maps")
    if maps.exists():
        text = maps.read_text()
        for name in ("openblas", "mkl", "blis"):
            if name in text:
                return name
        return "reference (bundled with mlx[cpu])"
    return "Accelerate" if platform.system() == "Darwin" else "unknown"


def cpu_advice(stored: str, quantized: bool, compute: str | None) -> str | None:
    """One line on what a checkpoint costs on MLX's CPU backend and what to do, or None (a GPU,
    or nothing to say). ``stored`` is its dtype name, ``compute`` the ``--dtype`` asked for."""
    if mx.metal.is_available():
        return None
    parts = []
    effective = compute or stored
    if quantized and compute != "float32":
        parts.append(
            "MLX's CPU backend runs quantized matrix products slowly: --dtype float32 makes them "
            "several times faster, a dequantized float32 copy (phi3v convert -d --dtype float32) "
            "faster still"
        )
    elif effective in ("float16", "bfloat16"):
        parts.append(
            f"MLX's CPU backend runs {effective} matrix products slowly: --dtype float32 "
            "computes in float32 (twice the memory)"
        )
    if platform.system() == "Linux" and blas_library() != "openblas":
        parts.append(
            "preloading OpenBLAS makes float32 products ~30x faster "
            f"(LD_PRELOAD={OPENBLAS_DEBIAN}, see the README)"
        )
    return "note: " + "; ".join(parts) if parts else None
