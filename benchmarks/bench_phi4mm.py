"""Phi-4-multimodal side by side with mlx-vlm's ``phi4mm`` on one checkpoint: an image, speech.

    flock /tmp/bench.lock env LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 \\
        python benchmarks/bench_phi4mm.py --checkpoint /work/ckpt/phi4mm-4l-f32 --scenario images
    (the same with --scenario speech, then --scenario transcribe)

The checkpoint is a random-weight one in the Hub's remote-code layout (``make_checkpoint.py
--model phi-4-multimodal-instruct``), which both libraries read. Each run is a fresh worker
process per library, the libraries alternating; both get the same chat-formatted prompt, media
files and greedy decoding, each through its public API with its own processor (ours: dynamic HD
crops at the processor config's ``dynamic_hd``; mlx-vlm: its NaFlex resize). Scenarios:

- images: time to first token for one 1280x960 image, decode tokens/s, peak memory;
- speech: time to first token for a 30 s and a 5 min clip (synthetic 16 kHz WAV), the audio
  encoder's seconds per minute of audio (features to projected embeddings, log-mel extraction
  excluded), decode tokens/s (30 s clip), peak memory;
- transcribe (ours alone): the real-time factor ``phi3v transcribe --verbose`` reports on the
  5 min clip (model load excluded; ``--max-tokens`` caps the random model's endless answer).

A case mlx-vlm cannot run records its error line instead of a number.
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from bench import make_images
from common import alternate, combine, machine, metric_table, print_result, run_worker, write_report

HERE = Path(__file__).resolve()
SIDES = ("phi3v_mlx", "mlx_vlm")
QUESTION = "Describe the image."
INSTRUCTION = "Transcribe the audio to text."  # phi3v transcribe's instruction
CLIPS = {"30s": 30, "5min": 300}
METRICS = {
    "images": ["load_s", "image_ttft_s", "image_prompt_tokens", "decode_tps", "peak_gb", "rss_gb"],
    "speech": ["load_s", "ttft_30s_s", "ttft_5min_s", "prompt_tokens_5min", "encoder_s_per_min",
               "decode_tps", "peak_gb", "rss_gb"],
}  # fmt: skip


def chat(tag: str, question: str) -> str:
    """One user turn in Phi-4's chat format (the checkpoint's template renders the same)."""
    return f"<|user|>{tag}{question}<|end|><|assistant|>"


def make_clip(folder: Path, seconds: int) -> Path:
    """A 16 kHz 16-bit mono WAV: a wandering tone with harmonics over noise."""
    import soundfile

    rng = np.random.default_rng(seconds)
    t = np.arange(seconds * 16_000) / 16_000
    pitch = 150 + 50 * np.sin(2 * np.pi * 0.3 * t)
    phase = 2 * np.pi * np.cumsum(pitch) / 16_000
    wave = sum(np.sin(k * phase) / k for k in (1, 2, 3)) * (0.5 + 0.5 * np.sin(2 * np.pi * 2 * t))
    wave = 0.3 * wave + 0.02 * rng.standard_normal(t.size)
    path = folder / f"clip_{seconds}s.wav"
    soundfile.write(path, (0.5 * wave).astype(np.float32), 16_000, subtype="PCM_16")
    return path


# ---------------------------------------------------------------- the two libraries


class Ours:
    """phi3v-mlx through its public API."""

    def __init__(self, checkpoint: Path):
        import phi3v_mlx

        self.lib = phi3v_mlx
        self.model, self.processor = phi3v_mlx.load(checkpoint)

    def stream(self, prompt: str, image: Path | None, audio: Path | None, tokens: int) -> Iterator:
        return self.lib.stream_generate(
            self.model, self.processor, prompt, images=[image] if image else None,
            audios=[audio] if audio else None, max_tokens=tokens, temperature=0.0,
        )  # fmt: skip

    def positions(self, prompt: str, image: Path | None, first: object) -> int:
        """Positions the prompt takes in the decoder."""
        return first.prompt_tokens

    def encoder(self, audio: Path) -> Callable[[], object]:
        """A call running the audio encoder and speech projection on the clip's features."""
        inputs = self.processor(chat("<|audio_1|>", INSTRUCTION), audios=[audio])
        features, sizes = inputs["audio_features"], inputs["audio_embed_sizes"]
        return lambda: self.model.audio_embed(features, sizes, inputs["audio_attention_mask"])


