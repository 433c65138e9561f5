"""Output preservation (prior.output_preservation, ai-toolkit's "differential output preservation"): the training
pictures captioned without the trigger are pulled toward the untouched model's prediction, which an adapter method
computes by switching its adapters off (no second model, no class pictures)."""

from __future__ import annotations

import pytest
import torch

from dreamloom.errors import RecipeError
from dreamloom.models import load_base
from dreamloom.recipes import resolve_recipe
from dreamloom.trainers.batch import Batch
from dreamloom.trainers.noise_loss import predict
from dreamloom.trainers.registry import get_method
from helpers import train_tiny

SHORT = ["train.steps=60", "train.checkpoint_every=0"]


def prediction(base, prompt: str, method=None) -> torch.Tensor:
    """The UNet's prediction for one prompt at fixed noisy latents and timesteps (adapters off inside `method`'s
    switched_off when given)."""
    g = torch.Generator().manual_seed(0)
    noisy, timesteps = torch.randn(8, 4, 8, 8, generator=g), torch.randint(0, 1000, (8,), generator=g)
    batch = Batch(noisy, tuple(base.family.tokenize(base, [prompt] * 8)), [prompt] * 8, g)
    with torch.no_grad(), method.switched_off(base) if method else torch.no_grad():
        return predict(base, noisy, timesteps, batch)


@pytest.mark.parametrize("recipe", ["tiny-lora", "tiny-loha"])
def test_switched_off_is_the_untouched_base(recipe, tmp_path, subject_dir):
    run, trained, _ = train_tiny(tmp_path, subject_dir, ["train.steps=4", "train.checkpoint_every=0"], recipe=recipe)
    method = get_method(run.recipe().method)(run.recipe())
    untouched = prediction(load_base("tiny"), "a photo of star")
    assert not torch.allclose(prediction(trained, "a photo of star"), untouched)  # the adapter does act
    assert torch.equal(prediction(trained, "a photo of star", method), untouched)
    assert not torch.allclose(prediction(trained, "a photo of star"), untouched)  # and is back on after


@pytest.fixture(scope="module")
def drifts(tmp_path_factory, subject_dir) -> dict[float, float]:
    """How far each weight of output preservation leaves a prompt without the trigger from the untouched base."""
    untouched, out = prediction(load_base("tiny"), "a photo of star"), {}
    for weight in (0.0, 1.0):
        run, trained, _ = train_tiny(tmp_path_factory.mktemp(f"dop{weight}"), subject_dir,
                                     [*SHORT, f"prior.output_preservation={weight}"])
        end = next(e for e in run.events() if e["event"] == "end")
        assert end["loss_after"] < end["loss_before"]  # the subject is learnt all the same
        out[weight] = (prediction(trained, "a photo of star") - untouched).pow(2).mean().item()
    return out


def test_output_preservation_keeps_prompts_without_the_trigger_closer_to_the_base(drifts):
    # 60 steps on the tiny base: 0.091 without, 0.053 with weight 1 (the random tiny text encoder hardly tells
    # prompts apart, so the subject's own prompt moves less too; QUALITY.md measures both on the toy base)
    assert drifts[1.0] < 0.75 * drifts[0.0]


@pytest.mark.parametrize("recipe", ["tiny-dreambooth", "tiny-ti"])
def test_methods_without_an_adapter_to_switch_off_are_refused(recipe):
    with pytest.raises(RecipeError, match="prior.output_preservation.*lora"):
        resolve_recipe(recipe, ["prior.output_preservation=1"])


def test_varied_class_prompts_are_taken_in_turn_and_caption_their_pictures():
    from dreamloom.trainers.prior import class_cache_dir, class_items

    prompts = "prior.class_prompts=['a red {class_word}', 'a blue {class_word} on a pink background']"
    recipe = resolve_recipe("tiny-dreambooth", [prompts, "prior.num_class_images=3", "prior.generation_steps=2"])
    base = load_base("tiny")
    items, made = class_items(recipe, base, log=lambda line: None)
    assert made == 3
    assert [item.caption for item in items] == ["a red star", "a blue star on a pink background", "a red star"]
    assert class_cache_dir(recipe, base) != class_cache_dir(resolve_recipe("tiny-dreambooth"), base)


def test_choices_in_a_class_prompt_stand_for_each_choice_in_turn():
    """{a|b} in a class prompt (Dynamic Prompts' syntax): every combination is one class prompt, the first choice
    changing fastest, so that a few class pictures already hold every colour."""
    from dreamloom.trainers.prior import class_items

    prompts = "prior.class_prompts=['a {red|blue} {class_word}{| on a pink background}', 'a green {class_word}']"
    recipe = resolve_recipe("tiny-dreambooth", [prompts, "prior.num_class_images=6", "prior.generation_steps=2"])
    items, _ = class_items(recipe, load_base("tiny"), log=lambda line: None)
    assert [item.caption for item in items] == ["a red star", "a blue star", "a red star on a pink background",
                                                "a blue star on a pink background", "a green star", "a red star"]


def test_captions_without_the_trigger():
    from pathlib import Path

    from dreamloom.datasets import DataItem
    from dreamloom.trainers.data import without_trigger

    items = [DataItem(Path("a.png"), caption, 64, 64, "0") for caption in
             ("a sks dog on a beach", "sks, 1girl, smile", "1girl, sks, smile", "a sksy dog")]
    assert [item.caption for item in without_trigger(items, "sks")] == [
        "a dog on a beach", "1girl, smile", "1girl, smile", "a sksy dog"]
