"""Small helpers the test modules share."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from dreamloom.rundir import RunDir
from dreamloom.models import load_base
from dreamloom.recipes import resolve_recipe
from dreamloom.trainers.loop import dataset_items, train
from dreamloom.trainers.parts import unwrapped

PROMPT = "a photo of sks star"
BACKGROUNDS = [(40, 90, 160), (230, 220, 200), (60, 140, 70), (120, 60, 110)]


def subject_image(index: int, size: int = 96) -> Image.Image:
    """A made-up subject: an orange five-pointed star with a dark outline, placed differently."""
    img = Image.new("RGB", (size, size), BACKGROUNDS[index % len(BACKGROUNDS)])
    draw = ImageDraw.Draw(img)
    cx, cy = size * (0.4 + 0.07 * (index % 3)), size * (0.45 + 0.05 * (index % 2))
    outer, inner = size * 0.32, size * 0.13
    points = [
        (cx + r * math.sin(math.pi * k / 5), cy - r * math.cos(math.pi * k / 5))
        for k, r in zip(range(10), [outer, inner] * 5)
    ]
    draw.polygon(points, fill=(250, 150, 30), outline=(20, 20, 20), width=2)
    return img


def write_subject_images(folder: Path, count: int = 4) -> list[Path]:
    """`count` star pictures (96 px, no captions) in `folder`; existing files are kept."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"subject-{i}.png"
        if not path.exists():
            subject_image(i).save(path)
        paths.append(path)
    return paths


def write_shaped_images(folder: Path) -> Path:
    """Wide, tall and square star pictures with tag captions and masks hiding their left third."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, (w, h) in enumerate([(120, 72), (128, 80), (72, 120), (96, 96), (80, 128), (112, 64)]):
        subject_image(i, 128).resize((w, h)).save(folder / f"p{i}.png")
        mask = Image.new("L", (w, h), 255)
        mask.paste(0, (0, 0, w // 3, h))
        mask.save(folder / f"p{i}.mask.png")
        (folder / f"p{i}.txt").write_text(f"sks, star, tag{i}, orange, outline, shape {i % 3}")
    return folder


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
    run.write_manifest(items.train)
    exports = train(run, base=base, items=items)
    return run, unwrapped(base), exports


def trained_once(root: Path, subject_dir, recipes: dict[str, tuple[str, list[str]]]):
    """get(name) -> train_tiny's (run, trained base, exports) of recipes[name] = (recipe, sets), trained
    the first time it is asked for: a module's tests share each training."""
    made = {}

    def get(name):
        if name not in made:
            recipe, sets = recipes[name]
            made[name] = train_tiny(root / name, subject_dir, ["train.checkpoint_every=0", *sets], recipe=recipe)
        return made[name]
    return get


def largest_difference(a: dict, b: dict) -> float:
    """The largest elementwise difference of two state dicts with the same keys."""
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def base_weights(module) -> dict[str, torch.Tensor]:
    """A module's own weights under their original names, without any injected adapter."""
    return {k.replace(".base_layer", ""): v.detach().clone() for k, v in module.state_dict().items() if "lora_" not in k}


def compare(base, path, kind: str, strength: float, prompt: str, seed: int = 0, steps: int = 20,
            guidance_scale: float = 7.5):
    """(base alone, base with the file at `strength`), same prompt and seed; the file is taken off again."""
    from dreamloom.sampling import generate
    from dreamloom.sampling.attach import attach_file

    pipe = base.pipeline()
    alone = generate(pipe, [prompt], steps=steps, guidance_scale=guidance_scale, seed=seed)[0]
    detach = attach_file(kind, pipe, base, Path(path), strength)
    try:
        with_file = generate(pipe, [prompt], steps=steps, guidance_scale=guidance_scale, seed=seed)[0]
    finally:
        detach()
    return alone, with_file
