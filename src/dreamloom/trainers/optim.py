"""Optimizers and mixed precision, chosen by the recipe."""

from __future__ import annotations

import torch

from ..errors import RecipeError
from .method import ParamGroups


def make_optimizer(train, groups: ParamGroups) -> torch.optim.Optimizer:
    kwargs = dict(lr=train.learning_rate, betas=(train.adam_beta1, train.adam_beta2),
                  weight_decay=train.weight_decay, eps=train.adam_epsilon)
    if train.optimizer == "adamw":
        return torch.optim.AdamW(groups, **kwargs)
    if train.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, **kwargs)
    if train.optimizer == "prodigy":
        from prodigyopt import Prodigy  # adapts the step size itself: learning_rate ~1.0

        return Prodigy(groups, **kwargs)
    raise RecipeError(f"unknown optimizer '{train.optimizer}'")


def check_precision(train) -> None:
    """Refuse, before any run exists, a precision this machine cannot compute in."""
    resolve_mixed_precision(train.mixed_precision, torch.device("cuda" if torch.cuda.is_available() else "cpu"))


def resolve_mixed_precision(requested: str, device: torch.device) -> str:
    """'auto' -> bf16 where the GPU has it, fp16 on other GPUs, full precision on the CPU."""
    if device.type != "cuda":
        if requested == "fp16":
            raise RecipeError("train.mixed_precision = 'fp16' needs a CUDA GPU; use 'bf16' or 'no' on this machine.")
        return "no" if requested == "auto" else requested
    if requested == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return requested


WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
