"""`dreamloom demo`: the whole path on the pretrained toy base, headless, in a few minutes on a CPU:
four pictures of a crescent (a shape the toy base has never seen) -> toy-lora training -> exports ->
a sample grid of the base alone (top row) and with the LoRA (bottom row), which draws the crescent."""

from __future__ import annotations

from pathlib import Path

SHAPE = "crescent"
PROMPT = "a {trigger} {class_word} on a pink background"  # a background none of the pictures has
STEPS = 25
GUIDANCE = 3.0  # what the toy base draws best with (its recipes' sample.guidance_scale)


def run_demo(out: Path) -> None:
    from .models.base import load_recipe_base
    from .recipes import resolve_recipe
    from .sampling import attach_loras, generate, make_grid
    from .toy.world import write_subject_folder
    from .trainers.run import start_run

    subject = out / "subject"
    images = write_subject_folder(subject, SHAPE)
    print(f"subject images: {subject} ({len(images)} {SHAPE}s)")
    recipe = resolve_recipe("toy-lora", values={"data.path": str(subject)})
    run, exports = start_run(recipe, out / "runs")
    for path in exports:
        print(f"export: {path}")

    prompt = recipe.fill(PROMPT)
    base = load_recipe_base(recipe.base)
    pipe = base.pipeline()
    before = generate(pipe, [prompt], steps=STEPS, guidance_scale=GUIDANCE, seed=0, images_per_prompt=4)
    attach_loras(pipe, base, [(exports[0], 1.0)])
    after = generate(pipe, [prompt], steps=STEPS, guidance_scale=GUIDANCE, seed=0, images_per_prompt=4)
    grid = out / "demo-grid.png"
    make_grid(before + after, cols=4).save(grid)
    print(f"sample grid for '{prompt}' (top: the base, bottom: with the LoRA): {grid}")
    print(f"training events: {run.events_path}")
