"""Loss masks: which part of a picture the model should learn (white) and which it should not
(black), from a `<stem>.mask.png` beside the picture or the picture's own alpha channel."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from dreamloom.datasets.images import fit, open_oriented

MASK_SUFFIX = ".mask.png"


def mask_file(picture: Path) -> Path:
    return picture.with_name(picture.stem + MASK_SUFFIX)


def _mask_levels(img: Image.Image, source: Path) -> Image.Image:
    """8-bit grey levels: a mask file's brightness (editors save masks as opaque RGBA too), or the
    alpha channel of a picture that is its own mask."""
    if source.name.endswith(MASK_SUFFIX):
        return img.convert("L")
    return img.convert("RGBA").getchannel("A")


def find_mask(item, name: str, problems: list[str]) -> Path | None:
    """The file an item's mask is read from (its mask file, else itself when it has alpha), or
    None (the whole picture counts); a mask that cannot serve is added to `problems`."""
    sidecar = mask_file(item.path)
    source = sidecar if sidecar.is_file() else item.path
    try:
        img = open_oriented(source)
    except Exception as exc:  # PIL raises many types for broken files
        problems.append(f"{sidecar.name}: the mask is not a readable image ({exc})")
        return None
    if source == item.path and not img.has_transparency_data:
        return None
    where = sidecar.name if source == sidecar else f"{name} (its alpha channel)"
    if img.size != (item.width, item.height):
        problems.append(f"{where}: the mask is {img.size[0]}x{img.size[1]} px but {name} is "
                        f"{item.width}x{item.height}; masks must be the picture's size")
        return None
    if not np.asarray(_mask_levels(img, source)).any():
        problems.append(f"{where}: the mask is empty (all black): nothing of {name} would be learned")
        return None
    return source


def load_mask(source: Path | None, size: tuple[int, int], offsets: tuple[int, int], flip: bool,
              latent_scale: int = 8, unmasked_weight: float = 0.0) -> torch.Tensor:
    """The mask as loss weights in latent space: [1, h/scale, w/scale], resized, cropped and
    mirrored as the picture was, averaged over each latent pixel's patch; what it hides weighs
    `unmasked_weight`, what it shows 1."""
    w, h = size
    if source is None:
        return torch.ones(1, h // latent_scale, w // latent_scale)
    levels = fit(_mask_levels(open_oriented(source), source), size, offsets, flip, Image.Resampling.BILINEAR)
    pixels = torch.from_numpy(np.array(levels, dtype=np.float32) / 255.0)[None, None]
    return unmasked_weight + (1 - unmasked_weight) * F.avg_pool2d(pixels, latent_scale)[0]
