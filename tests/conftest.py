"""Shared fixtures: the tiny golden checkpoints and the official outputs, loaded once."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import phi3v_mlx

FIXTURES = Path(__file__).parent / "fixtures"
MODELS = FIXTURES / "models"
GOLDEN = FIXTURES / "golden"
IMAGES = FIXTURES / "images"
CONFIGS = FIXTURES / "configs"
VARIANTS = ["tiny-phi3v", "tiny-phi35v"]
MANIFEST = json.loads((GOLDEN / "manifest.json").read_text(encoding="utf-8"))
CASES = list(MANIFEST["cases"])
TEXT = FIXTURES / "text"
TEXT_MANIFEST = json.loads((TEXT / "golden" / "manifest.json").read_text(encoding="utf-8"))
TEXT_VARIANTS = list(TEXT_MANIFEST["variants"])
TEXT_CASES = list(TEXT_MANIFEST["cases"])


def open_image(name: str) -> Image.Image:
    image = Image.open(IMAGES / f"{name}.png")
    image.load()
    return image


def golden(variant: str, case: str):
    return np.load(GOLDEN / variant / f"case_{case}.npz")


def golden_inputs(case: str):
    return np.load(GOLDEN / "inputs" / f"case_{case}.npz")


def case_inputs(processor, case: str) -> dict:
    """Model inputs of a golden case, built through the processor when the case has a prompt."""
    import mlx.core as mx

    meta = MANIFEST["cases"][case]
    if meta.get("text") is None:
        ids = golden_inputs(case)["input_ids"].astype(np.int32)
        return {"input_ids": mx.array(ids)}
    images = [open_image(n) for n in meta["images"]]
    return processor(meta["text"], images=images or None, num_crops=meta["num_crops"])


def expected_greedy(variant: str, case: str) -> list[int]:
    """Greedy tokens of one forward over the whole sequence at every step."""
    out = golden(variant, case)
    key = "greedy_nocache_tokens" if "greedy_nocache_tokens" in out.files else "greedy_tokens"
    return out[key].reshape(-1).tolist()


_loaded: dict = {}
MEASURED: list[str] = []  # lines a test measured, printed once after the run


def pytest_terminal_summary(terminalreporter):
    if MEASURED:
        terminalreporter.section("measured")
        for line in MEASURED:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session", params=VARIANTS)
def variant(request) -> str:
    return request.param


def load_variant(variant: str):
    """(model, processor) of a variant in float32, the precision the goldens were made in."""
    if variant not in _loaded:
        folder = TEXT / "models" / variant
        folder = folder if folder.is_dir() else MODELS / variant
        _loaded[variant] = phi3v_mlx.load(folder, dtype="float32")
    return _loaded[variant]


@pytest.fixture(scope="session")
def loaded(variant):
    return load_variant(variant)


@pytest.fixture(scope="session")
def processor():
    return phi3v_mlx.load(MODELS / "tiny-phi3v", dtype="float32")[1]
