"""What the loop does with a base's parts (the family names them): which dtype each weight is kept
in, where each part waits while it is not needed, gradient checkpointing, and the parts without the
accelerator's wrappers."""

from __future__ import annotations

from contextlib import contextmanager

import torch

from .method import unwrap


def unwrapped(base):
    """The base with accelerator wrappers (DDP, compile) removed: for sampling and exporting."""
    return base.with_modules(**{name: unwrap(m) for name, m in base.modules().items()})


def cast_for_precision(base, dtype: torch.dtype, keep_trained: bool) -> None:
    """Frozen weights in the compute dtype (half the memory). Trained weights stay fp32 unless
    the recipe keeps them in bf16 (stochastic rounding takes care of their updates)."""
    if dtype == torch.float32:
        return
    for name, module in base.modules().items():
        if name == "vae" and dtype == torch.float16 and getattr(module.config, "force_upcast", False):
            continue  # SDXL's VAE overflows in fp16 (black or NaN pictures): it encodes and decodes in fp32
        for p in module.parameters():
            if not p.requires_grad or keep_trained:
                p.data = p.data.to(dtype)


def enable_gradient_checkpointing(base, trained_parts: tuple[str, ...]) -> None:
    """Recompute activations in the backward pass: the UNet always, a text encoder when it trains."""
    base.unet.enable_gradient_checkpointing()
    for name in trained_parts:
        if name in base.family.text_encoders:
            getattr(base, name).gradient_checkpointing_enable()


def offload_cached(base, latents_cached: bool, text_cached: bool) -> None:
    """On a GPU, the parts whose outputs are cached wait in CPU memory (the VAE, frozen text encoders)."""
    if latents_cached:
        base.vae.to("cpu")
    if text_cached:
        for name in base.family.text_encoders:
            getattr(base, name).to("cpu")


@contextmanager
def parts_on(base, device: torch.device):
    """Bring offloaded parts (VAE, frozen text encoders) to the device for sampling, then back."""
    modules = base.modules()
    where = {name: next(m.parameters()).device for name, m in modules.items()}
    for module in modules.values():
        module.to(device)
    try:
        yield
    finally:
        for name, dev in where.items():
            modules[name].to(dev)