def pad_detokenizer_vocabulary(size: int) -> None:
    """Let mlx-vlm's BPE streaming detokenizer take a vocabulary with unassigned ids.

    mlx-vlm 0.7.10 sizes its id-to-token table by the vocabulary's length, so the stand-in
    Phi-4 tokenizer (o200k's ranks and Phi-4's special tokens: ids 199998, 200000-200009 and
    200012-200017 have no token) fails at load with IndexError (see ``detokenizer_error``); this
    hands it the vocabulary with a placeholder for every unassigned id below ``size``. Text
    output only: no computation changes."""
    from mlx_vlm import tokenizer_utils

    original = tokenizer_utils.BPEStreamingDetokenizer.__init__

    def init(self, tokenizer, trim_space=False):
        vocab = dict(tokenizer.vocab)
        taken = set(vocab.values())
        vocab.update({f"<|unassigned_{i}|>": i for i in range(size) if i not in taken})
        original(self, SimpleNamespace(vocab=vocab), trim_space)

    tokenizer_utils.BPEStreamingDetokenizer.__init__ = init


def detokenizer_error(checkpoint: Path) -> str | None:
    """The error mlx-vlm's processor load gives on this checkpoint unpatched, if any."""
    code = ("import sys, pathlib, mlx_vlm.models.phi4mm; from mlx_vlm.utils import "
            "load_processor; load_processor(pathlib.Path(sys.argv[1]))")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code, str(checkpoint)], capture_output=True)
    lines = done.stderr.decode(errors="replace").strip().splitlines()
    return lines[-1] if done.returncode else None


class Theirs:
    """mlx-vlm through its public API; its stream ends with one extra result repeating the last
    token, not counted here."""

    def __init__(self, checkpoint: Path):
        import mlx_vlm

        config = json.loads((checkpoint / "config.json").read_text())
        pad_detokenizer_vocabulary(config["vocab_size"])
        self.lib = mlx_vlm
        self.model, self.processor = mlx_vlm.load(str(checkpoint))

    def stream(self, prompt: str, image: Path | None, audio: Path | None, tokens: int) -> Iterator:
        results = self.lib.stream_generate(
            self.model, self.processor, prompt, image=[str(image)] if image else None,
            audio=[str(audio)] if audio else None, max_tokens=tokens, temperature=0.0,
        )  # fmt: skip
        return (r for r in results if r.finish_reason is None)

    def positions(self, prompt: str, image: Path | None, first: object) -> int:
        """Positions the prompt takes in the decoder (its count is of ids, one per image)."""
        if image is None:
            return first.prompt_tokens
        from PIL import Image

        inputs = self.processor(text=prompt, images=[Image.open(image).convert("RGB")])
        h, w = np.asarray(inputs["spatial_shapes"])[0].tolist()
        return int(np.asarray(inputs["input_ids"]).size) - 1 + h * w

    def encoder(self, audio: Path) -> Callable[[], object]:
        """A call running the audio encoder and speech projection on the clip's features."""
        from mlx_vlm.utils import load_audio

        wave = load_audio(str(audio), sr=16_000)
        features = self.processor.audio_processor([(wave, 16_000)])["input_audio_embeds"]

        def run() -> object:
            encoded, _ = self.model.audio_encoder(features, None)
            return self.model.audio_projection(encoded, mode="speech")

        return run


# ---------------------------------------------------------------- one worker


def timed(stream: Iterator) -> tuple[list[float], list]:
    """Arrival time of every chunk from the call, and the chunks."""
    start = time.perf_counter()
    times, chunks = [], []
    for chunk in stream:
        times.append(time.perf_counter() - start)
        chunks.append(chunk)
    return times, chunks


def error_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:300]


