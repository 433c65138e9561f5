"""The `toy` base: the SD 1.x architecture at the toy world's scale with pretrained weights, shipped
as package data (one fp16 safetensors file) and rebuilt by `dreamloom toy pretrain`."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import BaseModelError
from ..models.base import Base, build_random
from ..models.configs import ARCHS

BASE_FILE = "toy-base.safetensors"
PARTS = ("unet", "vae", "text_encoder")


def shipped_base_path() -> Path:
    return Path(str(resources.files("dreamloom.toy") / "data" / BASE_FILE))


def save_toy_base(base: Base, path: str | Path, dtype: torch.dtype = torch.float16, metadata: dict | None = None) -> Path:
    """All three parts in one file, keys prefixed by part; the VAE's latent scale in the header."""
    tensors = {f"{part}.{k}": v.detach().to(dtype).contiguous()
               for part in PARTS for k, v in getattr(base, part).state_dict().items()}
    header = {"vae_scaling_factor": repr(float(base.vae.config.scaling_factor)), "arch": "toy"}
    save_file(tensors, str(path), metadata={**header, **(metadata or {})})
    return Path(path)


def load_toy_base(path: str | Path | None = None) -> Base:
    """The pretrained toy base (fp32 in memory), from the shipped file or `path`."""
    path = Path(path) if path else shipped_base_path()
    if not path.is_file():
        raise BaseModelError(f"toy base weights '{path}' are missing: reinstall dreamloom, or rebuild "
                             "them with `dreamloom toy pretrain --out DIR` and pass --base DIR/base.")
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        metadata = f.metadata() or {}
    state = load_file(str(path))
    base = build_random(ARCHS["toy"], meta=True)
    for part in PARTS:
        prefix = f"{part}."
        getattr(base, part).load_state_dict(
            {k.removeprefix(prefix): v.float() for k, v in state.items() if k.startswith(prefix)},
            strict=True, assign=True)
    base.vae.register_to_config(scaling_factor=float(metadata.get("vae_scaling_factor", 1.0)))
    base.spec = "toy"
    for part in PARTS:
        getattr(base, part).eval()
    return base
