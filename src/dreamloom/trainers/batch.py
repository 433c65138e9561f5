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
    teacher_rows: torch.Tensor | None = None  # [B] bool: rows whose target is the untouched model's prediction

    def own_rows(self) -> slice:
        rank, processes = self.part
        n = len(self.captions) // processes
        return slice(rank * n, (rank + 1) * n)

    def select(self, rows) -> "Batch":
        """These rows (a slice or a list of indices) of the batch, weights as they are."""
        def cut(t):
            return None if t is None else t[rows]

        picked = range(len(self.captions))[rows] if isinstance(rows, slice) else rows
        return replace(self, latents=self.latents[rows], tokens=tuple(t[rows] for t in self.tokens),
                       captions=[self.captions[i] for i in picked], cond=self.cond.rows(rows) if self.cond is not None else None,
                       weights=cut(self.weights), original_size=cut(self.original_size),
                       crop_top_left=cut(self.crop_top_left), mask=cut(self.mask), teacher_rows=cut(self.teacher_rows))

    def shard(self) -> "Batch":
        """This process's rows of the global batch, weighted so that the gradients the processes
        average equal one process's gradient on the whole batch. Noise and timesteps are drawn for
        the whole batch first (see noise_loss), so every row sees what a single process would draw."""
        rows, processes = self.own_rows(), self.part[1]
        whole = self.weights if self.weights is not None else torch.full((len(self.captions),), 1 / len(self.captions))
        return replace(self.select(rows), weights=whole[rows] * processes, part=None)

    def joined(self, other: "Batch", weight: float, teacher: bool = False) -> "Batch":
        """This batch's examples and another's in one step: loss = this batch's loss + weight * the other's mean
        (prior preservation's class pictures; output preservation's rows, whose targets are the untouched model's)."""
        n, m = len(self.captions), len(other.captions)
        cond = Conditioning.cat([self.cond, other.cond]) if self.cond is not None and other.cond is not None else None
        own = self.weights if self.weights is not None else torch.full((n,), 1 / n)
        teachers = torch.cat([self.teacher_rows if self.teacher_rows is not None else torch.zeros(n, dtype=torch.bool),
                              torch.full((m,), teacher)])
        return Batch(torch.cat([self.latents, other.latents]),
                     tuple(torch.cat(pair) for pair in zip(self.tokens, other.tokens)),
                     self.captions + other.captions, self.generator, cond, torch.cat([own, torch.full((m,), weight / m)]),
                     _cat(self.original_size, other.original_size), _cat(self.crop_top_left, other.crop_top_left),
                     _masks(self, other), teacher_rows=teachers if teachers.any() else None)


def _cat(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    return None if a is None or b is None else torch.cat([a, b])


def _masks(*batches: Batch) -> torch.Tensor | None:
    """The batches' masks side by side; a batch without one counts whole."""
    if all(b.mask is None for b in batches):
        return None
    return torch.cat([b.mask if b.mask is not None else torch.ones_like(b.latents[:, :1]) for b in batches])
