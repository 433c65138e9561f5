"""Recipes: built-ins, TOML round trip, overrides, and errors that name the key."""

from __future__ import annotations

import pytest

from dreamloom.errors import RecipeError
from dreamloom.recipes import builtin_names, builtin_text, dump_recipe, resolve_recipe
from dreamloom.recipes.io import parse_override, validate


def test_builtins_validate_and_round_trip_through_toml(tmp_path):
    assert {"tiny-lora", "sd15-lora-12gb"} <= set(builtin_names())
    for name in builtin_names():
        recipe = resolve_recipe(name)
        assert recipe.description
        path = tmp_path / f"{name}.toml"
        path.write_text(dump_recipe(recipe))
        assert resolve_recipe(str(path)) == recipe


def test_sd15_recipe_uses_the_memory_savers():
    t = resolve_recipe("sd15-lora-12gb").train
    assert t.optimizer == "adamw8bit" and t.gradient_checkpointing and t.mixed_precision == "auto"


def test_overrides_are_typed():
    recipe = resolve_recipe("tiny-lora", ["train.steps=800", "lora.rank=16", "lora.target_modules=['to_q']",
                                          "train.min_snr_gamma=5.0", "data.flip=true", "base.model=my/model"])
    assert recipe.train.steps == 800 and recipe.lora.rank == 16 and recipe.lora.target_modules == ["to_q"]
    assert recipe.train.min_snr_gamma == 5.0 and recipe.data.flip is True and recipe.base.model == "my/model"
    assert parse_override("data.path=photos/") == (["data", "path"], "photos/")


def test_unknown_key_names_the_key_and_the_allowed_ones():
    with pytest.raises(RecipeError) as err:
        resolve_recipe("tiny-lora", ["train.lerning_rate=1e-4"])
    assert "train.lerning_rate" in str(err.value) and "learning_rate" in str(err.value)
    with pytest.raises(RecipeError, match="unknown key 'bogus'"):
        validate({"bogus": 1}, "test")


@pytest.mark.parametrize("setting", ["train.learning_rate=-1", "train.steps=0", "lora.rank=0",
                                     "data.crop='diagonal'", "train.optimizer='sgd'", "data.resolution=100"])
def test_bad_values_are_refused(setting):
    with pytest.raises(RecipeError, match=setting.split("=")[0]):
        resolve_recipe("tiny-lora", [setting])


def test_future_schema_version_is_refused():
    with pytest.raises(RecipeError, match="schema_version"):
        validate({"schema_version": 99}, "test")


def test_unknown_builtin_lists_the_builtins():
    with pytest.raises(RecipeError, match="tiny-lora"):
        builtin_text("nope")


def test_captions_and_prompts_fill_trigger_and_class_word():
    recipe = resolve_recipe("tiny-lora", ["data.trigger='zwx'", "data.class_word=''"])
    assert recipe.fill("a photo of {trigger} {class_word}") == "a photo of zwx"
    assert recipe.output_name == "zwx-lora"


def test_sections_and_formats_must_fit_the_method():
    with pytest.raises(RecipeError, match=r"section \[lora\] does not apply to method 'hypernetwork'"):
        resolve_recipe("tiny-lora", ["method='hypernetwork'"])
    with pytest.raises(RecipeError, match=r"choose from \['kohya', 'diffusers'\]"):
        resolve_recipe("tiny-lora", ["export.formats=['pt']"])
