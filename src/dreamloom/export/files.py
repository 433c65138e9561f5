"""Writing export files safely: atomically, and never over a file the user already has."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors.torch import save

from ..atomic import atomic_write
from ..errors import DreamloomError

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def refuse_overwrite(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise DreamloomError(
            f"'{path}' already exists; dreamloom never overwrites an export silently. "
            "Move it away, or pass --overwrite to replace it."
        )


def cast(tensors: dict[str, torch.Tensor], dtype: str) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", DTYPES[dtype]).contiguous() for k, v in tensors.items()}


def tensor_data_sha256(blob: bytes) -> str:
    """kohya's `sshs_model_hash`: sha256 of a safetensors file's data, header excluded, so the
    hash does not change when only metadata does."""
    header_len = int.from_bytes(blob[:8], "little")
    return hashlib.sha256(blob[8 + header_len:]).hexdigest()


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str],
                      overwrite: bool = False) -> Path:
    refuse_overwrite(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, save(tensors, metadata={k: str(v) for k, v in metadata.items()}))
