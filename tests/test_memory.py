"""Peak memory and the wired limit stay right with several generations in flight."""

import mlx.core as mx

import phi3v_mlx
from phi3v_mlx import memory
from phi3v_mlx.memory import PeakMemory

PROMPT = "<|user|>\nHello<|end|>\n<|assistant|>\n"


def _allocate(megabytes: int) -> mx.array:
    array = mx.zeros((megabytes * 250_000,), dtype=mx.float32)
    mx.eval(array)
    return array


def test_each_watch_sees_the_peak_of_its_own_lifetime():
    held = mx.get_active_memory() / 1e9  # what earlier tests keep loaded
    first = PeakMemory()
    big = _allocate(400)
    del big
    second = PeakMemory()  # resets MLX's counter; the first watch keeps what it saw
    small = _allocate(40)
    assert first.gb >= held + 0.4
    assert second.gb < held + 0.2
    first.close()
    seen_by_first = first.gb
    larger = _allocate(800)
    assert second.gb >= held + 0.8
    assert first.gb == seen_by_first < held + 0.8  # closed: it no longer watches
    second.close()
    del small, larger


def test_generations_report_their_own_peak_when_interleaved(loaded):
    model, processor = loaded
    first = phi3v_mlx.stream_generate(model, processor, PROMPT, max_tokens=6)
    next(first)
    big = _allocate(500)
    del big
    second = phi3v_mlx.stream_generate(model, processor, PROMPT, max_tokens=6)
    last_second = list(second)[-1]
    last_first = list(first)[-1]
    assert last_first.peak_memory >= 0.5
    assert last_second.peak_memory < 0.5


def test_wired_limit_is_restored_by_the_last_generation_out(loaded, monkeypatch):
    model, processor = loaded
    calls = []
    monkeypatch.setattr(
        memory, "maybe_set_recommended_wired_limit", lambda: calls.append("raise") or 1234
    )
    monkeypatch.setattr(memory.mx, "set_wired_limit", lambda limit: calls.append(limit) or 0)
    first = phi3v_mlx.stream_generate(model, processor, PROMPT, max_tokens=5)
    second = phi3v_mlx.stream_generate(model, processor, PROMPT, max_tokens=5)
    next(first)
    next(second)
    assert calls == ["raise"]
    list(first)
    assert calls == ["raise"]  # the second generation still runs: the limit stays
    list(second)
    assert calls == ["raise", 1234]
    list(phi3v_mlx.stream_generate(model, processor, PROMPT, max_tokens=2))
    assert calls == ["raise", 1234, "raise", 1234]
