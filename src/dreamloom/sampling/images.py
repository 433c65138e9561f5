"""Images out of a pipeline, and grids of them."""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
from PIL import Image


def generate(pipe, prompts: list[str], *, negative_prompt: str = "", steps: int = 25,
             guidance_scale: float = 7.5, seed: int = 0, images_per_prompt: int = 1,
             height: int | None = None, width: int | None = None, clip_skip: int | None = None,
             init_image: Image.Image | None = None, mask: Image.Image | None = None,
             strength: float = 0.75) -> list[Image.Image]:
    """Row-major images: each prompt gets seeds seed, seed+1, ... so rows compare like for like.
    Generators live on the CPU so that a seed gives the same image on every device. `clip_skip` is
    A1111's: 1 (or None) the last layer, 2 the one before it.

    With `init_image`: img2img, `strength` of it re-drawn (0 keeps it, 1 ignores it); with `mask` too
    (white = re-draw): inpainting, with the base's inpainting UNet if it has one (9 input channels),
    else masked img2img on an ordinary base (the kept part is put back at every step)."""
    extra = {"height": height, "width": width}
    if init_image is not None:  # img2img takes its size from the picture; inpainting is told it
        pipe = image_pipeline(pipe, inpaint=mask is not None)
        size = (width or init_image.width, height or init_image.height)
        extra = {"image": init_image.convert("RGB").resize(size), "strength": strength}
        if mask is not None:
            extra.update(mask_image=mask.convert("L").resize(size), width=size[0], height=size[1])
    images = []
    with _clip_skip_reachable(pipe) if clip_skip and clip_skip > 1 else nullcontext():
        for prompt in prompts:
            images.extend(_draw(pipe, prompt, negative_prompt, steps, guidance_scale, seed, images_per_prompt,
                                clip_skip, extra))
    return images


def _draw(pipe, prompt, negative_prompt, steps, guidance_scale, seed, images_per_prompt, clip_skip, extra):
    generators = [torch.Generator("cpu").manual_seed(seed + j) for j in range(images_per_prompt)]
    with torch.no_grad():
        out = pipe(
            prompt=[prompt] * images_per_prompt,
            negative_prompt=[negative_prompt] * images_per_prompt if negative_prompt else None,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            generator=generators,
            # diffusers counts the layers skipped beyond the one it uses: A1111's 2 is its 1
            **({"clip_skip": clip_skip - 1} if clip_skip and clip_skip > 1 else {}),
            **extra,
        )
    return out.images


@contextmanager
def _clip_skip_reachable(pipe):
    """transformers 5 folded CLIPTextModel.text_model into the model itself, and diffusers' SD 1/2
    pipelines still reach `text_encoder.text_model.final_layer_norm` for CLIP skip: alias it while
    drawing (in the instance's dict, not as a submodule), and take the alias away afterwards, since
    diffusers' LoRA loader reads a `text_model` attribute as the old layout."""
    encoder = getattr(pipe, "text_encoder", None)
    aliased = encoder is not None and not hasattr(encoder, "text_model")
    if aliased:
        object.__setattr__(encoder, "text_model", encoder)
    try:
        yield
    finally:
        if aliased:
            del encoder.__dict__["text_model"]


def image_pipeline(pipe, inpaint: bool):
    """The img2img (or inpainting) pipeline of the same family over the very same modules, so that
    every attached adapter, embedding and scheduler applies."""
    from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting

    made = (AutoPipelineForInpainting if inpaint else AutoPipelineForImage2Image).from_pipe(pipe)
    made.scheduler = pipe.scheduler
    made.set_progress_bar_config(disable=True)
    return made


def a1111_parameters(prompt: str, *, negative_prompt: str, steps: int, sampler: str, guidance_scale: float,
                     seed: int, width: int, height: int, model: str, clip_skip: int | None = None,
                     denoising_strength: float | None = None) -> str:
    """A picture's settings in A1111's "parameters" text (what its PNG Info tab, ComfyUI and
    civitai read back)."""
    fields = [f"Steps: {steps}", f"Sampler: {sampler}", f"CFG scale: {guidance_scale:g}", f"Seed: {seed}",
              f"Size: {width}x{height}", f"Model: {model}"]
    if clip_skip and clip_skip > 1:
        fields.append(f"Clip skip: {clip_skip}")
    if denoising_strength is not None:
        fields.append(f"Denoising strength: {denoising_strength:g}")
    negative = f"\nNegative prompt: {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n" + ", ".join(fields)


def png_info(prompts: list[str], per_prompt: int, seed: int, settings: dict):
    """PNG text chunks of a sample grid: A1111's "parameters" of its first picture (A1111 does the same
    for grids), and every cell's prompt and seed as JSON ("dreamloom")."""
    import json

    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", a1111_parameters(prompts[0], seed=seed, **settings))
    cells = [{"prompt": p, "seed": seed + j} for p in prompts for j in range(per_prompt)]
    info.add_text("dreamloom", json.dumps({"cells": cells, "columns": per_prompt, **settings}))
    return info


def make_grid(images: list[Image.Image], cols: int) -> Image.Image:
    cols = max(1, min(cols, len(images)))
    rows = (len(images) + cols - 1) // cols
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, img in enumerate(images):
        grid.paste(img, ((i % cols) * w, (i // cols) * h))
    return grid
