"""One model split across the ranks of an ``mlx.launch`` run (tensor parallelism over
``mx.distributed``).

Each decoder layer keeps 1/N of the attention heads and of the MLP columns (of every expert's,
for Phi-3.5-MoE) on each of N ranks; the attention output and the MLP output are summed across
the ranks (one all-sum each per layer). Embeddings, norms, the LM head and the media encoders
stay whole on every rank. Key-value heads are split when N divides their number and repeated
(one per rank) when their number divides N; other counts are refused.
"""

from __future__ import annotations

import pickle
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.nn.layers.distributed import shard_inplace, shard_linear
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

LINEARS = (nn.Linear, nn.QuantizedLinear)
SWITCH_LINEARS = (SwitchLinear, QuantizedSwitchLinear)


class ShardError(ValueError):
    """A model that cannot be split across the ranks of a group."""


class RankSummed(nn.Module):
    """A block each rank computes part of, its outputs summed across the group; the block's
    parameters keep their names (the wrapper holds the block's children as its own)."""

    def __init__(self, block: nn.Module, group: mx.distributed.Group):
        super().__init__()
        for name, child in block.children().items():
            setattr(self, name, child)
        object.__setattr__(self, "_block", block)
        self.group = group

    def __call__(self, x: mx.array) -> mx.array:
        return mx.distributed.all_sum(self._block(x), group=self.group)


def launch_group() -> mx.distributed.Group | None:
    """The group of the ``mlx.launch`` run this process belongs to, None when it runs alone."""
    group = mx.distributed.init()
    return group if group.size() > 1 else None


def shard_model(model: Any, group: mx.distributed.Group) -> None:
    """Split ``model`` (lazily loaded: nothing read yet) across the ranks of ``group``, and seed
    this thread's generator alike on every rank (:func:`seed_alike`)."""
    model.shard(group)
    seed_alike(group)


def seed_alike(group: mx.distributed.Group) -> None:
    """Seed the calling thread's MLX generator alike on every rank of ``group``, so unseeded
    sampling draws the same tokens on every rank. MLX keeps one generator per thread: a thread
    that samples for a split model, other than the one that loaded it, calls this first (on
    every rank, as every collective is called)."""
    seed = mx.random.randint(0, 2**31 - 1) if group.rank() == 0 else mx.array(0, mx.int32)
    mx.random.seed(int(mx.distributed.all_sum(seed, group=group, stream=mx.cpu).item()))


def shard_decoder(decoder: Any, group: mx.distributed.Group) -> None:
    """Split the layers of a Phi-3 decoder (``phi3v_mlx.models.phi3.LanguageModel``) across the
    ranks of ``group``, in place."""
    n = group.size()
    config = decoder.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    if heads % n:
        raise ShardError(f"{heads} attention heads cannot be split across {n} ranks")
    if kv_heads % n and n % kv_heads:
        raise ShardError(
            f"{kv_heads} key-value heads can neither be split across {n} ranks nor repeated "
            f"evenly on them: use a number of ranks that divides {kv_heads} or is a multiple of it"
        )
    if config.intermediate_size % n:
        raise ShardError(
            f"intermediate_size {config.intermediate_size} cannot be split across {n} ranks"
        )
    for i, layer in enumerate(decoder.layers):
        _shard_attention(layer.self_attn, f"layers.{i}.self_attn", group)
        if "block_sparse_moe" in layer:
            layer.block_sparse_moe = _shard_experts(
                layer.block_sparse_moe, f"layers.{i}.block_sparse_moe", group
            )
        else:
            _shard_mlp(layer.mlp, f"layers.{i}.mlp", group)


