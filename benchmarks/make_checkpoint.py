"""Write a random-weight Phi-3(.5)-Vision or Phi-4-multimodal checkpoint in the exact Hugging Face
layout.

Speed and memory depend on tensor sizes, not values, so benchmarks run on these. Tensors are drawn
and written one at a time (a full-size model never sits in memory), sharded like the releases.

    python benchmarks/make_checkpoint.py --model phi-3.5-vision-instruct --dtype float32 \\
        --out benchmarks/checkpoints/phi35v-f32
    python benchmarks/make_checkpoint.py --decoder-layers 4 --vision-layers 4 --out /tmp/quick
    python benchmarks/make_checkpoint.py --text --dtype float32 \\
        --out benchmarks/checkpoints/phi35-mini-f32

``--text`` writes the text model that Phi-3.5-vision's decoder is, Phi-3.5-mini (``model_type``
``phi3``): the vision config keys and tensors are left out.

``--model phi-4-multimodal-instruct`` writes the Hub repository's remote-code layout (``phi4mm``:
both LoRA adapters inside the decoder, SigLIP, the conformer audio encoder and their projections,
the real config.json), with the reconstructed stand-in Phi-4 tokenizer of the test fixtures and
its image and audio placeholders (``<|endoftext10|>``, ``<|endoftext11|>``) added:

    python benchmarks/make_checkpoint.py --model phi-4-multimodal-instruct --dtype float32 \\
        --decoder-layers 4 --out /work/ckpt/phi4mm-4l-f32

``--model phi-4-mini-instruct`` and ``--model phi-3-small-8k-instruct`` write the text models
(``phi3`` with partial rotary and tied embeddings; ``phi3small``): the keys of the tiny text
fixture's config.json with the real sizes, tensors named and shaped from that config, the
fixture's generation config and (Phi-4-mini) stand-in tokenizer:

    python benchmarks/make_checkpoint.py --model phi-3-small-8k-instruct --dtype float32 \\
        --decoder-layers 4 --out /work/ckpt/phi3-small-4l-f32

``--model phi-4-reasoning-vision-15b`` writes the Hub layout of ``phi4-siglip`` (the Phi-4
decoder, 5120 wide, untied head; SigLIP-2 so400m-patch16-naflex with its pooling head; the
``mlp2x_gelu`` projector), the real config keys and chat template of the test fixture, and
Phi-4's tokenizer rebuilt from cl100k_base with the chat's special tokens at Phi-4's ids:

    python benchmarks/make_checkpoint.py --model phi-4-reasoning-vision-15b --dtype float32 \\
        --decoder-layers 2 --out /work/ckpt/phi4rv-2l-f32
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx

from phi3v_mlx.convert import save_shards

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "tests" / "fixtures" / "configs"
STAND_IN_TOKENIZER = ROOT / "tests" / "fixtures" / "text" / "models" / "tiny-phi4-mini"
NEAR_ONE = re.compile(r"(norm|layrnorm|layer_norm\d|layer_norm_att)\.weight$|global_invstd$")
PHI4MM = "phi-4-multimodal-instruct"
PLACEHOLDERS = {200010: "<|endoftext10|>", 200011: "<|endoftext11|>"}
PHI4RV = "phi-4-reasoning-vision-15b"
PHI4RV_FIXTURE = ROOT / "tests" / "fixtures" / "phi4rv" / "models" / "tiny-phi4rv"
CL100K_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
# The chat's special tokens at Phi-4's ids (the phi4rv fixture README's; </think> the id after
# <think>, as in Phi-4-reasoning).
PHI4RV_SPECIAL = {"<|endoftext|>": 100257, "<|im_start|>": 100264, "<|im_end|>": 100265,
                  "<|im_sep|>": 100266, "<think>": 100280, "</think>": 100281,
                  "<|dummy_84|>": 100348, "<|dummy_85|>": 100349}  # fmt: skip


def tensor_list(
    decoder_layers: int | None, vision_layers: int | None, text: bool = False
) -> list[tuple[str, tuple]]:
    """Real tensor names and shapes, keeping only the first layers when asked (and no vision
    tensor for the text model)."""
    out = []
    for line in (CONFIGS / "tensor_names.txt").read_text().splitlines():
        name, shape = line.split("\t")
        if text and "vision_embed_tokens" in name:
            continue
        decoder = re.match(r"model\.layers\.(\d+)\.", name)
        vision = re.search(r"encoder\.layers\.(\d+)\.", name)
        if decoder and decoder_layers is not None and int(decoder.group(1)) >= decoder_layers:
            continue
        if vision and vision_layers is not None and int(vision.group(1)) >= vision_layers:
            continue
        out.append((name, tuple(json.loads(shape))))
    return out


def random_tensor(name: str, shape: tuple, dtype: mx.Dtype, key: mx.array) -> mx.array:
    """Values of the scale a trained model has, so no path meets overflow or denormals."""
    if NEAR_ONE.search(name):
        value = 1 + 0.1 * mx.random.normal(shape, key=key)
    elif name.endswith("_GN"):
        value = mx.random.normal(shape, key=key)
    elif name.endswith(".bias") or "embedding" in name or "embed_tokens." in name:
        value = 0.02 * mx.random.normal(shape, key=key)
    else:
        fan_in = 1
        for d in shape[1:]:
            fan_in *= d
        value = (0.5 / fan_in**0.5) * mx.random.normal(shape, key=key)
    return value.astype(dtype)


def phi4mm_tensors(decoder_layers: int | None) -> list[tuple[str, tuple]]:
    """Phi-4-multimodal-instruct's tensors as the Hub repository names them (remote code), the
    first ``decoder_layers`` decoder layers only when asked."""

    def biased(name: str, *shape: int) -> list[tuple[str, tuple]]:
        return [(f"{name}.weight", shape), (f"{name}.bias", shape[:1])]

    hidden, vit, audio = 3072, 1152, 1024  # decoder, SigLIP-400M, conformer widths
    decoder = {"self_attn.qkv_proj": (5120, hidden), "self_attn.o_proj": (hidden, hidden),
               "mlp.gate_up_proj": (2 * 8192, hidden), "mlp.down_proj": (hidden, 8192)}  # fmt: skip
    out = [("model.embed_tokens.weight", (200064, hidden)), ("model.norm.weight", (hidden,))]
    for i in range(32 if decoder_layers is None else decoder_layers):
        layer = f"model.layers.{i}."
        out += [(f"{layer}{n}_layernorm.weight", (hidden,)) for n in ("input", "post_attention")]
        for module, (rows, cols) in decoder.items():
            out.append((f"{layer}{module}.base_layer.weight", (rows, cols)))
            for adapter, rank in (("vision", 256), ("speech", 320)):
                out.append((f"{layer}{module}.lora_A.{adapter}.weight", (rank, cols)))
                out.append((f"{layer}{module}.lora_B.{adapter}.weight", (rows, rank)))

    image = "model.embed_tokens_extend.image_embed."
    tower = image + "img_processor."
    out += biased(tower + "embeddings.patch_embedding", vit, 3, 14, 14)
    out.append((tower + "embeddings.position_embedding.weight", (32 * 32, vit)))
    for i in range(27):
        layer = f"{tower}encoder.layers.{i}."
        out += biased(layer + "layer_norm1", vit) + biased(layer + "layer_norm2", vit)
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            out += biased(f"{layer}self_attn.{proj}", vit, vit)
        out += biased(layer + "mlp.fc1", 4304, vit) + biased(layer + "mlp.fc2", vit, 4304)
    head = tower + "head."
    out += biased(tower + "post_layernorm", vit) + biased(head + "layernorm", vit)
    out += [(head + "probe", (1, 1, vit)), (head + "attention.in_proj_weight", (3 * vit, vit))]
    out += [(head + "attention.in_proj_bias", (3 * vit,))]
    out += biased(head + "attention.out_proj", vit, vit)
    out += biased(head + "mlp.fc1", 4304, vit) + biased(head + "mlp.fc2", vit, 4304)
    # avg_pool_2d token compression: separators and projection are 1152 wide, not 4 x 1152
    out += [(image + "glb_GN", (1, 1, vit)), (image + "sub_GN", (1, 1, 1, vit))]
    out += biased(image + "img_projection.0", hidden, vit)
    out += biased(image + "img_projection.2", hidden, hidden)

    embed = "model.embed_tokens_extend.audio_embed."
    encoder = embed + "encoder."
    out += [(f"{encoder}encoder_embedding.global_{n}", (80,)) for n in ("mean", "invstd")]
    out.append((encoder + "relative_attention_bias_layer.bias_values.weight", (2 * 500, 16)))
    # dw_striding subsampling by 8: conv, act, then (depthwise, pointwise, act) twice
    out += biased(encoder + "embed.conv.0", audio, 1, 3, 3)
    for depthwise in (2, 5):
        out += biased(f"{encoder}embed.conv.{depthwise}", audio, 1, 3, 3)
        out += biased(f"{encoder}embed.conv.{depthwise + 1}", audio, audio, 1, 1)
    out += biased(encoder + "embed.out", audio, audio * 10)  # channels x 80 / 8 mel bins
    for i in range(24):
        block = f"{encoder}encoders.{i}."
        for ff in ("feed_forward_in", "feed_forward_out"):
            out += biased(f"{block}{ff}.layer_norm", audio)
            out += biased(f"{block}{ff}.net.0.linear", 2 * 1536, audio)
            out += biased(f"{block}{ff}.net.2", audio, 1536)
        for proj in ("linear_q", "linear_k", "linear_v", "linear_out"):
            out += biased(f"{block}self_attn.{proj}", audio, audio)
        conv = block + "conv."
        out += [(conv + "glu.b1", (1, audio, 1)), (conv + "glu.b2", (1, audio, 1))]
        out += biased(conv + "layer_norm", audio)
        out += biased(conv + "glu.ext_pw_conv_1d", 2 * audio, audio, 1)
        out += biased(conv + "dw_sep_conv_1d.dw_conv", audio, 1, 3)
        out += biased(conv + "dw_sep_conv_1d.pw_conv", audio, audio, 1)
        out += biased(conv + "ext_pw_conv_1d", audio, audio, 1)
        out += biased(block + "layer_norm_att", audio) + biased(block + "layer_norm", audio)
    for branch in ("speech", "vision"):
        out += biased(f"{embed}audio_projection.{branch}.0", hidden, audio)
        out += biased(f"{embed}audio_projection.{branch}.2", hidden, hidden)
    return out


LONG_FACTOR = [1, 1.118320672, 1.250641126, 1.398617824, 1.564103225, 1.74916897, 1.956131817,
               2.187582649, 2.446418898, 2.735880826, 3.059592084, 3.421605075, 3.826451687,
               4.279200023, 4.785517845, 5.351743533, 5.984965424, 6.693110555, 7.485043894,
               8.370679318, 9.36110372, 10.4687158, 11.70738129, 13.09260651, 14.64173252,
               16.37415215, 18.31155283, 20.47818807, 22.90118105, 25.61086418, 28.64115884,
               32.03, 32.1, 32.13, 32.23, 32.6, 32.61, 32.64, 32.66, 32.7, 32.71, 32.93, 32.97,
               33.28, 33.49, 33.5, 44.16, 47.77]  # fmt: skip


def phi4mm_config(decoder_layers: int | None, dtype: str) -> dict:
    """Phi-4-multimodal-instruct's config.json (remote code, ``phi4mm``)."""
    conformer = {
        "activation": "swish", "attention_dim": 1024, "attention_heads": 16, "batch_norm": False,
        "bias_in_glu": True, "causal": True, "chunk_size": -1, "cnn_layer_norm": True,
        "conv_activation": "swish", "conv_glu_type": "swish", "depthwise_multiplier": 1,
        "depthwise_seperable_out_channel": 1024, "dropout_rate": 0.0,
        "encoder_embedding_config": {"input_size": 80}, "ext_pw_kernel_size": 1,
        "ext_pw_out_channel": 1024, "input_layer": "nemo_conv", "input_size": 80,
        "kernel_size": 3, "left_chunk": 18, "linear_units": 1536,
        "nemo_conv_settings": {"conv_channels": 1024}, "num_blocks": 24,
        "relative_attention_bias_args": {"t5_bias_max_distance": 500, "type": "t5"},
        "time_reduction": 8,
    }  # fmt: skip
    lora = "((layers.*self_attn\\.(qkv|o)_proj)|(layers.*mlp\\.(gate_up|down)_proj))"
    return {
        "architectures": ["Phi4MMForCausalLM"], "model_type": "phi4mm", "attention_bias": False,
        "auto_map": {"AutoConfig": "configuration_phi4mm.Phi4MMConfig"},
        "attention_dropout": 0.0, "audio_processor": {"config": conformer, "name": "cascades"},
        "bos_token_id": 199999, "eos_token_id": 199999, "pad_token_id": 199999,
        "embd_layer": {
            "audio_embd_layer": {"compression_rate": 8, "downsample_rate": 1,
                                 "embedding_cls": "audio", "projection_cls": "mlp",
                                 "use_conv_downsample": False, "use_qformer": False},
            "embedding_cls": "image_audio",
            "image_embd_layer": {"crop_size": 448, "embedding_cls": "tune_image",
                                 "hd_transform_order": "sub_glb",
                                 "image_token_compression_cls": "avg_pool_2d",
                                 "projection_cls": "mlp", "use_hd_transform": True,
                                 "with_learnable_separator": True},
        },
        "embd_pdrop": 0.0, "full_attn_mod": 1, "hidden_act": "silu", "hidden_size": 3072,
        "initializer_range": 0.02, "intermediate_size": 8192, "interpolate_factor": 1,
        "lm_head_bias": False, "max_position_embeddings": 131072, "mlp_bias": False,
        "num_attention_heads": 24, "num_hidden_layers": decoder_layers or 32,
        "num_key_value_heads": 8, "original_max_position_embeddings": 4096,
        "partial_rotary_factor": 0.75, "resid_pdrop": 0.0, "rms_norm_eps": 1e-05,
        "rope_scaling": {"long_factor": LONG_FACTOR, "short_factor": [1.0] * 48,
                         "type": "longrope"},
        "rope_theta": 10000.0, "sliding_window": 262144, "tie_word_embeddings": True,
        "torch_dtype": dtype, "use_cache": True, "vocab_size": 200064,
        "vision_lora": {"dp": 0.0, "layer": lora, "lora_alpha": 512, "r": 256},
        "speech_lora": {"dp": 0.01, "layer": lora, "lora_alpha": 640, "r": 320},
    }  # fmt: skip


