import json

import pytest

from phi3v_mlx.config import ConfigError
from phi3v_mlx.models.phi3v import ModelConfig
from tests.conftest import CONFIGS, MODELS


@pytest.mark.parametrize("name", ["phi-3-vision-128k-instruct", "phi-3.5-vision-instruct"])
def test_real_configs(name):
    config = ModelConfig.from_file(CONFIGS / name / "config.json")
    assert config.hidden_size == 3072 and config.num_hidden_layers == 32
    assert config.num_key_value_heads == 32 and config.head_dim == 96
    assert config.rope_scaling.type == "su"
    assert len(config.rope_scaling.short_factor) == len(config.rope_scaling.long_factor) == 48
    assert config.original_max_position_embeddings == 4096
    assert config.max_position_embeddings == 131072
    assert config.img_processor.layer_idx == -2 and config.img_processor.type_feature == "patch"
    assert config.img_processor.image_dim_out == 1024 and config.img_processor.num_img_tokens == 144
    assert config.embd_layer.hd_transform_order == "sub_glb"
    # No vision_config in the real files: CLIP ViT-L/14-336, of which 23 layers are used.
    assert config.vision_config.hidden_size == 1024 and config.vision_config.num_hidden_layers == 24
    assert config.clip_layers_used == 23
    assert config.rope_mscale == pytest.approx((1 + 3.4657359 / 8.3177662) ** 0.5, rel=1e-6)


def test_phi35_specific_keys():
    config = ModelConfig.from_file(CONFIGS / "phi-3.5-vision-instruct")
    assert config.pad_token_id == 32000
    other = ModelConfig.from_file(CONFIGS / "phi-3-vision-128k-instruct")
    assert config.rope_scaling.long_factor != other.rope_scaling.long_factor


def test_tiny_vision_config_overrides_defaults():
    config = ModelConfig.from_file(MODELS / "tiny-phi3v")
    assert config.vision_config.hidden_size == 32
    assert config.vision_config.num_hidden_layers == 3
    assert config.clip_layers_used == 2
    assert config.rope_mscale == pytest.approx(1.5**0.5)


def _values(**changes):
    values = json.loads((MODELS / "tiny-phi3v" / "config.json").read_text())
    values.update(changes)
    return values


def test_other_model_type_refused():
    with pytest.raises(ConfigError, match="'llava'.*phi3_v"):
        ModelConfig.from_dict(_values(model_type="llava"))


def test_longrope_accepted_and_unknown_rope_refused():
    rope = _values()["rope_scaling"]
    assert ModelConfig.from_dict(_values(rope_scaling={**rope, "type": "longrope"})).rope_scaling
    with pytest.raises(ConfigError, match="yarn"):
        ModelConfig.from_dict(_values(rope_scaling={**rope, "type": "yarn"}))
    with pytest.raises(ConfigError, match="short_factor needs 8"):
        ModelConfig.from_dict(_values(rope_scaling={**rope, "short_factor": [1.0]}))


def test_layer_idx_and_missing_keys():
    values = _values(img_processor={"image_dim_out": 32, "num_img_tokens": 144, "layer_idx": -1})
    assert ModelConfig.from_dict(values).clip_layers_used == 3
    values = _values()
    del values["hidden_size"]
    with pytest.raises(ConfigError, match="lacks hidden_size"):
        ModelConfig.from_dict(values)


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        ModelConfig.from_file(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_file(tmp_path)
