"""Decode training images into normalized, square tensors."""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps

CROP_MODES = ("center", "random")
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def open_oriented(source: str | Path | BinaryIO) -> Image.Image:
    """Open an image, decode all of its pixels and apply its EXIF orientation.

    Decoding everything (not just `verify()`) is what catches truncated files.
    """
    with Image.open(source) as img:
        img.load()
        return ImageOps.exif_transpose(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB, compositing transparency onto white."""
    if img.mode in _SIXTEEN_BIT_MODES:
        # PIL's own conversion clips 16-bit values at 255 (i.e. almost everything turns
        # white); rescale the 0..65535 range instead. "I" is how some 16-bit PNGs open.
        levels = np.asarray(img, dtype=np.float64) / 257.0
        img = Image.fromarray(np.clip(levels.round(), 0, 255).astype(np.uint8), mode="L")
    if img.has_transparency_data:
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, img.convert("RGBA"))
    return img.convert("RGB")


def resized_size(width: int, height: int, resolution: int) -> tuple[int, int]:
    """(width, height) after the shorter side is resized to `resolution`."""
    scale = resolution / min(width, height)
    return max(resolution, round(width * scale)), max(resolution, round(height * scale))


def center_crop(width: int, height: int, resolution: int) -> tuple[int, int]:
    """(top, left) of the centred square crop in the resized picture."""
    size = resized_size(width, height, resolution)
    return (size[1] - resolution) // 2, (size[0] - resolution) // 2


def load_image(
    path: str | Path,
    resolution: int,
    *,
    crop: str = "center",
    flip: bool = False,
    generator: torch.Generator | None = None,
    return_crop: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, tuple[int, int]]:
    """Load `path` as a float32 [3, resolution, resolution] tensor in [-1, 1] (and, with
    `return_crop`, where the crop starts in the resized picture: (top, left)).

    The shorter side is resized to `resolution`, then the longer one is cropped
    ("center", or "random" drawn from `generator`), then mirrored if `flip`.
    """
    if crop not in CROP_MODES:
        raise ValueError(f"unknown crop mode {crop!r}; expected one of {CROP_MODES}")
    img = to_rgb(open_oriented(path))

    size = resized_size(*img.size, resolution)
    # PIL's bicubic resize widens its kernel when shrinking, so it is antialiased.
    img = img.resize(size, Image.Resampling.BICUBIC)

    spare_x, spare_y = size[0] - resolution, size[1] - resolution
    if crop == "center":
        left, top = spare_x // 2, spare_y // 2
    else:
        left = int(torch.randint(0, spare_x + 1, (1,), generator=generator))
        top = int(torch.randint(0, spare_y + 1, (1,), generator=generator))
    img = img.crop((left, top, left + resolution, top + resolution))
    if flip:
        img = ImageOps.mirror(img)

    pixels = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)
    pixels = pixels.float() / 127.5 - 1.0
    return (pixels, (top, left)) if return_crop else pixels
