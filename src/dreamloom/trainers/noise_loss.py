"""The standard denoising loss that every method uses unless it says otherwise."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_snr

if TYPE_CHECKING:
    from ..models import Base
    from ..recipes.schema import TrainSection
    from .method import Batch


def encode_prompt(base: "Base", input_ids: torch.Tensor) -> torch.Tensor:
    """Text-encoder hidden states; gradients flow only when the text encoder has trainable weights."""
    trainable = any(p.requires_grad for p in base.text_encoder.parameters())
    with torch.set_grad_enabled(trainable and torch.is_grad_enabled()):
        return base.text_encoder(input_ids.to(base.text_encoder.device))[0]


def noise_loss(base: "Base", batch: "Batch", train: "TrainSection", timesteps: torch.Tensor | None = None) -> torch.Tensor:
    scheduler = base.noise_scheduler
    device = base.unet.device
    latents = batch.latents.to(device, torch.float32)
    g = batch.generator
    noise = torch.randn(latents.shape, generator=g)
    if train.noise_offset:  # lets the model learn very dark and very bright images
        noise += train.noise_offset * torch.randn((*latents.shape[:2], 1, 1), generator=g)
    if timesteps is None:
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=g)
    noise, timesteps = noise.to(device), timesteps.to(device)

    noisy = scheduler.add_noise(latents, noise, timesteps)
    hidden = batch.hidden_states if batch.hidden_states is not None else encode_prompt(base, batch.input_ids)
    hidden = hidden.to(device)
    unet_dtype = next(base.unet.parameters()).dtype
    pred = base.unet(noisy.to(unet_dtype), timesteps, hidden.to(unet_dtype)).sample.float()

    if scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    loss = F.mse_loss(pred, target.float(), reduction="none").mean(dim=(1, 2, 3))
    if train.min_snr_gamma:  # Hang et al. 2023: down-weight the easy, low-noise timesteps
        snr = compute_snr(scheduler, timesteps)
        weight = torch.clamp(snr, max=train.min_snr_gamma)
        weight = weight / (snr + 1) if scheduler.config.prediction_type == "v_prediction" else weight / snr
        loss = loss * weight
    if batch.weights is None:
        return loss.mean()
    return (loss * batch.weights.to(device)).sum()
