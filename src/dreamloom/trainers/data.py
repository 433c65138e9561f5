"""Batches for the loop: a deterministic function of (seed, step), so a resumed run sees exactly
the batches, noise and timesteps an uninterrupted one would have."""

from __future__ import annotations

import torch

from ..datasets import DataItem, LatentCache, load_image, module_fingerprint, sample_latents
from ..paths import cache_root
from .method import Batch


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
        captions = [item.caption for item in items]
        self.input_ids = base.tokenizer(
            captions, padding="max_length", truncation=True,
            max_length=base.tokenizer.model_max_length, return_tensors="pt",
        ).input_ids
        # Random crops differ every time, so only center crops (and their mirror) can be cached.
        self.cached = data.cache_latents and data.crop == "center"
        self.moments: dict[tuple[int, bool], torch.Tensor] = {}
        if self.cached:
            cache = LatentCache(cache_root() / "latents", module_fingerprint(base.vae))
            for i, item in enumerate(items):
                for flip in (False, True) if data.flip else (False,):
                    self.moments[i, flip] = cache.moments(item, data.resolution, flip, base.vae)
        self.empty_ids = base.tokenizer(
            "", padding="max_length", max_length=base.tokenizer.model_max_length, return_tensors="pt").input_ids[0]
        self.hidden_states = self.empty_hidden = None
        if not any(p.requires_grad for p in base.text_encoder.parameters()):
            self.hidden_states = self._encode_captions()
            te = base.text_encoder
            with torch.no_grad():
                self.empty_hidden = te(self.empty_ids[None].to(te.device))[0].float().cpu()[0]

    @torch.no_grad()
    def _encode_captions(self) -> torch.Tensor:
        """The text encoder is frozen: encode every caption once (CPU copy), not every step."""
        te = self.base.text_encoder
        unique = {}
        for i, row in enumerate(self.input_ids):
            unique.setdefault(tuple(row.tolist()), []).append(i)
        out = torch.empty(len(self.items), self.input_ids.shape[1], te.config.hidden_size)
        for indices in unique.values():
            out[indices] = te(self.input_ids[indices[:1]].to(te.device))[0].float().cpu()
        return out

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

    def _moments(self, i: int, flip: bool, g: torch.Generator) -> torch.Tensor:
        if self.cached:
            return self.moments[i, flip]
        data = self.recipe.data
        pixels = load_image(self.items[i].path, data.resolution, crop=data.crop, flip=flip, generator=g)
        vae = self.base.vae
        with torch.no_grad():
            dist = vae.encode(pixels[None].to(vae.device, vae.dtype)).latent_dist
        return dist.parameters[0].float().cpu()

    def make_batch(self, indices: list[int], g: torch.Generator) -> Batch:
        flips = [self.recipe.data.flip and bool(torch.rand((), generator=g) < 0.5) for _ in indices]
        moments = torch.stack([self._moments(i, f, g) for i, f in zip(indices, flips)])
        latents = sample_latents(moments, g) * self.base.vae.config.scaling_factor
        ids = self.input_ids[indices].clone()
        captions = [self.items[i].caption for i in indices]
        hidden = self.hidden_states[indices].clone() if self.hidden_states is not None else None
        dropout = self.recipe.data.caption_dropout
        if dropout:  # drawn only when on, so that other runs' random streams stay as they were
            for row in torch.nonzero(torch.rand(len(indices), generator=g) < dropout).flatten().tolist():
                ids[row], captions[row] = self.empty_ids, ""
                if hidden is not None:
                    hidden[row] = self.empty_hidden
        return Batch(latents, ids, captions, g, hidden)

    def batch(self, step: int, micro: int = 0) -> Batch:
        return self.make_batch(self.indices(step, micro), step_generator(self.seed, step, micro))
