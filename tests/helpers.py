"""Test helpers: scripted model outputs and a small model with head_dim 64."""

import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import mlx.core as mx
import mlx.nn as nn

from phi3v_mlx.models.phi3v import Model, ModelConfig
from tests.conftest import MODELS


class ScriptedHead(nn.Module):
    """An LM head that makes the i-th single-position forward pick ``script[i]``."""

    def __init__(self, head: nn.Module, script: list[int]):
        super().__init__()
        self.head = head
        self.script = script
        self.calls = 0

    def __call__(self, h: mx.array) -> mx.array:
        logits = self.head(h)
        if h.shape[-2] != 1:  # a prefill chunk whose logits generation never reads
            return logits
        if self.calls < len(self.script):
            boost = mx.zeros((logits.shape[-1],)).at[self.script[self.calls]].add(1e4)
            logits = logits + boost.astype(logits.dtype)
        self.calls += 1
        return logits


def scripted(model: Model, script: list[int]) -> ScriptedHead:
    """Put a scripted LM head on the model; ``model.language.lm_head = h.head`` undoes it."""
    head = ScriptedHead(model.language.lm_head, script)
    model.language.lm_head = head
    return head


def wide_head_model() -> Model:
    """A random model shaped like the tiny one but with head_dim 64 (KV-cache quantizable)."""
    values = json.loads((MODELS / "tiny-phi3v" / "config.json").read_text())
    values.update(hidden_size=128, num_attention_heads=2, num_key_value_heads=2)
    values["rope_scaling"]["short_factor"] = [1.0] * 32
    values["rope_scaling"]["long_factor"] = [2.0] * 32
    mx.random.seed(0)
    model = Model(ModelConfig.from_dict(values))
    mx.eval(model.parameters())
    return model


def mlx_vlm_with_tiny_tower(monkeypatch):
    """mlx-vlm, its phi3_v vision tower sized like the tiny fixtures' (it always builds CLIP
    ViT-L otherwise), as ``tests/fixtures/mlx_vlm`` was made."""
    import types

    from mlx_vlm.models.phi3_v import vision

    config = json.loads((MODELS / "tiny-phi3v" / "config.json").read_text())
    tower = types.SimpleNamespace(model_type="phi3_v", **{
        k: config["vision_config"][k]
        for k in ("hidden_size", "image_size", "intermediate_size", "layer_norm_eps",
                  "num_attention_heads", "num_channels", "num_hidden_layers", "patch_size")
    })  # fmt: skip
    width = 4 * tower.hidden_size
    original = vision.VisionModel.__init__

    def tiny_init(self, model_config):
        original(self, model_config)
        self.image_dim_out = tower.hidden_size
        self.glb_GN = mx.zeros([1, 1, width])
        self.sub_GN = mx.zeros([1, 1, 1, width])
        hidden = model_config.hidden_size
        self.img_projection = [nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, hidden)]

    monkeypatch.setattr(vision.VisionModel, "CLIP_VIT_LARGE_PATCH14_336_CONFIG", tower)
    monkeypatch.setattr(vision.VisionModel, "__init__", tiny_init)
    import mlx_vlm

    return mlx_vlm


def count_vision_runs(model, monkeypatch) -> list[int]:
    """A list that receives the number of crops of every vision-tower run of the model."""
    runs = []
    original = model.vision.crop_features

    def counting(pixel_values, *rest):
        runs.append(pixel_values.shape[0])
        return original(pixel_values, *rest)

    monkeypatch.setattr(model.vision, "crop_features", counting)
    return runs


def check_logit_summaries(logits, out, tol) -> None:
    """Per-position top-5 logits, logsumexp and argmax against a golden file's."""
    import numpy as np

    top = np.take_along_axis(logits, out["top5_ids"].astype(np.int64), axis=-1)
    np.testing.assert_allclose(top, out["top5_logits"], **tol)
    peak = logits.max(-1, keepdims=True)
    lse = np.log(np.exp(logits - peak).sum(-1)) + peak[:, 0]
    np.testing.assert_allclose(lse, out["logsumexp"], **tol)
    np.testing.assert_array_equal(logits.argmax(-1), out["argmax"])


def free_port() -> int:
    """A loopback port nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def serving(model, processor, **settings) -> Iterator[str]:
    """``phi3v serve``'s app for ``model`` on a free loopback port in this process (its
    ``ServerSettings`` from ``settings``), stopped after the block; yields its base URL."""
    import uvicorn

    from phi3v_mlx.server import ServerSettings, create_app

    app = create_app(model, processor, ServerSettings(model_name="tiny", **settings))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert time.time() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
