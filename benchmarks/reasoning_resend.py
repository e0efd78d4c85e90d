"""What re-sending the reasoning costs a Phi-4-reasoning-vision chat, in tokens.

A three-turn conversation about one 1280x960 image, every answer in THINK mode, is rendered with
the model's chat template (phi3v_mlx's phi4rv processor) and counted with Phi-4's tokenizer:
cl100k_base and the chat's added tokens at their ids (the ``tiktoken`` package's cl100k_base rank
file, read locally). For both policies of ``ChatSession`` (``keep_reasoning`` False, the default:
the answer alone goes back; True: the answer as generated, thought included) it reports each
turn's prompt (context) and the positions read, the chat session reusing its cache up to the
longest common prefix. The thoughts are an example's: a real model's are often far longer, and
the cost of keeping them grows with their length.

    python benchmarks/reasoning_resend.py [--checkpoint tests/fixtures/phi4rv/models/tiny-phi4rv]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import tiktoken_ext
from PIL import Image
from tiktoken import Encoding
from tiktoken.load import load_tiktoken_bpe

from phi3v_mlx.keys import common_prefix
from phi3v_mlx.models.phi4rv import ModelConfig, load_processor

ROOT = Path(__file__).resolve().parents[1]
CL100K_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
# Phi-4's added tokens the chat uses (the phi4rv fixture README's ids; </think> is taken to be
# the id after <think>, as in Phi-4-reasoning). One id each: only their count matters here.
ADDED = {
    "<|endoftext|>": 100257,
    "<|im_start|>": 100264,
    "<|im_end|>": 100265,
    "<|im_sep|>": 100266,
    "<think>": 100280,
    "</think>": 100281,
    "<|dummy_84|>": 100348,
}

TURNS = [
    (
        "What is the total on this receipt, and does it add up?",
        "The receipt lists four items: coffee beans at 14.50, oat milk at 3.20, a croissant at "
        "2.80 and a sandwich at 7.90. Adding them: 14.50 + 3.20 = 17.70; 17.70 + 2.80 = 20.50; "
        "20.50 + 7.90 = 28.40. The subtotal printed is 28.40, which matches. Tax is shown as 8% "
        "of the subtotal: 0.08 x 28.40 = 2.272, rounded to 2.27. The printed tax is 2.27. The "
        "total should be 28.40 + 2.27 = 30.67, and the printed total is 30.67. Let me double "
        "check the croissant line: the digits are slightly blurred, it could read 2.80 or 2.30; "
        "with 2.30 the subtotal would be 27.90, which does not match the printed 28.40, so 2.80 "
        "is the consistent reading. Everything adds up.",
        "The total is 30.67: a subtotal of 28.40 plus 8% tax (2.27). The items add up to the "
        "printed subtotal, so the receipt is consistent.",
    ),
    (
        "How much would it be without the sandwich?",
        "Without the sandwich the items are 14.50 + 3.20 + 2.80 = 20.50. Tax at 8%: 0.08 x 20.50 "
        "= 1.64. Total: 20.50 + 1.64 = 22.14. The tax rate is the one printed on the receipt, so "
        "it applies the same way to the smaller subtotal.",
        "Without the sandwich: 20.50 plus 1.64 tax, 22.14 in all.",
    ),
    (
        "Split the original total between three people.",
        "The original total is 30.67. Divided by three: 30.67 / 3 = 10.2233... Rounding to "
        "cents gives 10.22 each, which sums to 30.66, one cent short. So two people pay 10.22 "
        "and one pays 10.23, or everyone pays 10.23 and there is one cent over. The fairest "
        "split that covers the total exactly is 10.23 + 10.22 + 10.22.",
        "About 10.22 each: two pay 10.22 and one pays 10.23, which covers 30.67 exactly.",
    ),
]


class Phi4Tokenizer:
    """cl100k_base with the chat's added tokens, as the processor calls a tokenizer."""

    bos_token_id = None

    def __init__(self):
        found = [Path(d) / "data" / "cl100k_base.tiktoken" for d in tiktoken_ext.__path__]
        ranks = next(path for path in found if path.is_file())
        self.encoding = Encoding("phi4", pat_str=CL100K_PATTERN,
                                 mergeable_ranks=load_tiktoken_bpe(str(ranks)),
                                 special_tokens=ADDED)  # fmt: skip

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode(text, allowed_special="all")


def conversation_costs(processor, image_slots: int, keep: bool) -> list[dict[str, int]]:
    """Per turn: the prompt's tokens, the positions read (after the cache's common prefix) and
    the generated tokens, under one re-send policy."""
    messages, cache, rows = [], [], []
    for k, (question, thought, answer) in enumerate(TURNS):
        content = [{"type": "text", "text": question}]
        if k == 0:
            content.insert(0, {"type": "image"})
        messages.append({"role": "user", "content": content})
        prompt = processor.apply_chat_template(messages, thinking="on")
        ids = processor.tokenize(prompt, [image_slots])
        reused = min(common_prefix(cache, ids), len(ids) - 1)
        generated = f"\n{thought}\n</think>\n\n{answer}"
        out = processor.tokenizer.encode(generated) + [ADDED["<|im_end|>"]]
        rows.append({"prompt": len(ids), "read": len(ids) - reused, "generated": len(out) - 1})
        cache = ids + out
        messages.append({"role": "assistant", "content": "<think>" + generated if keep else answer})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path,
                        default=ROOT / "tests/fixtures/phi4rv/models/tiny-phi4rv")  # fmt: skip
    args = parser.parse_args()
    processor = load_processor(args.checkpoint, ModelConfig.from_file(args.checkpoint))
    processor.tokenizer = Phi4Tokenizer()
    slots = processor.image_tokens(Image.new("RGB", (1280, 960)))
    result = {"image_slots": slots}
    for keep in (False, True):
        rows = conversation_costs(processor, slots, keep)
        result["keep" if keep else "drop"] = {
            "turns": rows,
            "total_read": sum(r["read"] for r in rows),
            "last_prompt": rows[-1]["prompt"],
        }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
