"""EMA of the trained weights through diffusers' EMAModel, optionally held in CPU memory."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from diffusers.training_utils import EMAModel


class Ema:
    def __init__(self, params: list[torch.nn.Parameter], decay: float, on_cpu: bool):
        self.params, self.on_cpu = params, on_cpu
        # Warm-up (decay grows towards `decay`) so that short personalization runs average
        # the trained weights rather than staying at the base model's.
        self.model = EMAModel(self._source(), decay=decay, use_ema_warmup=True, power=2 / 3)

    def _source(self) -> list[torch.Tensor]:
        if not self.on_cpu:
            return self.params
        # EMAModel averages only tensors that require grad; the CPU copies must say they do.
        return [p.detach().to("cpu", torch.float32).requires_grad_(True) for p in self.params]

    def step(self) -> None:
        self.model.step(self._source())

    @contextmanager
    def applied(self):
        """The EMA weights in the model for the duration (exports, samples), then the live ones."""
        self.model.store(self.params)
        self.model.copy_to(self.params)
        try:
            yield
        finally:
            self.model.restore(self.params)

    @property
    def steps(self) -> int:
        return self.model.optimization_step

    def reset_from_params(self, steps: int) -> None:
        """Take the weights now in the model as the average (after loading a checkpoint's EMA
        weights into it), at the given number of averaging steps."""
        self.model.shadow_params = [t.detach().clone() for t in self._source()]
        self.model.optimization_step = steps
