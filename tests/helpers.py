"""Small helpers the test modules share."""

from __future__ import annotations

import numpy as np
import torch

from dreamloom.jobs import RunDir
from dreamloom.models import load_base
from dreamloom.recipes import resolve_recipe
from dreamloom.trainers.loop import dataset_items, plain, train

PROMPT = "a photo of sks star"


def image(pipe, prompt: str = PROMPT, seed: int = 3, steps: int = 4) -> np.ndarray:
    """One image as floats, straight from the pipeline (no 8-bit rounding)."""
    g = torch.Generator("cpu").manual_seed(seed)
    return pipe(prompt, num_inference_steps=steps, generator=g, output_type="np").images[0]


def train_tiny(out, subject_dir, sets=(), recipe="tiny-lora"):
    """Train in this process and keep the trained model: (run, trained base, exports)."""
    recipe = resolve_recipe(recipe, list(sets), {"data.path": str(subject_dir), "data.class_word": "star"})
    base = load_base(recipe.base.model)
    items = dataset_items(recipe)
    run = RunDir.create(out, recipe)
    run.write_manifest(items)
    exports = train(run, base=base, items=items)
    return run, plain(base), exports


def base_weights(module) -> dict[str, torch.Tensor]:
    """A module's own weights under their original names, without any injected adapter."""
    return {k.replace(".base_layer", ""): v.detach().clone() for k, v in module.state_dict().items() if "lora_" not in k}
