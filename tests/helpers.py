"""Test helpers: scripted model outputs and a small model with head_dim 64."""

import json

import mlx.core as mx
import mlx.nn as nn

from phi3v_mlx.config import ModelConfig
from phi3v_mlx.model import Model
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
