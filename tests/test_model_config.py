"""Configs: transformers' defaults and field names, config.json round trips, presets, validation."""

from __future__ import annotations

import json

import pytest

from openalign.errors import ConfigError
from openalign.model_config import (
    BERT_SIZES,
    EFFICIENTNET_SCALING,
    AlignConfig,
    AlignTextConfig,
    AlignVisionConfig,
    get_preset,
    list_presets,
    text_preset,
    vision_preset,
)

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize(
    "ours, theirs",
    [
        (AlignTextConfig, "AlignTextConfig"),
        (AlignVisionConfig, "AlignVisionConfig"),
    ],
)
def test_defaults_match_transformers(ours, theirs):
    expected = getattr(transformers, theirs)().to_dict()
    actual = ours().to_dict()
    for key, value in actual.items():
        if key in expected:
            assert value == (list(expected[key]) if isinstance(expected[key], tuple) else expected[key]), key
    own_fields = set(actual) - {"model_type"}
    assert own_fields <= set(expected), own_fields - set(expected)


def test_align_defaults_match_transformers():
    theirs = transformers.AlignConfig()
    ours = AlignConfig(vision_config=AlignVisionConfig(hidden_dim=2560), projection_dim=640)
    assert ours.projection_dim == theirs.projection_dim == 640
    assert ours.temperature_init_value == theirs.temperature_init_value == 1.0
    assert ours.text_config.hidden_size == theirs.text_config.hidden_size
    assert ours.vision_config.image_size == theirs.vision_config.image_size == 600


def test_transformers_config_json_round_trip(tmp_path):
    """A config.json written by transformers reads into ours and back into transformers unchanged."""
    theirs = transformers.AlignConfig(
        text_config=transformers.AlignTextConfig(hidden_size=64, num_attention_heads=4).to_dict(),
        vision_config=transformers.AlignVisionConfig(image_size=289, hidden_dim=640, depthwise_padding=[3]).to_dict(),
    )
    theirs.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw["some_future_key"] = {"kept": True}
    raw["vision_config"]["another_key"] = 3
    (tmp_path / "config.json").write_text(json.dumps(raw))

    ours = AlignConfig.from_json_file(tmp_path / "config.json")
    assert ours.text_config.hidden_size == 64
    assert ours.vision_config.depthwise_padding == [3]
    assert ours.vision_config.image_size == 289
    out = tmp_path / "out"
    out.mkdir()
    ours.to_json_file(out / "config.json")
    written = json.loads((out / "config.json").read_text())
    assert written["some_future_key"] == {"kept": True}
    assert written["vision_config"]["another_key"] == 3
    assert written["vision_config"]["num_hidden_layers"] == raw["vision_config"]["num_hidden_layers"]
    reloaded = transformers.AlignConfig.from_pretrained(out)
    assert reloaded.to_dict()["text_config"]["hidden_size"] == 64
    assert reloaded.vision_config.depthwise_padding == [3]
    for key in ("kernel_sizes", "strides", "num_block_repeats", "width_coefficient", "hidden_dim"):
        assert getattr(reloaded.vision_config, key) == getattr(theirs.vision_config, key), key


def test_align_base_preset_is_kakaobrain_align_base():
    config = get_preset("align-base")
    assert config.vision_config.image_size == 289
    assert config.vision_config.hidden_dim == 640
    assert config.vision_config.num_hidden_layers == 55
    assert config.projection_dim == 640
    assert (config.text_config.hidden_size, config.text_config.num_hidden_layers) == (768, 12)


def test_presets_cover_the_family():
    for name in ("efficientnet-b0", "efficientnet-b3", "efficientnet-b7", "efficientnet-l2"):
        assert name in EFFICIENTNET_SCALING
        vision_preset(name)
    for name in ("bert-mini", "bert-small", "bert-base", "bert-large"):
        assert name in BERT_SIZES
        text_preset(name)
    assert vision_preset("efficientnet-b0").output_channels == 320
    assert vision_preset("efficientnet-l2").output_channels == 1376
    assert text_preset("bert-large").num_hidden_layers == 24
    for name in ("align-base", "tiny", "align-l2-large", "efficientnet-b0+bert-mini"):
        assert name in list_presets() or "+" in name
        config = get_preset(name)
        assert config.projection_dim == config.vision_config.output_channels


@pytest.mark.parametrize(
    "build, field",
    [
        (lambda: AlignTextConfig(hidden_size=100, num_attention_heads=12), "hidden_size"),
        (lambda: AlignTextConfig(num_hidden_layers=-1), "num_hidden_layers"),
        (lambda: AlignTextConfig(hidden_act="sigmoidish"), "hidden_act"),
        (lambda: AlignVisionConfig(pooling_type="median"), "pooling_type"),
        (lambda: AlignVisionConfig(image_size=-5), "image_size"),
        (lambda: AlignVisionConfig(kernel_sizes=[3, 3]), "in_channels"),
        (lambda: AlignVisionConfig(strides=[1, 3, 2, 2, 1, 2, 1]), "strides"),
        (lambda: AlignVisionConfig(drop_connect_rate=1.5), "drop_connect_rate"),
        (lambda: AlignConfig(projection_dim=512), "projection_dim"),
        (lambda: get_preset("align-huge"), "align-huge"),
    ],
)
def test_invalid_values_name_the_field(build, field):
    with pytest.raises(ConfigError, match=field) as info:
        build()
    assert isinstance(info.value, ValueError)


def test_invalid_config_json_names_the_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="config.json"):
        AlignConfig.from_json_file(path)
