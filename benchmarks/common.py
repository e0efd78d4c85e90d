"""What the benchmarks share: fresh worker processes, alternating sides, the results file."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from phi3v_mlx.backend import blas_library

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def machine() -> str:
    return f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores"


def print_result(result: dict) -> None:
    """A worker's last act: its JSON line on stdout, then the process ends at once, without the
    exit handlers (a preloaded OpenBLAS can hang at exit joining its threads: seen with mlx-lm's
    side of bench_text_family, whose parent then waited for ever)."""
    print("\n" + json.dumps(result), flush=True)  # on a line of its own, whatever came before
    sys.stderr.flush()
    os._exit(0)


def run_worker(script: Path, args: Sequence[str], timeout: float | None = None) -> dict:
    """Run ``script --worker ...`` in a fresh process; its last stdout line is its JSON
    (:func:`print_result`)."""
    done = subprocess.run(
        [sys.executable, str(script), *args], capture_output=True, text=True, timeout=timeout
    )
    if done.returncode != 0:
        raise SystemExit(f"error: worker {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def alternate(sides: Sequence[str], runs: int) -> list[tuple[int, str]]:
    """(run, side) in the order they run: the sides take turns going first."""
    order = []
    for r in range(runs):
        order += [(r, side) for side in (sides if r % 2 == 0 else list(sides)[::-1])]
    return order


def metric_table(metrics: dict[str, dict[str, float | None]], sides: Sequence[str]) -> str:
    header = f"| metric | {' | '.join(sides)} | ratio |"
    rows = [header, "|" + "---|" * (len(sides) + 2)]
    for name, values in metrics.items():
        cells = [f"{values.get(s):.3f}" if values.get(s) is not None else "-" for s in sides]
        ratio = values.get("ratio")
        rows.append(f"| {name} | {' | '.join(cells)} | {f'{ratio:.2f}' if ratio else '-'} |")
    return "\n".join(rows)


def combine(runs: dict[str, list[dict[str, float]]], names: Sequence[str]) -> dict:
    """Per metric: each side's median over its runs and the ratio of the first side to the
    second."""
    sides = list(runs)
    out = {}
    for name in names:
        values = {
            s: statistics.median(r[name] for r in runs[s])
            if all(name in r for r in runs[s])
            else None
            for s in sides
        }
        a, b = (values[sides[0]], values[sides[1]]) if len(sides) > 1 else (None, None)
        out[name] = {**values, "ratio": a / b if a is not None and b else None}
    return out


def write_report(scenario: str, report: dict) -> Path:
    """``results/<date>-<scenario>-<machine>.json`` with the machine's facts added."""
    RESULTS.mkdir(exist_ok=True)
    tag = f"{platform.system().lower()}-{platform.machine()}-{os.cpu_count()}cpu"
    path = RESULTS / f"{dt.date.today().isoformat()}-{scenario}-{tag}.json"
    full = {
        "machine": machine(),
        "backend": "mlx metal" if platform.system() == "Darwin" else "mlx cpu",
        "blas": blas_library(),
        **report,
    }
    path.write_text(json.dumps(full, indent=2) + "\n")
    return path
