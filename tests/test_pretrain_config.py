"""`PretrainConfig` owns what a run is: the dtypes it trains in, the preset sizes and their 8/3
SwiGLU rule, and the defaults the `aimv2 pretrain` options show."""

from __future__ import annotations

import dataclasses

from aimv2_mlx.cli.app import command
from aimv2_mlx.config import DecoderConfig, EncoderConfig
from aimv2_mlx.data.captioned import load_captioned
from aimv2_mlx.data.shapes import write_shapes
from aimv2_mlx.errors import SettingError
from aimv2_mlx.tokenizer import train_tokenizer
from aimv2_mlx.train.config import SIZES, PretrainConfig, swiglu_hidden
from aimv2_mlx.train.loop import pretrain

import pytest

# `aimv2 pretrain` options whose value is a PretrainConfig field of another name.
FIELD_OF_OPTION = {"lr": "peak_lr"}


def test_a_float16_config_made_from_python_is_refused_naming_the_dtypes_that_train():
    with pytest.raises(SettingError, match=r"float16.*bfloat16"):
        PretrainConfig(dtype="float16")
    with pytest.raises(SettingError, match="float64"):
        PretrainConfig(dtype="float64")
    with pytest.raises(SettingError, match="'pixels'"):
        PretrainConfig(objective="pixels")


def test_a_config_file_or_a_replaced_field_with_float16_is_refused_too():
    config = PretrainConfig()
    with pytest.raises(SettingError, match="float16"):
        PretrainConfig.from_dict({**config.to_dict(), "dtype": "float16"})
    with pytest.raises(SettingError, match="float16"):
        dataclasses.replace(config, dtype="float16")
    config.dtype = "float16"  # set after construction: the check before training still refuses it
    with pytest.raises(SettingError, match="float16"):
        config.check()


def test_pretraining_from_python_refuses_a_float16_config_before_making_the_run_folder(tmp_path):
    source = load_captioned(write_shapes(tmp_path / "data", 4, size=28))
    tokenizer = train_tokenizer(source.captions(), 64, 10)
    config = PretrainConfig(
        encoder=EncoderConfig(32, 2, 2, 64, image_size=28),
        decoder=DecoderConfig(32, 1, 2, 64, tokenizer.vocab_size, 10),
        batch_size=2,
        steps=2,
        warmup_steps=1,
        compile=False,
    )
    config.dtype = "float16"
    with pytest.raises(SettingError, match="float16"):
        pretrain(source, tmp_path / "run", config, tokenizer, echo=lambda *_: None)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("preset", ["tiny", "small", "base"])
def test_the_swiglu_rule_gives_the_recipe_sizes_of_the_presets(preset):
    assert swiglu_hidden(SIZES[preset].hidden_size) == SIZES[preset].intermediate_size


def test_a_new_width_from_a_preset_keeps_the_swiglu_ratio_and_other_sizes():
    config = PretrainConfig.from_preset(
        "tiny", 100, width=384, heads=6, decoder_width=768, decoder_heads=6, image_size=56
    )
    small, base = SIZES["small"], SIZES["base"]
    assert (config.encoder.hidden_size, config.encoder.intermediate_size) == (
        384,
        small.intermediate_size,
    )
    assert (config.decoder.hidden_size, config.decoder.intermediate_size) == (
        768,
        base.intermediate_size,
    )
    assert (config.encoder.num_hidden_layers, config.encoder.image_size) == (
        SIZES["tiny"].num_hidden_layers,
        56,
    )
    assert config.encoder.num_attention_heads == 6 and config.decoder.vocab_size == 100
    untouched = PretrainConfig.from_preset("large", 100)
    # AIMv2-L's own, not the rule's
    assert untouched.encoder.intermediate_size == SIZES["large"].intermediate_size


def test_sizes_that_cannot_make_a_model_are_refused_by_check():
    with pytest.raises(SettingError, match="not divisible by 3 heads"):
        PretrainConfig.from_preset("tiny", 100, width=128, heads=3).check()
    with pytest.raises(SettingError, match="image size 30 is not a multiple of the patch size 14"):
        PretrainConfig.from_preset("tiny", 100, image_size=30).check()
    with pytest.raises(SettingError, match=r"'huge'.*tiny, small, base, large"):
        PretrainConfig.from_preset("huge", 100)


def test_the_pretrain_options_show_the_configs_own_defaults():
    fields = {
        field.name: field.default
        for field in dataclasses.fields(PretrainConfig)
        if field.default is not dataclasses.MISSING
    }
    options = {param.name: param.default for param in command().commands["pretrain"].params}
    shared = {
        name: FIELD_OF_OPTION.get(name, name)
        for name in options
        if FIELD_OF_OPTION.get(name, name) in fields
    }
    assert len(shared) >= 15, sorted(shared)
    assert {name: options[name] for name in shared} == {
        name: fields[field] for name, field in shared.items()
    }