REMOTE_CONFIG = """from transformers import Phi3Config


class Phi4MMConfig(Phi3Config):
    \"\"\"Stands in for the Hub repository's remote configuration file.\"\"\"

    model_type = "phi4mm"
"""


def write_phi4mm_files(out: Path) -> None:
    """The processor settings, generation config, the stand-in Phi-4 tokenizer with the image
    and audio placeholders in both its vocabulary and its added tokens, and a stand-in for the
    remote configuration file (transformers reads config.json through it before a tokenizer)."""
    processor = {
        "image_processor_type": "Phi4MMImageProcessor", "processor_class": "Phi4MMProcessor",
        "feature_extractor_type": "Phi4MMAudioFeatureExtractor", "audio_compression_rate": 8,
        "audio_downsample_rate": 1, "audio_feat_stride": 1, "dynamic_hd": 36,
    }  # fmt: skip
    generation = {"bos_token_id": 199999, "eos_token_id": [200020, 199999], "pad_token_id": 199999}
    tokenizer = json.loads((STAND_IN_TOKENIZER / "tokenizer.json").read_text())
    settings = json.loads((STAND_IN_TOKENIZER / "tokenizer_config.json").read_text())
    for token_id, content in PLACEHOLDERS.items():
        entry = {"content": content, "single_word": False, "lstrip": False, "rstrip": False,
                 "normalized": False, "special": True}  # fmt: skip
        tokenizer["model"]["vocab"][content] = token_id
        tokenizer["added_tokens"].append({"id": token_id, **entry})
        settings["added_tokens_decoder"][str(token_id)] = entry
    for name, value in (("preprocessor_config.json", processor), ("tokenizer.json", tokenizer),
                        ("generation_config.json", generation),
                        ("tokenizer_config.json", settings)):  # fmt: skip
        (out / name).write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n")
    shutil.copy2(STAND_IN_TOKENIZER / "special_tokens_map.json", out)
    (out / "configuration_phi4mm.py").write_text(REMOTE_CONFIG)


