"""Images out of a pipeline, and grids of them."""

from __future__ import annotations

import torch
from PIL import Image


def generate(pipe, prompts: list[str], *, negative_prompt: str = "", steps: int = 25,
             guidance_scale: float = 7.5, seed: int = 0, images_per_prompt: int = 1,
             height: int | None = None, width: int | None = None) -> list[Image.Image]:
    """Row-major images: each prompt gets seeds seed, seed+1, ... so rows compare like for like.
    Generators live on the CPU so that a seed gives the same image on every device."""
    images = []
    for prompt in prompts:
        generators = [torch.Generator("cpu").manual_seed(seed + j) for j in range(images_per_prompt)]
        with torch.no_grad():
            out = pipe(
                prompt=[prompt] * images_per_prompt,
                negative_prompt=[negative_prompt] * images_per_prompt if negative_prompt else None,
                num_inference_steps=steps,
                guidance_scale=guidance_scale,
                generator=generators,
                height=height,
                width=width,
            )
        images.extend(out.images)
    return images


def make_grid(images: list[Image.Image], cols: int) -> Image.Image:
    cols = max(1, min(cols, len(images)))
    rows = (len(images) + cols - 1) // cols
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, img in enumerate(images):
        grid.paste(img, ((i % cols) * w, (i // cols) * h))
    return grid
