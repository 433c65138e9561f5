"""The Method interface: what one way of personalizing a model (LoRA, DreamBooth, ...) must say.

The training loop owns everything shared (optimizer, precision, checkpoints, sampling, events);
a method only chooses which weights train, how its loss differs (usually not), and how its
weights are saved, exported and attached for sampling.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .noise_loss import noise_loss

if TYPE_CHECKING:
    from ..jobs import RunDir
    from ..models import Base
    from ..recipes import Recipe


@dataclass
class Batch:
    latents: torch.Tensor  # scaled VAE latents [B, C, h, w]
    input_ids: torch.Tensor  # tokenized captions [B, 77]
    captions: list[str]
    generator: torch.Generator  # seeded per step: noise and timesteps are reproducible on resume
    hidden_states: torch.Tensor | None = None  # cached text-encoder output, when it does not train
    weights: torch.Tensor | None = None  # per-example loss weights summing to the batch's loss; default 1/B

    def with_prior(self, prior: "Batch", prior_weight: float) -> "Batch":
        """Instance and class examples in one step: loss = instance mean + weight * class mean."""
        n, m = len(self.captions), len(prior.captions)
        hidden = None
        if self.hidden_states is not None and prior.hidden_states is not None:
            hidden = torch.cat([self.hidden_states, prior.hidden_states])
        weights = torch.tensor([1 / n] * n + [prior_weight / m] * m)
        return Batch(torch.cat([self.latents, prior.latents]), torch.cat([self.input_ids, prior.input_ids]),
                     self.captions + prior.captions, self.generator, hidden, weights)


ParamGroups = list[dict]  # torch optimizer parameter groups: {"params": [...], "lr": float}


class Method:
    """Base class of every method; subclasses override what differs."""

    name: str = ""
    trainable_modules: tuple[str, ...] = ("unet",)  # Base attributes the loop prepares/casts

    def __init__(self, recipe: "Recipe"):
        self.recipe = recipe

    def prepare(self, base: "Base") -> ParamGroups:
        """Freeze the base, inject/initialise trainable weights, return optimizer groups."""
        raise NotImplementedError

    def before_step(self, base: "Base", step: int) -> None:
        """Called before every step (and on resume): for schedules such as freezing a part."""

    def loss(self, base: "Base", batch: Batch) -> torch.Tensor:
        return noise_loss(base, batch, self.recipe.train)

    def state_dict(self, base: "Base") -> dict[str, torch.Tensor]:
        """The trained weights: what checkpoints hold and exports are made from."""
        raise NotImplementedError

    def load_state_dict(self, base: "Base", state: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def export(self, base: "Base", run: "RunDir", formats: list[str], overwrite: bool = False) -> list[Path]:
        raise NotImplementedError


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The module itself, under any DDP or torch.compile wrapper the accelerator added."""
    while True:
        inner = getattr(module, "module", None) or getattr(module, "_orig_mod", None)
        if not isinstance(inner, torch.nn.Module):
            return module
        module = inner
