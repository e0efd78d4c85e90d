"""Convert Hugging Face Phi-3-Vision weights to MLX: the same program as ``phi3v convert``.

python convert.py --hf-path microsoft/Phi-3.5-vision-instruct --mlx-path phi35v-4bit -q
"""

import sys

from phi3v_mlx.cli import main

if __name__ == "__main__":
    main(["convert", *sys.argv[1:]])
