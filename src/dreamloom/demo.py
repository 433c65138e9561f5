"""`dreamloom demo`: the whole path on the built-in tiny base, headless, in about a minute on a CPU:
generated subject images -> tiny-lora training -> exports -> a sample grid with the LoRA."""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw

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
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"subject-{i}.png"
        if not path.exists():
            subject_image(i).save(path)
        paths.append(path)
    return paths


def run_demo(out: Path) -> None:
    from .models import load_base
    from .recipes import resolve_recipe
    from .sampling import attach_loras, generate, make_grid
    from .trainers.run import start_run

    images = write_subject_images(out / "subject")
    print(f"subject images: {out / 'subject'} ({len(images)} files)")
    recipe = resolve_recipe("tiny-lora", values={"data.path": str(out / "subject"), "data.class_word": "star"})
    run, exports = start_run(recipe, out / "runs")
    for path in exports:
        print(f"export: {path}")

    prompt = recipe.fill("a photo of {trigger} {class_word}")
    base = load_base("tiny")
    pipe = base.pipeline()
    before = generate(pipe, [prompt], steps=20, seed=0, images_per_prompt=4)
    attach_loras(pipe, base, [(exports[0], 1.0)])
    after = generate(pipe, [prompt], steps=20, seed=0, images_per_prompt=4)
    grid = out / "demo-grid.png"
    make_grid(before + after, cols=4).save(grid)
    print(f"sample grid (top: base, bottom: with the LoRA): {grid}")
    print(f"training events: {run.events_path}")
