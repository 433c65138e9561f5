"""Batches for the loop: a deterministic function of (seed, step), so a resumed run sees exactly
the batches, noise and timesteps an uninterrupted one would have."""

from __future__ import annotations

import torch

from ..datasets import DataItem, LatentCache, load_image, module_fingerprint, sample_latents
from ..datasets.images import center_crop, resized_size
from ..models.family import Conditioning
from ..paths import cache_root
from .batch import Batch


def step_generator(seed: int, step: int, micro: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 1_009 + micro) % 2**63)


class TrainingData:
    """One stream of examples: the instance images, or (with its own seed) the class images."""

    def __init__(self, items: list[DataItem], recipe, base, seed: int | None = None, repeats: int | None = None):
        self.items, self.recipe, self.base = items, recipe, base
        self.seed = recipe.train.seed if seed is None else seed
        data = recipe.data
        self.size = len(items) * (data.repeats if repeats is None else repeats)
        self._epoch_order: tuple[int | None, torch.Tensor | None] = (None, None)
        family = base.family
        self.tokens = family.tokenize(base, [item.caption for item in items])
        self.empty_tokens = family.tokenize(base, "")
        # Random crops differ every time, so only center crops (and their mirror) can be cached.
        self.cached = data.cache_latents and data.crop == "center"
        self.moments: dict[tuple[int, bool], torch.Tensor] = {}
        if self.cached:
            cache = LatentCache(cache_root() / "latents", module_fingerprint(base.vae))
            for i, item in enumerate(items):
                for flip in (False, True) if data.flip else (False,):
                    self.moments[i, flip] = cache.moments(item, data.resolution, flip, base.vae)
        self.cond = self.empty_cond = None
        if not family.text_trains(base):  # no text encoder trains: every caption is encoded once, here
            self.cond = self._encode_captions()
            with torch.no_grad():
                self.empty_cond = family.encode(base, self.empty_tokens).to("cpu", torch.float32)

    @torch.no_grad()
    def _encode_captions(self) -> Conditioning:
        """The text encoders' output for every caption (CPU copies), each distinct caption once."""
        unique: dict[tuple, list[int]] = {}
        for i in range(len(self.items)):
            unique.setdefault(tuple(tuple(t[i].tolist()) for t in self.tokens), []).append(i)
        rows: list[Conditioning | None] = [None] * len(self.items)
        for indices in unique.values():
            cond = self.base.family.encode(self.base, tuple(t[indices[:1]] for t in self.tokens)).to("cpu", torch.float32)
            for i in indices:
                rows[i] = cond
        return Conditioning.cat(rows)

    def _order(self, epoch: int) -> torch.Tensor:
        if self._epoch_order[0] != epoch:  # one shuffle per epoch, not one per example
            g = torch.Generator().manual_seed(self.seed + 7919 * epoch)
            self._epoch_order = (epoch, torch.randperm(self.size, generator=g) % len(self.items))
        return self._epoch_order[1]

    def indices(self, step: int, micro: int) -> list[int]:
        """Item indices of one micro-batch: consecutive slices of per-epoch shuffles."""
        train = self.recipe.train
        first = (step * train.gradient_accumulation + micro) * train.batch_size
        return [int(self._order(k // self.size)[k % self.size]) for k in range(first, first + train.batch_size)]

    def _moments(self, i: int, flip: bool, g: torch.Generator) -> tuple[torch.Tensor, tuple[int, int]]:
        """The latent distribution of example i, and where its crop starts (top, left)."""
        item, resolution = self.items[i], self.recipe.data.resolution
        if self.cached:
            return self.moments[i, flip], center_crop(item.width, item.height, resolution)
        pixels, crop = load_image(item.path, resolution, crop=self.recipe.data.crop, flip=flip, generator=g,
                                  return_crop=True)
        vae = self.base.vae
        with torch.no_grad():
            dist = vae.encode(pixels[None].to(vae.device, vae.dtype)).latent_dist
        return dist.parameters[0].float().cpu(), crop

    def _crop_as_seen(self, i: int, flip: bool, crop: tuple[int, int]) -> tuple[int, int]:
        """A mirrored picture's crop starts where the crop ends in the unmirrored one."""
        if not flip:
            return crop
        width, _ = resized_size(self.items[i].width, self.items[i].height, self.recipe.data.resolution)
        return crop[0], width - self.recipe.data.resolution - crop[1]

    def make_batch(self, indices: list[int], g: torch.Generator) -> Batch:
        flips = [self.recipe.data.flip and bool(torch.rand((), generator=g) < 0.5) for _ in indices]
        drawn = [self._moments(i, f, g) for i, f in zip(indices, flips)]
        latents = sample_latents(torch.stack([m for m, _ in drawn]), g) * self.base.vae.config.scaling_factor
        tokens = tuple(t[indices].clone() for t in self.tokens)
        captions = [self.items[i].caption for i in indices]
        cond = self.cond.rows(indices).clone() if self.cond is not None else None
        dropout = self.recipe.data.caption_dropout
        if dropout:  # drawn only when on, so that other runs' random streams stay as they were
            for row in torch.nonzero(torch.rand(len(indices), generator=g) < dropout).flatten().tolist():
                for t, empty in zip(tokens, self.empty_tokens):
                    t[row] = empty[0]
                captions[row] = ""
                if cond is not None:
                    cond.set_row(row, self.empty_cond)
        original = torch.tensor([[self.items[i].height, self.items[i].width] for i in indices])
        crops = torch.tensor([self._crop_as_seen(i, f, c) for i, f, (_, c) in zip(indices, flips, drawn)])
        return Batch(latents, tokens, captions, g, cond, original_size=original, crop_top_left=crops)

    def batch(self, step: int, micro: int = 0) -> Batch:
        return self.make_batch(self.indices(step, micro), step_generator(self.seed, step, micro))


class TrainingStream:
    """The batches a step trains on: the instance images, merged with the class images of prior
    preservation when there are any (loss = instance mean + class_weight * class mean)."""

    def __init__(self, data: TrainingData, classes: TrainingData | None = None, class_weight: float = 1.0):
        self.data, self.classes, self.class_weight = data, classes, class_weight

    def batch(self, step: int, micro: int = 0) -> Batch:
        batch = self.data.batch(step, micro)
        if self.classes is not None:
            batch = batch.with_prior(self.classes.batch(step, micro), self.class_weight)
        return batch
