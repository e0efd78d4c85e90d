"""Phi-4-multimodal's speech tower: the conformer audio encoder and the two audio projections,
computed as the reference (``Phi4MultimodalAudioModel``, ``Phi4MultimodalAudioEmbedding``) does,
long recordings in bounded memory."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ...config import ConfigError, config_from_dict

MAX_STEPS = 500  # the encoder attends within chunks of at most 500 steps (40 s of audio)
SUBSAMPLE_STEPS = 128  # encoder steps subsampled at once (the first convolution's output is 32x)
CHECKPOINT_PREFIX = "model.embed_tokens_extend.audio_embed."

ACTIVATIONS: dict[str, Callable[[mx.array], mx.array]] = {
    "swish": nn.silu,
    "silu": nn.silu,
    "relu": nn.relu,
    "gelu": nn.gelu,
    "sigmoid": mx.sigmoid,
}

Progress = Callable[[int, int], None]


@dataclass
class AudioConfig:
    """The audio encoder's settings (``audio_config`` of a native config.json)."""

    hidden_size: int = 1024
    intermediate_size: int = 1536
    num_blocks: int = 24
    num_attention_heads: int = 16
    activation: str = "swish"
    chunk_size: int = -1
    left_chunk: int = 18
    ext_pw_out_channel: int = 1024
    depthwise_separable_out_channel: int = 1024
    depthwise_multiplier: int = 1
    kernel_size: int = 3
    conv_activation: str = "swish"
    input_size: int = 80
    conv_glu_type: str = "swish"
    time_reduction: int = 8
    bias_max_distance: int = 1000
    bias_symmetric: bool = False
    nemo_activation: str = "relu"
    nemo_conv_channels: int = 1024
    downsample_rate: int = 1
    audio_token_id: int = 200011

    def __post_init__(self):
        for key in ("activation", "conv_activation", "conv_glu_type", "nemo_activation"):
            if getattr(self, key) not in ACTIVATIONS:
                raise ConfigError(f"audio_config {key} {getattr(self, key)!r} is not supported")
        if self.time_reduction < 2 or self.time_reduction & (self.time_reduction - 1):
            raise ConfigError(
                f"audio_config time_reduction must be a power of 2, not {self.time_reduction}"
            )
        if self.chunk_size > 0:
            raise ConfigError("audio_config chunk_size > 0 (streaming attention) is not supported")
        if self.downsample_rate != 1:
            raise ConfigError("audio_config downsample_rate other than 1 is not supported")

    @property
    def stages(self) -> int:
        """Stride-2 convolution stages of the subsampling."""
        return int(math.log2(self.time_reduction))

    @property
    def subsampled_mels(self) -> int:
        """Mel bins left after the subsampling (80 -> 10)."""
        size = self.input_size
        for _ in range(self.stages):
            size = (size - 1) // 2 + 1
        return size

    @classmethod
    def from_model_config(cls, config: Mapping[str, Any]) -> AudioConfig:
        """The audio settings of a Phi-4-multimodal config.json, native (``audio_config``) or as the
        Hub's remote code writes it (``audio_processor.config`` and ``embd_layer``)."""
        if "audio_config" in config:
            return config_from_dict(cls, dict(config["audio_config"]))
        remote = (config.get("audio_processor") or {}).get("config")
        if remote is None:
            raise ConfigError("config.json has neither audio_config nor audio_processor")
        values = dict(remote)
        renames = {
            "attention_dim": "hidden_size",
            "attention_heads": "num_attention_heads",
            "linear_units": "intermediate_size",
            "depthwise_seperable_out_channel": "depthwise_separable_out_channel",
        }
        for old, new in renames.items():
            if old in values:
                values[new] = values.pop(old)
        if "nemo_conv_settings" in values:
            values["nemo_conv_channels"] = values["nemo_conv_settings"]["conv_channels"]
        if "relative_attention_bias_args" in values:
            bias = values["relative_attention_bias_args"]
            values["bias_max_distance"] = bias.get("t5_bias_max_distance", cls.bias_max_distance)
            values["bias_symmetric"] = bias.get("t5_bias_symmetric", cls.bias_symmetric)
        embedding = (config.get("embd_layer") or {}).get("audio_embd_layer") or {}
        values["downsample_rate"] = embedding.get("downsample_rate", 1)
        return config_from_dict(cls, values)


