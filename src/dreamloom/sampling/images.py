"""Images out of a pipeline, and grids of them."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image


@dataclass
class Hires:
    """A1111's hires fix: draw, upscale by `scale` (in latent space, or the picture with Lanczos),
    then re-draw `strength` of it at the larger size (`steps`: that pass's steps, default the first's)."""

    scale: float = 2.0
    strength: float = 0.5
    upscaler: str = "latent"  # or "lanczos"
    steps: int | None = None


def generate(pipe, prompts: list[str], *, negative_prompt: str = "", steps: int = 25,
             guidance_scale: float = 7.5, seed: int = 0, images_per_prompt: int = 1, batch: int | None = None,
             height: int | None = None, width: int | None = None, clip_skip: int | None = None,
             init_image: Image.Image | None = None, mask: Image.Image | None = None,
             strength: float = 0.75, hires: Hires | None = None, control=None) -> list[Image.Image]:
    """Row-major images: each prompt gets seeds seed, seed+1, ... so rows compare like for like, and
    `batch` pictures are drawn at once (all of a prompt's by default; the pictures do not depend on
    it). Generators live on the CPU so that a seed gives the same image on every device. Prompts are
    read as A1111 reads them (weights, BREAK, any length: prompts.py); `clip_skip` is A1111's.

    With `init_image`: img2img, `strength` of it re-drawn (0 keeps it, 1 ignores it); with `mask` too
    (white = re-draw): inpainting, with the base's inpainting UNet if it has one (9 input channels),
    else masked img2img on an ordinary base (the kept part is put back at every step). `hires`: the
    hires fix after a text-to-image pass. `control`: a ControlNet (controlnet.Control) steering it."""
    from .prompts import prompt_arguments

    text_pipe, extra = pipe, {"height": height, "width": width}
    kind = "text" if init_image is None else "img2img" if mask is None else "inpaint"
    if init_image is not None:  # img2img takes its size from the picture; inpainting is told it
        size = (width or init_image.width, height or init_image.height)
        extra = {"image": init_image.convert("RGB").resize(size), "strength": strength}
        if mask is not None:
            extra.update(mask_image=mask.convert("L").resize(size), width=size[0], height=size[1])
    if control is not None:
        from .controlnet import control_pipeline

        pipe = control_pipeline(text_pipe, control, kind)
        default = text_pipe.unet.config.sample_size * text_pipe.vae_scale_factor
        size = (width or default, height or default) if kind == "text" else extra["image"].size
        extra.update({"image" if kind == "text" else "control_image": control.image.convert("RGB").resize(size),
                      "controlnet_conditioning_scale": control.scale})
    elif kind != "text":
        pipe = image_pipeline(text_pipe, inpaint=kind == "inpaint")
    if hires is not None:
        extra["output_type"] = "latent" if hires.upscaler == "latent" else "pil"
    n, per_call = images_per_prompt, batch or images_per_prompt
    if kind != "text" and strength == 0:  # nothing re-drawn: the picture as the model sees it
        return [vae_round_trip(text_pipe, extra["image"])] * (n * len(prompts))
    images = []
    for prompt in prompts:
        for first in range(0, n, per_call):
            seeds = [seed + j for j in range(first, min(n, first + per_call))]
            embeds = prompt_arguments(text_pipe, prompt, negative_prompt, clip_skip, len(seeds))
            out = _draw(pipe, embeds, seeds, steps, guidance_scale, extra)
            if hires is not None:
                out = _hires_pass(text_pipe, out, embeds, seeds, steps, guidance_scale, hires)
            if kind == "inpaint":  # A1111's overlay: what the mask keeps is the picture's own pixels
                out = [Image.composite(im, extra["image"], extra["mask_image"]) for im in out]
            images.extend(out)
    return images


def vae_round_trip(pipe, image: Image.Image) -> Image.Image:
    """The picture encoded and decoded by the base's VAE (what img2img at strength 0 gives back)."""
    processor, vae = pipe.image_processor, pipe.vae
    with torch.no_grad():
        pixels = processor.preprocess(image).to(vae.device, vae.dtype)
        decoded = vae.decode(vae.encode(pixels).latent_dist.mode()).sample
    return processor.postprocess(decoded, output_type="pil")[0]


def _draw(pipe, embeds: dict, seeds: list[int], steps: int, guidance_scale: float, extra: dict):
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    with torch.no_grad():
        out = pipe(**embeds, num_inference_steps=steps, guidance_scale=guidance_scale, generator=generators, **extra)
    return out.images


def _hires_pass(text_pipe, first, embeds, seeds, steps, guidance_scale, hires: Hires) -> list[Image.Image]:
    """Upscale the first pass and re-draw part of it at the larger size, with the same seeds."""
    import torch.nn.functional as F

    if hires.upscaler == "latent":
        size = tuple(round(side * hires.scale) for side in first.shape[-2:])
        image = F.interpolate(first, size=size, mode="bilinear", antialias=False)
    else:
        image = [im.resize((round(im.width * hires.scale / 8) * 8, round(im.height * hires.scale / 8) * 8),
                           Image.LANCZOS) for im in first]
    return _draw(image_pipeline(text_pipe, inpaint=False), embeds, seeds, hires.steps or steps, guidance_scale,
                 {"image": image, "strength": hires.strength})


def image_pipeline(pipe, inpaint: bool):
    """The img2img (or inpainting) pipeline of the same family over the very same modules, so that
    every attached adapter, embedding and scheduler applies."""
    from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting

    made = (AutoPipelineForInpainting if inpaint else AutoPipelineForImage2Image).from_pipe(pipe)
    made.scheduler = pipe.scheduler
    made.set_progress_bar_config(disable=True)
    return made


def make_grid(images: list[Image.Image], cols: int) -> Image.Image:
    cols = max(1, min(cols, len(images)))
    rows = (len(images) + cols - 1) // cols
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, img in enumerate(images):
        grid.paste(img, ((i % cols) * w, (i // cols) * h))
    return grid
