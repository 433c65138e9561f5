"""One training step's examples, as the loop hands them to a method's loss."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..models.family import Conditioning


@dataclass
class Batch:
    latents: torch.Tensor  # scaled VAE latents [B, C, h, w]
    tokens: tuple[torch.Tensor, ...]  # tokenized captions, one [B, max_length] tensor per tokenizer of the family
    captions: list[str]
    generator: torch.Generator  # seeded per step: noise and timesteps are reproducible on resume
    cond: Conditioning | None = None  # cached text-encoder output, when no text encoder trains
    weights: torch.Tensor | None = None  # per-example loss weights summing to the batch's loss; default 1/B
    original_size: torch.Tensor | None = None  # [B, 2] each picture's (height, width) before it was resized
    crop_top_left: torch.Tensor | None = None  # [B, 2] where its crop starts in the resized picture
    mask: torch.Tensor | None = None  # [B, 1, h, w] loss weights in latent space (data.masked_loss)
    part: tuple[int, int] | None = None  # (rank, processes): the rows this process trains on, of a global batch

    def own_rows(self) -> slice:
        rank, processes = self.part
        n = len(self.captions) // processes
        return slice(rank * n, (rank + 1) * n)

    def shard(self) -> "Batch":
        """This process's rows of the global batch, weighted so that the gradients the processes
        average equal one process's gradient on the whole batch. Noise and timesteps are drawn for
        the whole batch first (see noise_loss), so every row sees what a single process would draw."""
        rows, processes = self.own_rows(), self.part[1]
        whole = self.weights if self.weights is not None else torch.full((len(self.captions),), 1 / len(self.captions))

        def cut(t):
            return None if t is None else t[rows]

        return replace(self, latents=self.latents[rows], tokens=tuple(t[rows] for t in self.tokens),
                       captions=self.captions[rows], cond=self.cond.rows(rows) if self.cond is not None else None,
                       weights=whole[rows] * processes, original_size=cut(self.original_size),
                       crop_top_left=cut(self.crop_top_left), mask=cut(self.mask), part=None)

    def with_prior(self, prior: "Batch", prior_weight: float) -> "Batch":
        """Instance and class examples in one step: loss = instance mean + weight * class mean."""
        n, m = len(self.captions), len(prior.captions)
        cond = Conditioning.cat([self.cond, prior.cond]) if self.cond is not None and prior.cond is not None else None
        weights = torch.tensor([1 / n] * n + [prior_weight / m] * m)
        return Batch(torch.cat([self.latents, prior.latents]),
                     tuple(torch.cat(pair) for pair in zip(self.tokens, prior.tokens)),
                     self.captions + prior.captions, self.generator, cond, weights,
                     _cat(self.original_size, prior.original_size), _cat(self.crop_top_left, prior.crop_top_left),
                     _masks(self, prior))


def _cat(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    return None if a is None or b is None else torch.cat([a, b])


def _masks(*batches: Batch) -> torch.Tensor | None:
    """The batches' masks side by side; a batch without one counts whole."""
    if all(b.mask is None for b in batches):
        return None
    return torch.cat([b.mask if b.mask is not None else torch.ones_like(b.latents[:, :1]) for b in batches])
