"""Phi-4-mini or Phi-3-small (full width, float32) side by side with mlx-lm: prefill and decode.

    python benchmarks/make_checkpoint.py --model phi-4-mini-instruct --dtype float32 \\
        --decoder-layers 8 --out /work/ckpt/phi4-mini-8l-f32
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 \\
        python benchmarks/bench_text_family.py --checkpoint /work/ckpt/phi4-mini-8l-f32 \\
        --prompt-tokens 1000

The same token ids go to both sides, every stop id cleared so both decode ``--max-tokens``
tokens: prefill speed is the prompt over the time to the first token, decode speed the tokens after
the first over the time they took; each side warms up on the prompt's first 128 ids first. Each
side reads the prompt with its own default chunk size (phi3v-mlx 256 positions on the CPU,
mlx-lm 2048) unless ``--mlx-lm-prefill-step`` says otherwise. mlx-lm's side decodes with the
checkpoint's tokenizer as phi3v-mlx loads it (mlx-lm cannot load Phi-3-small's tiktoken
tokenizer without its remote code), and its ``phi3small`` head runs patched as in
``text_divergence.py`` (the original line crashes on the CPU backend).

``--dense`` (Phi-3-small) adds a third side: phi3v-mlx on the same weights with every layer dense
(``dense_attention_every_n_layers`` 1, the weights linked beside the checkpoint), what the
block-sparse layers cost or save against dense attention.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

from bench_text import timed
from common import alternate, combine, metric_table, print_result, run_worker, write_report

NAMES = ["load_s", "prefill_s", "prefill_tps", "decode_tps", "peak_gb"]
OURS, PEER, DENSE = "phi3v_mlx", "mlx_lm", "phi3v_mlx_dense"
WARM_UP = 128


def prompt_ids(checkpoint: Path, length: int) -> list[int]:
    """The first ``length`` ids of a chat prompt asking to summarize a long text (tokenized
    whole, then cut: the text alone may run past the model's context)."""
    import phi3v_mlx

    processor = phi3v_mlx.loader.load_processor(checkpoint)
    words = " ".join(["lighthouse"] * length)
    text = processor.apply_chat_template([{"role": "user", "content": f"Summarize: {words}"}])
    return processor.tokenizer.encode(text)[:length]


def dense_copy(checkpoint: Path) -> Path:
    """The checkpoint with every layer attending densely: a sibling folder whose files link to
    the checkpoint's, but for a config with ``dense_attention_every_n_layers`` 1."""
    out = checkpoint.with_name(checkpoint.name + "-dense")
    if not out.is_dir():
        out.mkdir()
        for file in checkpoint.iterdir():
            if file.name != "config.json":
                (out / file.name).symlink_to(file.resolve())
        config = json.loads((checkpoint / "config.json").read_text())
        config["dense_attention_every_n_layers"] = 1
        (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def worker(side: str, checkpoint: Path, ids: list[int], max_tokens: int, peer_step: int | None):
    import mlx.core as mx

    import phi3v_mlx

    started = time.perf_counter()
    if side == PEER:
        import mlx_lm
        from text_divergence import mlx_lm_model

        model = mlx_lm_model(checkpoint)
        tokenizer = phi3v_mlx.loader.load_processor(checkpoint).tokenizer
        tokenizer.eos_token_ids = set()
        options = {"prefill_step_size": peer_step} if peer_step else {}

        def stream(prompt, n):
            return mlx_lm.stream_generate(model, tokenizer, prompt, max_tokens=n, **options)
    else:
        model, processor = phi3v_mlx.load(dense_copy(checkpoint) if side == DENSE else checkpoint)
        processor.stop_ids = set()

        def stream(prompt, n):
            return phi3v_mlx.stream_generate(model, processor, prompt, max_tokens=n)

    out = {"load_s": time.perf_counter() - started}
    if side != PEER:  # the answer's text set-up each generation pays before its first token
        from phi3v_mlx.generate import AnswerText

        started = time.perf_counter()
        AnswerText(processor)
        out["answer_setup_s"] = time.perf_counter() - started
    timed(stream(ids[:WARM_UP], 2))
    mx.reset_peak_memory()
    first, times = timed(stream(ids, max_tokens))
    out["prefill_s"] = first
    out["prefill_tps"] = len(ids) / first
    out["decode_tps"] = (len(times) - 1) / (times[-1] - times[0])
    out["generated"] = len(times)
    out["peak_gb"] = mx.get_peak_memory() / 1e9
    out["max_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--prompt-tokens", type=int, default=1000)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--mlx-lm-prefill-step", type=int, help="mlx-lm's prefill chunk")
    parser.add_argument("--dense", action="store_true", help="also every layer dense (ours)")
    parser.add_argument("--note", default="", help="what was cut, for the results file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    ids = prompt_ids(args.checkpoint, args.prompt_tokens)
    if len(ids) < args.prompt_tokens:
        raise SystemExit(f"error: the prompt is {len(ids)} tokens, not {args.prompt_tokens}")
    if args.worker:
        result = worker(
            args.worker, args.checkpoint, ids, args.max_tokens, args.mlx_lm_prefill_step
        )
        print_result(result)
    config = json.loads((args.checkpoint / "config.json").read_text())
    sides = [OURS, PEER] + ([DENSE] if args.dense else [])
    runs = {side: [] for side in sides}
    common = ["--checkpoint", str(args.checkpoint), "--prompt-tokens", str(args.prompt_tokens)]
    common += ["--max-tokens", str(args.max_tokens)]
    if args.mlx_lm_prefill_step:
        common += ["--mlx-lm-prefill-step", str(args.mlx_lm_prefill_step)]
    for r, side in alternate(sides, args.runs):
        print(f"run {r + 1}: {side} ...", flush=True)
        runs[side].append(run_worker(Path(__file__), ["--worker", side, *common]))
        print(f"  {runs[side][-1]}", flush=True)
    metrics = combine(runs, NAMES)
    print(metric_table(metrics, sides))
    report = {
        "model": config.get("_name_or_path"),
        "checkpoint": str(args.checkpoint),
        "decoder_layers": config["num_hidden_layers"],
        "dtype": config.get("torch_dtype"),
        "note": args.note,
        "runs": args.runs,
        "prompt_tokens": len(ids),
        "max_tokens": args.max_tokens,
        "mlx_lm_prefill_step": args.mlx_lm_prefill_step,
        "sides": runs,
        "metrics": metrics,
    }
    if args.dense:
        sparse, dense = metrics["prefill_s"][OURS], metrics["prefill_s"][DENSE]
        report["sparse_over_dense_prefill_s"] = sparse / dense
        print(f"prefill, block-sparse layers over all dense: {sparse / dense:.2f}")
    scenario = f"text-{config.get('_name_or_path')}-{args.prompt_tokens // 1000}k"
    print(f"wrote {write_report(scenario, report)}")


if __name__ == "__main__":
    main()