def _shard_attention(attn: nn.Module, where: str, group: mx.distributed.Group) -> None:
    n = group.size()
    repeat = 1 if attn.n_kv_heads % n == 0 else n // attn.n_kv_heads
    q_rows = attn.n_heads * attn.head_dim
    kv_rows = attn.n_kv_heads * attn.head_dim * repeat
    if "qkv_proj" in attn:
        qkv = _checked(attn.qkv_proj, LINEARS, f"{where}.qkv_proj")
        if repeat > 1:
            _repeat_kv(qkv, [q_rows, q_rows + kv_rows // repeat], attn.n_kv_heads, repeat)
        attn.qkv_proj = shard_linear(
            qkv, "all-to-sharded", segments=[q_rows, q_rows + kv_rows], group=group
        )
    else:
        for name in ("q_proj", "k_proj", "v_proj"):
            linear = _checked(attn[name], LINEARS, f"{where}.{name}")
            if repeat > 1 and name != "q_proj":
                _repeat_kv(linear, [0], attn.n_kv_heads, repeat)
            attn[name] = shard_linear(linear, "all-to-sharded", group=group)
    o_proj = _checked(attn.o_proj, LINEARS, f"{where}.o_proj")
    _check_quantized_input(o_proj, n, f"{where}.o_proj")
    attn.o_proj = shard_linear(o_proj, "sharded-to-all", group=group)
    attn.n_heads //= n
    attn.n_kv_heads = attn.n_kv_heads * repeat // n


def _repeat_kv(linear: nn.Module, starts: list[int], kv_heads: int, repeat: int) -> None:
    """Repeat, in place, each key-value head ``repeat`` times in a row in the output rows of
    ``linear``: the rows from ``starts[0]`` are [q | k | v] (k and v after the first start), or
    [k] (or [v]) alone when ``starts`` is [0]."""

    def expand(rows: mx.array) -> mx.array:
        if len(starts) == 1:
            return _repeat_heads(rows, kv_heads, repeat)
        q, k, v = mx.split(rows, starts, axis=0)
        return mx.concatenate(
            [q, _repeat_heads(k, kv_heads, repeat), _repeat_heads(v, kv_heads, repeat)], axis=0
        )

    linear.update({name: expand(value) for name, value in linear.parameters().items()})


def _repeat_heads(rows: mx.array, heads: int, repeat: int) -> mx.array:
    """``rows`` [heads * d, ...] with each head's block of d rows repeated ``repeat`` times."""
    blocks = rows.reshape(heads, -1, *rows.shape[1:])
    return mx.repeat(blocks, repeat, axis=0).reshape(-1, *rows.shape[1:])


def _shard_mlp(mlp: nn.Module, where: str, group: mx.distributed.Group) -> None:
    gate_up = _checked(mlp.gate_up_proj, LINEARS, f"{where}.gate_up_proj")
    down = _checked(mlp.down_proj, LINEARS, f"{where}.down_proj")
    _check_quantized_input(down, group.size(), f"{where}.down_proj")
    mlp.gate_up_proj = shard_linear(gate_up, "all-to-sharded", segments=2, group=group)
    mlp.down_proj = shard_linear(down, "sharded-to-all", group=group)


def _shard_experts(moe: nn.Module, where: str, group: mx.distributed.Group) -> RankSummed:
    """Every expert keeps 1/N of its columns on each rank (balanced whatever the routing); the
    router stays whole, and the weighted sum of the experts is summed across the ranks."""
    experts = moe.switch_mlp
    for name in ("gate_proj", "up_proj"):
        linear = _checked(experts[name], SWITCH_LINEARS, f"{where}.switch_mlp.{name}")
        shard_inplace(linear, "all-to-sharded", group=group)
    down = _checked(experts.down_proj, SWITCH_LINEARS, f"{where}.switch_mlp.down_proj")
    if "bias" in down:
        raise ShardError(f"{where}.switch_mlp.down_proj has a bias: it cannot be split")
    _check_quantized_input(down, group.size(), f"{where}.switch_mlp.down_proj")
    shard_inplace(down, "sharded-to-all", group=group)
    return RankSummed(moe, group)


def _checked(module: nn.Module, kinds: tuple[type, ...], where: str) -> nn.Module:
    if not isinstance(module, kinds):
        raise ShardError(
            f"{where} is a {type(module).__name__}: only plain or quantized linear layers are "
            "split across ranks (fuse adapters into the weights first)"
        )
    return module


def _check_quantized_input(module: nn.Module, n: int, where: str) -> None:
    """A quantized layer whose inputs are split must keep whole quantization groups."""
    if "scales" not in module:
        return
    inputs = module.weight.shape[-1] * 32 // module.bits
    if (inputs // n) % module.group_size:
        raise ShardError(
            f"{where}: {inputs} inputs quantized in groups of {module.group_size} cannot be "
            f"split across {n} ranks"
        )


def broadcast_text(text: str | None, group: mx.distributed.Group) -> str | None:
    """Rank 0's ``text`` (or None) on every rank."""
    data = broadcast_bytes(None if text is None else text.encode("utf-8"), group)
    return None if data is None else data.decode("utf-8")


def broadcast_object(value: Any, group: mx.distributed.Group) -> Any:
    """Rank 0's ``value`` (anything pickle takes; None too) on every rank."""
    data = pickle.dumps(value) if group.rank() == 0 else None
    return pickle.loads(broadcast_bytes(data, group))


def broadcast_bytes(data: bytes | None, group: mx.distributed.Group) -> bytes | None:
    """Rank 0's ``data`` (or None) on every rank: its length, then its bytes, summed with
    zeros from the others."""
    first = group.rank() == 0
    length = (-1 if data is None else len(data)) if first else 0
    length = int(_sum([length], group)[0])
    if length <= 0:
        return None if length < 0 else b""
    values = np.frombuffer(data, dtype=np.uint8) if first else np.zeros(length, dtype=np.uint8)
    summed = mx.distributed.all_sum(mx.array(values), group=group, stream=mx.cpu)
    return np.array(summed).tobytes()


def _sum(values: list[int], group: mx.distributed.Group) -> list[int]:
    array = mx.array(values, dtype=mx.int32)
    return mx.distributed.all_sum(array, group=group, stream=mx.cpu).tolist()
