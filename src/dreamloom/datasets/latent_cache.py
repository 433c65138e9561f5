"""Cache VAE latent distributions on disk so each image is encoded only once."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dreamloom.atomic import atomic_path
from dreamloom.datasets.images import as_size, crop_offsets, load_image
from dreamloom.datasets.scan import DataItem

_KEY = "moments"


def module_fingerprint(module) -> str:
    """Short hex id of a model (a VAE, a UNet): its config plus the raw bytes of a few weights.

    Hashing every weight would cost a pass over the model; the first, middle and
    last tensors change whenever a checkpoint (or its dtype) does.
    """
    digest = hashlib.sha256(type(module).__name__.encode())
    config = getattr(module, "config", {})
    config = config.to_dict() if hasattr(config, "to_dict") else dict(config)  # transformers vs diffusers
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    params = list(module.parameters())
    for index in sorted({0, len(params) // 2, len(params) - 1}):
        flat = params[index].detach().reshape(-1).cpu().contiguous()
        digest.update(str(flat.dtype).encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def sample_latents(moments: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Draw from the Gaussian in `moments` ([..., 2C, h, w] -> [..., C, h, w]).

    Same maths as diffusers' DiagonalGaussianDistribution.sample(); the caller
    applies the VAE scaling factor.
    """
    mean, logvar = moments.chunk(2, dim=-3)
    std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
    # Draw on the generator's device (like diffusers' randn_tensor), then move.
    device = generator.device if generator is not None else moments.device
    noise = torch.randn(mean.shape, generator=generator, device=device, dtype=mean.dtype)
    return mean + std * noise.to(moments.device)


class LatentCache:
    """One safetensors file per (image bytes, bucket and crop, flip, VAE) combination."""

    def __init__(self, root: str | Path, vae_fingerprint: str):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.vae_fingerprint = vae_fingerprint

    def path_for(self, item: DataItem, size: int | tuple[int, int], flip: bool) -> Path:
        """Keyed by the picture's bytes, its bucket, where the (centred) crop starts, the mirror
        and the VAE: any of them changing makes another latent."""
        (w, h), (top, left) = as_size(size), crop_offsets(item.width, item.height, size)
        flipped = "flip" if flip else "noflip"
        name = f"{item.sha256}-{w}x{h}-t{top}l{left}-{flipped}-{self.vae_fingerprint}.safetensors"
        return self.root / name

    def moments(self, item: DataItem, size: int | tuple[int, int], flip: bool, vae) -> torch.Tensor:
        """Mean and logvar ([2C, h, w], float32, CPU) of the center-cropped image at `size` (a
        square side or a bucket's (width, height))."""
        path = self.path_for(item, size, flip)
        cached = self._read(path)
        if cached is not None:
            return cached
        first = next(vae.parameters())
        pixels = load_image(item.path, size, crop="center", flip=flip)
        pixels = pixels.unsqueeze(0).to(device=first.device, dtype=first.dtype)
        with torch.no_grad():
            moments = vae.encode(pixels).latent_dist.parameters[0]
        moments = moments.float().cpu().contiguous()
        self._write(path, moments)
        return moments

    @staticmethod
    def _read(path: Path) -> torch.Tensor | None:
        """The cached tensor, or None when missing or unreadable (it is re-encoded)."""
        if not path.is_file():
            return None
        try:
            tensor = load_file(path)[_KEY]
        except Exception:  # truncated or foreign file: safetensors raises various types
            return None
        return tensor if tensor.ndim == 3 and tensor.dtype == torch.float32 else None

    def _write(self, path: Path, moments: torch.Tensor) -> None:
        with atomic_path(path) as tmp:  # a crash or a parallel writer never leaves half a file
            save_file({_KEY: moments}, str(tmp))
