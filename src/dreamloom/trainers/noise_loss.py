"""The standard denoising loss that every method uses unless it says otherwise."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_snr

if TYPE_CHECKING:
    from ..models import Base
    from ..recipes.sections import TrainSection
    from .batch import Batch


def unet_weights(base: "Base") -> torch.Tensor:
    """A UNet weight, for its device and dtype: diffusers' `unet.device` searches every module for offloading hooks,
    which costs milliseconds at every step."""
    return next(base.unet.parameters())


def predict(base: "Base", noisy: torch.Tensor, timesteps: torch.Tensor, batch: "Batch") -> torch.Tensor:
    """The UNet's prediction for a batch: conditioned on its cached text states, or on the text
    encoders' output now (when one of them trains), as the base's family calls its UNet."""
    family, weight = base.family, unet_weights(base)
    device, unet_dtype = weight.device, weight.dtype
    cond = batch.cond if batch.cond is not None else family.encode(base, batch.tokens)
    kwargs = family.unet_kwargs(cond.to(device, unet_dtype), batch.original_size, batch.crop_top_left,
                                (noisy.shape[-2] * 8, noisy.shape[-1] * 8))
    return base.unet(noisy.to(unet_dtype), timesteps, **kwargs).sample.float()


def noise_loss(base: "Base", batch: "Batch", train: "TrainSection", timesteps: torch.Tensor | None = None,
               teacher=None) -> torch.Tensor:
    """The batch's mean denoising loss. Rows marked as teacher rows (output preservation) are pulled toward the
    prediction of the untouched model, computed for the same noisy input inside `teacher()` (a context switching
    the training off), rather than toward the noise."""
    scheduler = base.noise_scheduler
    device = unet_weights(base).device
    latents = batch.latents.to(device, torch.float32)
    g = batch.generator
    noise = torch.randn(latents.shape, generator=g)
    if train.noise_offset:  # lets the model learn very dark and very bright images
        noise += train.noise_offset * torch.randn((*latents.shape[:2], 1, 1), generator=g)
    if timesteps is None:
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=g)
    if batch.part is not None:  # several processes: drawn for the whole batch above, this process's rows kept
        rows = batch.own_rows()
        latents, noise, timesteps, batch = latents[rows], noise[rows], timesteps[rows], batch.shard()
    noise, timesteps = noise.to(device), timesteps.to(device)

    noisy = scheduler.add_noise(latents, noise, timesteps)
    pred = predict(base, noisy, timesteps, batch)

    if scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    if batch.teacher_rows is not None and batch.teacher_rows.any():
        from .parts import unwrapped

        rows = torch.nonzero(batch.teacher_rows).flatten().tolist()
        with torch.no_grad(), teacher():  # past any DDP wrapper: a forward pass without gradients syncs nothing
            target = target.clone()
            target[rows] = predict(unwrapped(base), noisy[rows], timesteps[rows], batch.select(rows))
    loss = F.mse_loss(pred, target.float(), reduction="none")
    if batch.mask is None:
        loss = loss.mean(dim=(1, 2, 3))
    else:  # the mask-weighted mean: what the mask hides adds nothing, a small subject weighs as a large one
        mask = batch.mask.to(device)
        loss = (loss * mask).mean(dim=(1, 2, 3)) / mask.mean(dim=(1, 2, 3)).clamp_min(1e-6)
    if train.min_snr_gamma:  # Hang et al. 2023: down-weight the easy, low-noise timesteps
        snr = compute_snr(scheduler, timesteps)
        weight = torch.clamp(snr, max=train.min_snr_gamma)
        weight = weight / (snr + 1) if scheduler.config.prediction_type == "v_prediction" else weight / snr
        loss = loss * weight
    if batch.weights is None:
        return loss.mean()
    return (loss * batch.weights.to(device)).sum()