def worker(side: str, scenario: str, checkpoint: Path, max_tokens: int) -> dict:
    """Every case of one scenario for one library, in this process."""
    import mlx.core as mx

    folder = Path(tempfile.mkdtemp())
    start = time.perf_counter()
    try:
        lib = (Ours if side == "phi3v_mlx" else Theirs)(checkpoint)
    except Exception as e:
        return {"errors": {"load": error_line(e)}}
    out: dict = {"load_s": time.perf_counter() - start, "errors": {}}
    timed(lib.stream(chat("", "Hi"), None, None, 2))  # warm-up
    peaks = []

    def case(name: str, run: Callable[[], None]) -> None:
        mx.reset_peak_memory()
        try:
            run()
        except Exception as e:  # a case the library cannot run is reported, not fatal
            out["errors"][name] = error_line(e)
        peaks.append(mx.get_peak_memory() / 1e9)

    def answer(prompt: str, image: Path | None, audio: Path | None, tokens: int, key: str):
        times, chunks = timed(lib.stream(prompt, image, audio, tokens))
        out[f"{key}_s"] = times[0]
        if tokens > 1 and len(times) > 2:
            out["decode_tps"] = (len(times) - 1) / (times[-1] - times[0])
        return lib.positions(prompt, image, chunks[0])

    if scenario == "images":
        image = make_images(folder)["landscape"]

        def one_image() -> None:
            tokens = answer(chat("<|image_1|>", QUESTION), image, None, max_tokens, "image_ttft")
            out["image_prompt_tokens"] = tokens

        case("image", one_image)
    else:
        clips = {name: make_clip(folder, seconds) for name, seconds in CLIPS.items()}
        prompt = chat("<|audio_1|>", INSTRUCTION)
        case("30s", lambda: answer(prompt, None, clips["30s"], max_tokens, "ttft_30s"))

        def long_clip() -> None:
            out["prompt_tokens_5min"] = answer(prompt, None, clips["5min"], 1, "ttft_5min")

        case("5min", long_clip)

        def encoder() -> None:
            run = lib.encoder(clips["5min"])
            begin = time.perf_counter()
            mx.eval(run())
            out["encoder_s_per_min"] = (time.perf_counter() - begin) / (CLIPS["5min"] / 60)

        case("encoder", encoder)
    out["peak_gb"] = max(peaks)
    out["rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    return out


def transcribe_rtf(checkpoint: Path, max_tokens: int) -> dict:
    """``phi3v transcribe`` on the 5 min clip: its reported real-time factor and the wall time
    of the whole command (model load included)."""
    clip = make_clip(Path(tempfile.mkdtemp()), CLIPS["5min"])
    command = [sys.executable, "-m", "phi3v_mlx", "transcribe", str(clip), "--model",
               str(checkpoint), "--max-tokens", str(max_tokens), "--verbose"]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    found = re.search(r"real-time factor ([0-9.]+)", done.stderr)
    if done.returncode != 0 or found is None:
        return {"error": done.stderr.strip().splitlines()[-1:] or [f"exit {done.returncode}"]}
    return {"rtf": float(found.group(1)), "command_s": wall, "max_tokens": max_tokens,
            "audio_s": CLIPS["5min"]}  # fmt: skip


# ---------------------------------------------------------------- the driver


def layout(checkpoint: Path) -> dict:
    config = json.loads((checkpoint / "config.json").read_text())
    layers = f"{config['num_hidden_layers']} of 32 (full width)"
    return {"dtype": config.get("torch_dtype"), "decoder_layers": layers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--scenario", choices=[*METRICS, "transcribe"], required=True)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--note", default="", help="what was cut, for the results file")
    parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        result = worker(args.worker, args.scenario, args.checkpoint, args.max_tokens)
        print_result(result)
    if args.scenario == "transcribe":
        result = transcribe_rtf(args.checkpoint, args.max_tokens)
        print(f"phi3v transcribe, 5 min clip: {result}")
        report = {"scenario": "transcribe", "checkpoint": str(args.checkpoint),
                  "note": args.note, **layout(args.checkpoint), "transcribe": result}  # fmt: skip
        print(f"wrote {write_report('phi4mm-transcribe', report)}")
        return

    unpatched = detokenizer_error(args.checkpoint)
    runs: dict[str, list[dict]] = {side: [] for side in SIDES}
    shared = ["--scenario", args.scenario, "--checkpoint", str(args.checkpoint),
              "--max-tokens", str(args.max_tokens)]  # fmt: skip
    for r, side in alternate(SIDES, args.runs):
        print(f"run {r + 1}/{args.runs}: {side} ...", flush=True)
        runs[side].append(run_worker(HERE, ["--worker", side, *shared]))
    errors = {side: {k: v for run in runs[side] for k, v in run.pop("errors").items()}
              for side in SIDES}  # fmt: skip
    metrics = combine(runs, METRICS[args.scenario])
    report = {
        "scenario": args.scenario,
        "checkpoint": str(args.checkpoint),
        **layout(args.checkpoint),
        "runs": args.runs,
        "max_tokens": args.max_tokens,
        "note": args.note,
        "metrics": metrics,
        "errors": {side: e for side, e in errors.items() if e},
        "mlx_vlm_unpatched_load": unpatched or "ok",
        "mlx_vlm_patch": None
        if unpatched is None
        else " ".join(pad_detokenizer_vocabulary.__doc__.split()),
        "per_run": runs,
    }
    print(metric_table(metrics, SIDES))
    if any(errors.values()):
        print(f"errors: {json.dumps(errors, indent=1)}")
    print(f"machine: {machine()}; {report['dtype']}; decoder layers {report['decoder_layers']}")
    print(f"wrote {write_report(f'phi4mm-{args.scenario}', report)}")


if __name__ == "__main__":
    main()
