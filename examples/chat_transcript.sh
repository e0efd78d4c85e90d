#!/usr/bin/env bash
# A scripted multi-turn chat: phi3v chat reads its turns from a pipe.
#   examples/chat_transcript.sh                                   # the default 4-bit model
#   examples/chat_transcript.sh tests/fixtures/models/tiny-phi35v # offline, random weights
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
model="${1:-mlx-community/Phi-3.5-vision-instruct-4bit}"
image="${2:-$here/../tests/fixtures/images/b_small.png}"
phi3v chat --model "$model" --max-tokens 64 <<TURNS
/image $image
What is in this image?
What colours stand out?
/clear
Write a haiku about a lighthouse.
/exit
TURNS
