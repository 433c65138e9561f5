"""Decode training images into normalized tensors of a square or a bucket's size."""

from __future__ import annotations

import math
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


def as_size(size: int | tuple[int, int]) -> tuple[int, int]:
    """(width, height): a square side, or the pair itself."""
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def resized_size(width: int, height: int, size: int | tuple[int, int]) -> tuple[int, int]:
    """(width, height) of the picture resized to cover `size` (a square side or (width, height)):
    the shorter side of a square, the tighter side of a bucket, fits exactly."""
    w, h = as_size(size)
    scale = max(w / width, h / height)
    return max(w, round(width * scale)), max(h, round(height * scale))


def crop_offsets(width: int, height: int, size: int | tuple[int, int], crop: str = "center",
                 generator: torch.Generator | None = None) -> tuple[int, int]:
    """(top, left) of the crop in the resized picture: centred, or drawn from `generator`."""
    if crop not in CROP_MODES:
        raise ValueError(f"unknown crop mode {crop!r}; expected one of {CROP_MODES}")
    (rw, rh), (w, h) = resized_size(width, height, size), as_size(size)
    if crop == "center":
        return (rh - h) // 2, (rw - w) // 2
    left = int(torch.randint(0, rw - w + 1, (1,), generator=generator))
    top = int(torch.randint(0, rh - h + 1, (1,), generator=generator))
    return top, left


def fit(img: Image.Image, size: int | tuple[int, int], offsets: tuple[int, int], flip: bool,
        resample=Image.Resampling.BICUBIC) -> Image.Image:
    """Resize to cover `size`, crop at `offsets` (top, left), mirror if `flip`."""
    (w, h), (top, left) = as_size(size), offsets
    # PIL's bicubic resize widens its kernel when shrinking, so it is antialiased.
    img = img.resize(resized_size(*img.size, size), resample)
    img = img.crop((left, top, left + w, top + h))
    return ImageOps.mirror(img) if flip else img


def load_image(
    path: str | Path,
    size: int | tuple[int, int],
    *,
    crop: str | tuple[int, int] = "center",
    flip: bool = False,
    generator: torch.Generator | None = None,
    return_crop: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, tuple[int, int]]:
    """Load `path` as a float32 [3, height, width] tensor in [-1, 1] (and, with `return_crop`,
    where the crop starts in the resized picture: (top, left)).

    `size` is a square side or a bucket's (width, height). The picture is resized to cover it,
    then cropped ("center", "random" drawn from `generator`, or at given (top, left)), then
    mirrored if `flip`.
    """
    img = to_rgb(open_oriented(path))
    offsets = crop if not isinstance(crop, str) else crop_offsets(*img.size, size, crop, generator)
    img = fit(img, size, offsets, flip)
    pixels = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)
    pixels = pixels.float() / 127.5 - 1.0
    return (pixels, offsets) if return_crop else pixels


def rotate_hue(pixels: torch.Tensor, turn: float) -> torch.Tensor:
    """[3, H, W] pixels in [-1, 1] with their hue turned by `turn` of a full turn: the luminance-keeping hue rotation
    of SVG's feHueRotate (each row sums to 1, so grays, white and black stay as they are, in any affine range)."""
    a, b = math.cos(2 * math.pi * turn), math.sin(2 * math.pi * turn)
    m = torch.tensor([[0.213 + 0.787 * a - 0.213 * b, 0.715 - 0.715 * a - 0.715 * b, 0.072 - 0.072 * a + 0.928 * b],
                      [0.213 - 0.213 * a + 0.143 * b, 0.715 + 0.285 * a + 0.140 * b, 0.072 - 0.072 * a - 0.283 * b],
                      [0.213 - 0.213 * a - 0.787 * b, 0.715 - 0.715 * a + 0.715 * b, 0.072 + 0.928 * a + 0.072 * b]],
                     dtype=pixels.dtype)
    return torch.einsum("ij,jhw->ihw", m, pixels).clamp(-1.0, 1.0)
