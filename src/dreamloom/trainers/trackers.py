"""TensorBoard and W&B through accelerate's trackers (`train.log_with`): the loss, learning rate,
validation loss and sample grids. events.jsonl stays the record; these are views of it."""

from __future__ import annotations

import importlib.util

import numpy as np

from ..errors import RecipeError

MODULES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def check_trackers(train) -> None:
    """A tracker whose library is missing, refused before any run exists."""
    for name in train.log_with:
        if importlib.util.find_spec(MODULES[name]) is None:
            raise RecipeError(f"train.log_with = {train.log_with}: {name} is not installed here; "
                              f"`pip install {MODULES[name]}`, or remove it from train.log_with")


def flat_config(recipe) -> dict:
    """The recipe as the scalar {section.key: value} trackers take as hyperparameters."""
    flat = {}
    for section, values in recipe.model_dump().items():
        for key, value in (values.items() if isinstance(values, dict) else [(None, values)]):
            name = f"{section}.{key}" if key else section
            flat[name] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


def start_trackers(accelerator, recipe) -> None:
    if recipe.train.log_with:
        accelerator.init_trackers(recipe.name, config=flat_config(recipe))


def log_image(accelerator, recipe, name: str, image, step: int) -> None:
    """A sample grid to every tracker that takes pictures."""
    for tracker_name in recipe.train.log_with:
        tracker = accelerator.get_tracker(tracker_name, unwrap=True)
        if tracker_name == "tensorboard":
            tracker.add_image(name, np.asarray(image.convert("RGB")), step, dataformats="HWC")
        else:
            import wandb

            tracker.log({name: wandb.Image(image)}, step=step)