def encoder_steps(frames: int, config: AudioConfig) -> int:
    """Encoder output steps for ``frames`` feature frames."""
    return math.ceil(frames / config.time_reduction)


class Activation(nn.Module):
    """A named activation as a module (a parameterless entry of a layer list)."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name

    def __call__(self, x: mx.array) -> mx.array:
        return ACTIVATIONS[self.name](x)


class MeanVarianceNorm(nn.Module):
    """Per-mel-bin normalization with the stored global mean and inverse deviation."""

    def __init__(self, size: int):
        super().__init__()
        self.global_mean = mx.zeros((size,))
        self.global_invstd = mx.ones((size,))

    def __call__(self, x: mx.array) -> mx.array:
        return (x - self.global_mean) * self.global_invstd


class ConvSubsampling(nn.Module):
    """Stride-2 convolutions over (time, mel) that divide time by ``time_reduction``, then a
    linear layer over channels x remaining mel bins."""

    def __init__(self, config: AudioConfig):
        super().__init__()
        channels = config.nemo_conv_channels
        act = config.nemo_activation
        self.conv = [nn.Conv2d(1, channels, 3, stride=2, padding=1), Activation(act)]
        for _ in range(config.stages - 1):
            self.conv += [
                nn.Conv2d(channels, channels, 3, stride=2, padding=1, groups=channels),
                nn.Conv2d(channels, channels, 1),
                Activation(act),
            ]
        self.out = nn.Linear(channels * config.subsampled_mels, config.hidden_size)

    def __call__(self, x: mx.array) -> mx.array:
        """[n, frames, mels] -> [n, ceil(frames / time_reduction), hidden]."""
        x = x[..., None]
        for layer in self.conv:
            x = layer(x)
        n, steps, mels, channels = x.shape
        return self.out(x.transpose(0, 1, 3, 2).reshape(n, steps, channels * mels))


class RelativeBias(nn.Module):
    """T5-style learned bias per head and clipped relative position (key minus query)."""

    def __init__(self, config: AudioConfig):
        super().__init__()
        self.max_distance = config.bias_max_distance
        self.symmetric = config.bias_symmetric
        buckets = self.max_distance * (1 if self.symmetric else 2)
        self.bias_values = nn.Embedding(buckets, config.num_attention_heads)

    def __call__(self, length: int) -> mx.array:
        """[1, heads, length, length]."""
        positions = mx.arange(length)
        relative = mx.clip(
            positions[None, :] - positions[:, None], -self.max_distance, self.max_distance - 1
        )
        index = mx.abs(relative) if self.symmetric else relative + self.max_distance
        return self.bias_values(index).transpose(2, 0, 1)[None]


class FeedForward(nn.Module):
    """Layer norm, a gated linear unit (first half times activation of the second), down proj."""

    def __init__(self, config: AudioConfig):
        super().__init__()
        self.layer_norm = nn.LayerNorm(config.hidden_size)
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = ACTIVATIONS[config.activation]

    def __call__(self, x: mx.array) -> mx.array:
        up, gate = mx.split(self.gate_up_proj(self.layer_norm(x)), 2, axis=-1)
        return self.down_proj(up * self.act(gate))


class Attention(nn.Module):
    """Multi-head self-attention with biases and an additive mask; no rotary."""

    def __init__(self, config: AudioConfig):
        super().__init__()
        hidden = config.hidden_size
        self.heads = config.num_attention_heads
        self.scale = (hidden // self.heads) ** -0.5
        self.q_proj = nn.Linear(hidden, hidden)
        self.k_proj = nn.Linear(hidden, hidden)
        self.v_proj = nn.Linear(hidden, hidden)
        self.o_proj = nn.Linear(hidden, hidden)

    def __call__(self, x: mx.array, mask: mx.array) -> mx.array:
        n, length, hidden = x.shape

        def heads(t: mx.array) -> mx.array:
            return t.reshape(n, length, self.heads, -1).transpose(0, 2, 1, 3)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(n, length, hidden))


class GluPointwise(nn.Module):
    """Pointwise projection to two halves: (first + b1) * activation(second + b2)."""

    def __init__(self, config: AudioConfig):
        super().__init__()
        self.ext_pw_conv_1d = nn.Linear(config.hidden_size, 2 * config.ext_pw_out_channel)
        self.b1 = mx.zeros((config.ext_pw_out_channel,))
        self.b2 = mx.zeros((config.ext_pw_out_channel,))
        self.act = ACTIVATIONS[config.conv_glu_type]

    def __call__(self, x: mx.array) -> mx.array:
        first, second = mx.split(self.ext_pw_conv_1d(x), 2, axis=-1)
        return (first + self.b1) * self.act(second + self.b2)


class DepthwiseSeparable(nn.Module):
    """A depthwise convolution padded on both sides, then a pointwise one."""

    def __init__(self, config: AudioConfig):
        super().__init__()
        hidden, k = config.hidden_size, config.kernel_size
        width = hidden * config.depthwise_multiplier
        self.dw_conv = nn.Conv1d(hidden, width, k, padding=k - 1, groups=hidden)
        self.pw_conv = nn.Linear(width, config.depthwise_separable_out_channel)

    def __call__(self, x: mx.array) -> mx.array:
        return self.pw_conv(self.dw_conv(x))


class ConvModule(nn.Module):
    """The conformer convolution: GLU, causal depthwise-separable convolution (the last
    kernel_size - 1 steps of the padded output dropped), activation, pointwise projection."""

    def __init__(self, config: AudioConfig):
        super().__init__()
        self.trim = config.kernel_size - 1
        self.layer_norm = nn.LayerNorm(config.hidden_size)
        self.glu = GluPointwise(config)
        self.dw_sep_conv_1d = DepthwiseSeparable(config)
        self.ext_pw_conv_1d = nn.Linear(config.hidden_size, config.ext_pw_out_channel)
        self.act = ACTIVATIONS[config.conv_activation]

    def __call__(self, x: mx.array) -> mx.array:
        x = self.dw_sep_conv_1d(self.glu(self.layer_norm(x)))
        if self.trim:
            x = x[:, : -self.trim]
        return self.ext_pw_conv_1d(self.act(x))


class ConformerBlock(nn.Module):
    """Half feed-forward, self-attention, convolution, half feed-forward, final layer norm."""

    def __init__(self, config: AudioConfig):
        super().__init__()
        self.feed_forward_in = FeedForward(config)
        self.self_attn = Attention(config)
        self.conv = ConvModule(config)
        self.feed_forward_out = FeedForward(config)
        self.layer_norm_att = nn.LayerNorm(config.hidden_size)
        self.layer_norm = nn.LayerNorm(config.hidden_size)

    def __call__(self, x: mx.array, mask: mx.array) -> mx.array:
        x = x + 0.5 * self.feed_forward_in(x)
        x = x + self.self_attn(self.layer_norm_att(x), mask)
        x = x + self.conv(x)
        x = x + 0.5 * self.feed_forward_out(x)
        return self.layer_norm(x)


class AudioEncoder(nn.Module):
    """The conformer encoder: log-mel features [n, frames, 80] to [n, ceil(frames / 8), hidden].

    Sequences longer than 500 steps are cut into 500-step chunks encoded independently (the last
    one zero-padded), as the reference does; chunks are computed a group at a time, so memory
    stays bounded whatever the length.
    """

    def __init__(self, config: AudioConfig, chunks_per_group: int = 4):
        super().__init__()
        self.config = config
        self.chunks_per_group = chunks_per_group
        self.encoder_embedding = MeanVarianceNorm(config.input_size)
        self.embed = ConvSubsampling(config)
        self.relative_attention_bias_layer = RelativeBias(config)
        self.encoders = [ConformerBlock(config) for _ in range(config.num_blocks)]

    def subsample(self, features: Any, start: int, stop: int) -> mx.array:
        """Normalized and subsampled steps ``start..stop-1`` of features [n, frames, mels] (numpy
        or MLX), computed from the frames they depend on only (one step of left context): equal
        to slicing the output for the whole sequence."""
        r = self.config.time_reduction
        first = max(0, (start - 1) * r)
        frames = mx.array(features[:, first : stop * r], dtype=mx.float32)
        out = self.embed(self.encoder_embedding(frames))
        return out[:, start - first // r : stop - first // r]

    def pieces(
        self, features: Any, mask: Any = None, progress: Progress | None = None
    ) -> Iterator[tuple[int, mx.array]]:
        """(clip, encoder output [steps, hidden]) pieces in order, each clip's pieces covering
        its ceil(frames / 8) steps (the batch's padded length); ``mask`` [n, frames] marks valid
        frames (None: all valid). ``progress(done_steps, total_steps)`` after each piece."""
        n, frames = features.shape[:2]
        steps = encoder_steps(frames, self.config)
        if mask is None:  # every step valid, a long clip's chunk padding too (as the reference)
            valid = [math.inf] * n
        else:
            counts = np.asarray(mask).astype(bool).reshape(n, frames).sum(axis=1)
            valid = [encoder_steps(int(c), self.config) for c in counts]
        chunk = min(steps, MAX_STEPS)
        group = chunk * self.chunks_per_group
        bias = self.relative_attention_bias_layer(chunk)
        total, done = n * steps, 0
        for i in range(n):
            for start in range(0, steps, group):
                stop = min(steps, start + group)
                parts = []
                for a in range(start, stop, SUBSAMPLE_STEPS):  # bounded convolution buffers
                    b = min(stop, a + SUBSAMPLE_STEPS)
                    parts.append(self.subsample(features[i : i + 1], a, b)[0])
                    mx.eval(parts[-1])
                rows = -(-(stop - start) // chunk)
                x = mx.pad(mx.concatenate(parts), [(0, rows * chunk - (stop - start)), (0, 0)])
                position = start + mx.arange(rows * chunk).reshape(rows, 1, 1, chunk)
                key_mask = (position < valid[i]).astype(mx.float32)
                x = self.blocks(x.reshape(rows, chunk, -1), bias + key_mask)
                x = x.reshape(rows * chunk, -1)[: stop - start]
                mx.eval(x)
                done += stop - start
                if progress is not None:
                    progress(done, total)
                yield i, x

    def blocks(self, x: mx.array, mask: mx.array) -> mx.array:
        """The conformer blocks over chunks [rows, chunk, hidden] with an additive mask."""
        for block in self.encoders:
            x = block(x, mask)
        return x

    def __call__(
        self, features: Any, mask: Any = None, progress: Progress | None = None
    ) -> mx.array:
        """Encoder outputs [n, ceil(frames / 8), hidden] (the last block's output)."""
        clips: list[list[mx.array]] = []
        for i, piece in self.pieces(features, mask, progress):
            if i == len(clips):
                clips.append([])
            clips[i].append(piece)
        return mx.stack([mx.concatenate(parts) for parts in clips])


class AudioEmbedding(nn.Module):
    """The audio encoder and its two projections to the decoder's width: the speech pair for audio
    without images, the vision-speech pair when images are given too."""

    def __init__(self, config: AudioConfig, text_hidden_size: int, chunks_per_group: int = 4):
        super().__init__()
        hidden = config.hidden_size * config.downsample_rate
        self.encoder = AudioEncoder(config, chunks_per_group)
        self.up_proj_for_speech = nn.Linear(hidden, text_hidden_size)
        self.down_proj_for_speech = nn.Linear(text_hidden_size, text_hidden_size)
        self.up_proj_for_vision_speech = nn.Linear(hidden, text_hidden_size)
        self.down_proj_for_vision_speech = nn.Linear(text_hidden_size, text_hidden_size)

    def project(self, x: mx.array, vision: bool = False) -> mx.array:
        """Encoder outputs to decoder embeddings: up projection, exact GELU, down projection."""
        if vision:
            up, down = self.up_proj_for_vision_speech, self.down_proj_for_vision_speech
        else:
            up, down = self.up_proj_for_speech, self.down_proj_for_speech
        return down(nn.gelu(up(x)))

    def __call__(
        self,
        audio_features: Any,
        audio_embed_sizes: Any,
        audio_attention_mask: Any = None,
        vision: bool = False,
        progress: Progress | None = None,
    ) -> list[mx.array]:
        """Per clip, the embeddings [audio_embed_sizes[i], text_hidden] that fill its audio
        token slots; ``vision`` selects the vision-speech projection (images in the input)."""
        sizes = [int(s) for s in np.asarray(audio_embed_sizes).reshape(-1)]
        clips: list[list[mx.array]] = [[] for _ in sizes]
        kept = [0] * len(sizes)
        for i, piece in self.encoder.pieces(audio_features, audio_attention_mask, progress):
            piece = piece[: max(0, sizes[i] - kept[i])]
            if piece.shape[0]:
                kept[i] += piece.shape[0]
                clips[i].append(self.project(piece, vision))
                mx.eval(clips[i][-1])
        if kept != sizes:
            raise ValueError(f"audio_embed_sizes {sizes} exceed the encoder outputs {kept}")
        return [mx.concatenate(parts) for parts in clips]


# Hub remote-code names -> native names (the remote code's Sequential indices and linear names).
REMOTE_NAMES = [
    (re.compile(r"\.feed_forward_(in|out)\.net\.0\.linear\."), r".feed_forward_\1.gate_up_proj."),
    (re.compile(r"\.feed_forward_(in|out)\.net\.2\."), r".feed_forward_\1.down_proj."),
    (re.compile(r"\.self_attn\.linear_([qkv])\."), r".self_attn.\1_proj."),
    (re.compile(r"\.self_attn\.linear_out\."), r".self_attn.o_proj."),
    (re.compile(r"^audio_projection\.speech\.0\."), "up_proj_for_speech."),
    (re.compile(r"^audio_projection\.speech\.2\."), "down_proj_for_speech."),
    (re.compile(r"^audio_projection\.vision\.0\."), "up_proj_for_vision_speech."),
    (re.compile(r"^audio_projection\.vision\.2\."), "down_proj_for_vision_speech."),
]
POINTWISE_CONV1D = re.compile(
    r"\.(glu\.ext_pw_conv_1d|conv\.ext_pw_conv_1d|dw_sep_conv_1d\.pw_conv)\.weight$"
)


def audio_weight_name(name: str) -> str | None:
    """The AudioEmbedding name of a checkpoint tensor (native or Hub remote-code layout), None
    for a tensor outside the audio tower."""
    if not name.startswith(CHECKPOINT_PREFIX):
        return None
    name = name[len(CHECKPOINT_PREFIX) :]
    for pattern, replacement in REMOTE_NAMES:
        name = pattern.sub(replacement, name)
    return name


def sanitize(weights: Mapping[str, mx.array]) -> dict[str, mx.array]:
    """The audio tower's tensors of a checkpoint under AudioEmbedding names, in MLX layouts
    (convolutions channels-last, pointwise 1-D convolutions as linear weights, GLU biases flat);
    tensors outside the audio tower are left out. Either layout of each tensor is accepted."""
    out = {}
    for name, value in weights.items():
        new = audio_weight_name(name)
        if new is None:
            continue
        if new.endswith(("glu.b1", "glu.b2")):
            value = value.reshape(-1)
        elif POINTWISE_CONV1D.search(new) and value.ndim == 3:
            value = value[:, :, 0] if value.shape[2] == 1 else value[:, 0, :]
        elif value.ndim == 3 and new.endswith("dw_conv.weight") and value.shape[1] == 1:
            value = value.transpose(0, 2, 1)  # PyTorch [out, 1, k] -> MLX [out, k, 1]
        elif (
            value.ndim == 4
            and value.shape[2] == value.shape[3]
            and value.shape[1] != value.shape[2]
        ):
            value = value.transpose(0, 2, 3, 1)  # PyTorch OIHW -> MLX OHWI
        out[new] = value
    return out