PHI4MINI = "phi-4-mini-instruct"
PHI3SMALL = "phi-3-small-8k-instruct"
TEXT_FIXTURES = ROOT / "tests" / "fixtures" / "text" / "models"


def phi4mini_config(decoder_layers: int | None, dtype: str) -> dict:
    """Phi-4-mini-instruct's config.json: the tiny fixture's (the real key set and values) with
    the real sizes, context and 48-value rope factor lists put back."""
    config = json.loads((TEXT_FIXTURES / "tiny-phi4-mini" / "config.json").read_text())
    config.update(hidden_size=3072, intermediate_size=8192, num_attention_heads=24,
                  num_key_value_heads=8, num_hidden_layers=decoder_layers or 32,
                  original_max_position_embeddings=4096, max_position_embeddings=131072,
                  torch_dtype=dtype, _name_or_path=PHI4MINI)  # fmt: skip
    config["rope_scaling"].update(long_factor=LONG_FACTOR, short_factor=[1.0] * 48)
    return config


def phi3_text_tensors(config: dict) -> list[tuple[str, tuple]]:
    """The tensors of a ``phi3`` text checkpoint (fused qkv and gate_up), sized by its config;
    no head when the embeddings are tied."""
    hidden, width, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    qkv = (heads + 2 * kv_heads) * (hidden // heads)
    out = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(config["num_hidden_layers"]):
        layer = f"model.layers.{i}."
        out += [(f"{layer}{n}_layernorm.weight", (hidden,)) for n in ("input", "post_attention")]
        out += [(layer + "self_attn.qkv_proj.weight", (qkv, hidden)),
                (layer + "self_attn.o_proj.weight", (hidden, hidden)),
                (layer + "mlp.gate_up_proj.weight", (2 * width, hidden)),
                (layer + "mlp.down_proj.weight", (hidden, width))]  # fmt: skip
    out.append(("model.norm.weight", (hidden,)))
    if not config.get("tie_word_embeddings"):
        out.append(("lm_head.weight", (vocab, hidden)))
    return out


def phi3small_config(decoder_layers: int | None, dtype: str) -> dict:
    """Phi-3-small-8k-instruct's config.json: the tiny fixture's (the real key set and values)
    with the real sizes put back."""
    config = json.loads((TEXT_FIXTURES / "tiny-phi3-small" / "config.json").read_text())
    config.update(hidden_size=4096, ff_intermediate_size=14336, num_attention_heads=32,
                  num_key_value_heads=8, num_hidden_layers=decoder_layers or 32,
                  torch_dtype=dtype, _name_or_path=PHI3SMALL)  # fmt: skip
    return config


def phi3small_tensors(config: dict) -> list[tuple[str, tuple]]:
    """Phi-3-small's tensors (every Linear and LayerNorm biased, qkv fused, tied head), sized by
    its config."""
    hidden, width = config["hidden_size"], config["ff_intermediate_size"]
    vocab = config["vocab_size"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    qkv = (heads + 2 * kv_heads) * (hidden // heads)

    def biased(name: str, *shape: int) -> list[tuple[str, tuple]]:
        return [(f"{name}.weight", shape), (f"{name}.bias", shape[:1])]

    out = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(config["num_hidden_layers"]):
        layer = f"model.layers.{i}."
        out += biased(layer + "self_attn.query_key_value", qkv, hidden)
        out += biased(layer + "self_attn.dense", hidden, hidden)
        out += biased(layer + "mlp.up_proj", 2 * width, hidden)
        out += biased(layer + "mlp.down_proj", hidden, width)
        out += biased(layer + "input_layernorm", hidden)
        out += biased(layer + "post_attention_layernorm", hidden)
    return out + biased("model.final_layernorm", hidden)


def fixture_files(variant: str) -> Callable[[Path], None]:
    """A copier of the tiny text fixture's other files (generation config, and the stand-in
    tokenizer where it has one; Phi-3-small's tokenizer is tiktoken's)."""

    def copy(out: Path) -> None:
        for file in (TEXT_FIXTURES / variant).glob("*.json"):
            if file.name not in ("config.json", "model.safetensors.index.json"):
                shutil.copy2(file, out / file.name)

    return copy


# --model: the tiny fixture it takes keys and files from, its config, its tensors.
TEXT_MODELS = {
    PHI4MINI: ("tiny-phi4-mini", phi4mini_config, phi3_text_tensors),
    PHI3SMALL: ("tiny-phi3-small", phi3small_config, phi3small_tensors),
}


def phi4rv_tensors(
    decoder_layers: int | None, vision_layers: int | None
) -> list[tuple[str, tuple]]:
    """Phi-4-reasoning-vision-15B's tensors as the Hub repository names them: the Phi-4 decoder
    (untied head), the ``mlp2x_gelu`` projector and SigLIP-2 so400m-patch16-naflex with its
    post-layernorm and pooling head; only the first layers of each when asked."""
    hidden, kv, mlp, vocab = 5120, 10 * 128, 17920, 100352  # 40 heads and 10 KV heads of 128
    vit, vit_mlp, patch = 1152, 4304, 16 * 16 * 3

    def biased(name: str, *shape: int) -> list[tuple[str, tuple]]:
        return [(f"{name}.weight", shape), (f"{name}.bias", shape[:1])]

    out = [("model.embed_tokens.weight", (vocab, hidden)), ("lm_head.weight", (vocab, hidden))]
    for i in range(40 if decoder_layers is None else decoder_layers):
        layer = f"model.layers.{i}."
        out += [(f"{layer}{n}_layernorm.weight", (hidden,)) for n in ("input", "post_attention")]
        out += [(layer + "self_attn.qkv_proj.weight", (hidden + 2 * kv, hidden)),
                (layer + "self_attn.o_proj.weight", (hidden, hidden)),
                (layer + "mlp.gate_up_proj.weight", (2 * mlp, hidden)),
                (layer + "mlp.down_proj.weight", (hidden, mlp))]  # fmt: skip
    out.append(("model.norm.weight", (hidden,)))
    out += biased("model.mm_projector.0", hidden, vit) + biased(
        "model.mm_projector.2", hidden, hidden
    )
    tower = "model.vision_tower.vision_tower.vision_model."
    out += biased(tower + "embeddings.patch_embedding", vit, patch)
    out.append((tower + "embeddings.position_embedding.weight", (256, vit)))
    for i in range(27 if vision_layers is None else vision_layers):
        layer = f"{tower}encoder.layers.{i}."
        out += biased(layer + "layer_norm1", vit) + biased(layer + "layer_norm2", vit)
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            out += biased(f"{layer}self_attn.{proj}", vit, vit)
        out += biased(layer + "mlp.fc1", vit_mlp, vit) + biased(layer + "mlp.fc2", vit, vit_mlp)
    head = tower + "head."
    out += biased(tower + "post_layernorm", vit) + biased(head + "layernorm", vit)
    out += [(head + "probe", (1, 1, vit)), (head + "attention.in_proj_weight", (3 * vit, vit))]
    out += [(head + "attention.in_proj_bias", (3 * vit,))]
    out += biased(head + "attention.out_proj", vit, vit)
    out += biased(head + "mlp.fc1", vit_mlp, vit) + biased(head + "mlp.fc2", vit, vit_mlp)
    return out


def phi4rv_config(decoder_layers: int | None, vision_layers: int | None, dtype: str) -> dict:
    """The Hub's config.json: the tiny fixture's (the real key set and values) with the real
    sizes put back."""
    config = json.loads((PHI4RV_FIXTURE / "config.json").read_text())
    config.update(hidden_size=5120, intermediate_size=17920, num_attention_heads=40,
                  num_key_value_heads=10, num_hidden_layers=decoder_layers or 40,
                  mm_hidden_size=1152, dtype=dtype)  # fmt: skip
    config["vision_config"].update(hidden_size=1152, intermediate_size=4304,
                                   num_attention_heads=16,
                                   num_hidden_layers=vision_layers or 27)  # fmt: skip
    return config


def write_phi4rv_files(out: Path) -> None:
    """The real chat template, generation and preprocessor configs (the fixture's copies) and
    Phi-4's tokenizer rebuilt (its files are not public): cl100k_base from the ``tiktoken``
    package's local rank file, then the 96 added ids, the chat's special tokens at Phi-4's ids
    and placeholders between them."""
    import tiktoken_ext
    from transformers.convert_slow_tokenizer import TikTokenConverter

    for name in ("chat_template.jinja", "generation_config.json", "preprocessor_config.json"):
        shutil.copy2(PHI4RV_FIXTURE / name, out / name)
    ranks = [Path(d) / "data" / "cl100k_base.tiktoken" for d in tiktoken_ext.__path__]
    tokenizer = TikTokenConverter(vocab_file=str(next(p for p in ranks if p.is_file())),
                                  pattern=CL100K_PATTERN).converted()  # fmt: skip
    names = {token_id: name for name, token_id in PHI4RV_SPECIAL.items()}
    first = tokenizer.get_vocab_size()  # 100256: the added ids follow
    tokenizer.add_special_tokens([names.get(i, f"<|reserved_{i}|>") for i in range(first, 100352)])
    tokenizer.save(str(out / "tokenizer.json"))
    settings = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|endoftext|>",
                "eos_token": "<|im_end|>", "pad_token": "<|dummy_85|>"}  # fmt: skip
    (out / "tokenizer_config.json").write_text(json.dumps(settings, indent=2) + "\n")


def write_checkpoint(
    args: argparse.Namespace,
    names: list[tuple[str, tuple]],
    config: dict,
    write_files: Callable[[Path], None],
) -> None:
    """Random tensors of these names and shapes, drawn and written one at a time, sharded; the
    config; the model's other files."""
    dtype = getattr(mx, args.dtype)
    tensors = {
        name: random_tensor(name, shape, dtype, mx.random.key(args.seed * 100_003 + i))
        for i, (name, shape) in enumerate(names)
    }
    args.out.mkdir(parents=True, exist_ok=True)

    def report(done: int, total: int) -> None:
        print(f"  {done / 1e9:.2f} / {total / 1e9:.2f} GB", flush=True)

    total = save_shards(args.out, tensors, int(args.shard_gb * 1e9), report, fmt="pt")
    (args.out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    write_files(args.out)
    print(f"wrote {args.out}: {len(names)} tensors, {total / 1e9:.3f} GB of {args.dtype}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    models = ["phi-3.5-vision-instruct", "phi-3-vision-128k-instruct", PHI4MM, PHI4RV]
    models += list(TEXT_MODELS)
    parser.add_argument("--model", default=models[0], choices=models)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    parser.add_argument("--decoder-layers", type=int, help="keep only this many decoder layers")
    parser.add_argument("--vision-layers", type=int, help="keep only this many CLIP layers")
    parser.add_argument("--shard-gb", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--text", action="store_true", help="the text model (Phi-3.5-mini)")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)

    if args.out.exists() and any(args.out.iterdir()):
        sys.exit(f"error: {args.out} exists and is not empty")
    if args.model in TEXT_MODELS:
        if args.text or args.vision_layers is not None:
            parser.error(f"{args.model} takes neither --text nor --vision-layers")
        fixture, make_config, make_tensors = TEXT_MODELS[args.model]
        config = make_config(args.decoder_layers, args.dtype)
        write_checkpoint(args, make_tensors(config), config, fixture_files(fixture))
        return
    if args.model == PHI4RV:
        if args.text:
            parser.error(f"{PHI4RV} takes no --text")
        config = phi4rv_config(args.decoder_layers, args.vision_layers, args.dtype)
        names = phi4rv_tensors(args.decoder_layers, args.vision_layers)
        write_checkpoint(args, names, config, write_phi4rv_files)
        return
    if args.model == PHI4MM:
        if args.text or args.vision_layers is not None:
            parser.error(f"{PHI4MM} takes neither --text nor --vision-layers")
        config = phi4mm_config(args.decoder_layers, args.dtype)
        write_checkpoint(args, phi4mm_tensors(args.decoder_layers), config, write_phi4mm_files)
        return
    source = CONFIGS / args.model
    config = json.loads((source / "config.json").read_text())
    config["torch_dtype"] = args.dtype
    config["_attn_implementation"] = "eager"
    if args.decoder_layers is not None:
        config["num_hidden_layers"] = args.decoder_layers
    if args.vision_layers is not None:  # the real config has no vision_config: CLIP ViT-L/14-336
        config["vision_config"] = {"num_hidden_layers": args.vision_layers}
    if args.text:
        for key in ("embd_layer", "img_processor", "vision_config", "auto_map"):
            config.pop(key, None)
        config.update(model_type="phi3", architectures=["Phi3ForCausalLM"])
        config["rope_scaling"]["type"] = "longrope"

    def copy_files(out: Path) -> None:
        for file in source.iterdir():
            if file.name != "config.json" and not (args.text and "processor" in file.name):
                shutil.copy2(file, out / file.name)

    names = tensor_list(args.decoder_layers, args.vision_layers, args.text)
    write_checkpoint(args, names, config, copy_files)


if __name__ == "__main__":
    main()
