"""ControlNet for the sampler: a user's local ControlNet (a diffusers folder or a single file),
checked against the base before anything is drawn, and the family's ControlNet pipeline over the
base's very modules (diffusers' AutoPipeline picks SD's or SDXL's)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ..errors import AdapterError


@dataclass
class Control:
    model: object  # diffusers ControlNetModel
    image: Image.Image  # the control picture (edges, depth, pose, ...), already preprocessed
    scale: float = 1.0


def load_controlnet(path: str | Path):
    """A ControlNetModel from a diffusers folder (config.json + weights) or a .safetensors file."""
    from diffusers import ControlNetModel

    path = Path(path).expanduser()
    try:
        if path.is_dir():
            return ControlNetModel.from_pretrained(path, local_files_only=True)
        if path.is_file():
            return ControlNetModel.from_single_file(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise AdapterError(f"--controlnet '{path}' is not a ControlNet diffusers can read "
                           f"({str(exc).splitlines()[0][:160]}); pass its diffusers folder or .safetensors file.") from None
    raise AdapterError(f"--controlnet '{path}' does not exist; pass a ControlNet's diffusers folder or .safetensors file.")


def check_fits(controlnet, unet, path: str | Path) -> None:
    """A ControlNet feeds the UNet's blocks: its text width, time conditioning and block widths must
    be the base's, or diffusers fails mid-way with a shape error."""
    ours, theirs = unet.config, controlnet.config
    keys = ("cross_attention_dim", "addition_embed_type", "block_out_channels")
    differ = [f"{k} {getattr(theirs, k, None)} vs the base's {getattr(ours, k, None)}" for k in keys
              if _norm(getattr(theirs, k, None)) != _norm(getattr(ours, k, None))]
    if differ:
        kind = "SDXL" if getattr(theirs, "addition_embed_type", None) == "text_time" else "SD 1.x/2.x"
        raise AdapterError(f"--controlnet '{path}' (made for {kind}, judging by its config) does not fit this base: "
                           f"{'; '.join(differ)}; pass a ControlNet trained for this base's family.")


def _norm(value):
    return tuple(value) if isinstance(value, list | tuple) else value


def control_pipeline(pipe, control: Control, kind: str):
    """The text-to-image, img2img or inpainting ControlNet pipeline over the pipe's modules."""
    from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting, AutoPipelineForText2Image

    auto = {"text": AutoPipelineForText2Image, "img2img": AutoPipelineForImage2Image,
            "inpaint": AutoPipelineForInpainting}[kind]
    model = control.model.to(pipe.unet.device)
    if model.dtype != pipe.unet.dtype:
        model = model.to(dtype=pipe.unet.dtype)
    made = auto.from_pipe(pipe, controlnet=model)
    made.scheduler = pipe.scheduler
    made.set_progress_bar_config(disable=True)
    return made
