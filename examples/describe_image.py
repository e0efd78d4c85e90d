"""Describe an image with the Python API, then ask a follow-up question in the same chat.

    python examples/describe_image.py photo.jpg
    python examples/describe_image.py tests/fixtures/images/b_small.png \
        --model tests/fixtures/models/tiny-phi35v          # offline, random weights
"""

import argparse

import phi3v_mlx


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("image")
    parser.add_argument("--model", default="mlx-community/Phi-3.5-vision-instruct-4bit")
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args()

    model, processor = phi3v_mlx.load(args.model)

    # One-shot: the prompt is already in the chat format, images named by their tags.
    prompt = "<|user|>\n<|image_1|>\nDescribe this image.<|end|>\n<|assistant|>\n"
    result = phi3v_mlx.generate(model, processor, prompt, images=[args.image],
                                max_tokens=args.max_tokens)  # fmt: skip
    print(result.text)
    print(f"({result.generation_tokens} tokens, {result.generation_tps:.1f} tokens/s)")

    # A chat keeps the image and the KV cache: the follow-up does not re-read the image.
    chat = phi3v_mlx.ChatSession(model, processor)
    chat.send("What is in this image?", images=[args.image], max_tokens=args.max_tokens)
    for chunk in chat.stream("What colours stand out?", max_tokens=args.max_tokens):
        print(chunk.text, end="", flush=True)
    print()


if __name__ == "__main__":
    main()
