"""The `toy` base: the SD 1.x architecture at the toy world's scale with pretrained weights, shipped
as package data (one fp16 safetensors file) and rebuilt by `dreamloom toy pretrain` (dreamloom.toy)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import BaseModelError
from ..statedicts import join_parts, part_of
from .base import Base, build_random
from .configs import ARCHS

BASE_FILE = "toy-base.safetensors"


def shipped_base_path() -> Path:
    return Path(str(resources.files("dreamloom.models") / "data" / BASE_FILE))


def save_toy_base(base: Base, path: str | Path, dtype: torch.dtype = torch.float16, metadata: dict | None = None) -> Path:
    """Every part in one file, keys prefixed by part; the VAE's latent scale in the header."""
    tensors = {k: v.detach().to(dtype).contiguous()
               for k, v in join_parts({name: m.state_dict() for name, m in base.modules().items()}).items()}
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
    for name, module in base.modules().items():
        module.load_state_dict({k: v.float() for k, v in part_of(state, name).items()}, strict=True, assign=True)
        module.eval()
    base.vae.register_to_config(scaling_factor=float(metadata.get("vae_scaling_factor", 1.0)))
    base.spec = "toy"
    return base
