"""Batches for the loop: a deterministic function of (seed, step), so a resumed run sees exactly
the batches, noise, crops, tags and timesteps an uninterrupted one would have.

An example is one picture at one size: its square crop at each of data.resolution(s), or with
data.buckets its aspect-ratio bucket at each. All examples of a batch share their size.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

import torch

from ..datasets import DataItem, LatentCache, load_image, module_fingerprint, sample_latents
from ..datasets.buckets import nearest_bucket
from ..datasets.images import crop_offsets, resized_size, rotate_hue
from ..datasets.masks import load_mask
from ..datasets.tags import vary_tags
from ..models.family import Conditioning
from ..paths import cache_root
from .batch import Batch


def step_generator(seed: int, step: int, micro: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 1_009 + micro) % 2**63)


@dataclass(frozen=True)
class Example:
    item: int  # index into the items
    size: tuple[int, int]  # (width, height) it trains at


class TrainingData:
    """One stream of examples: the instance images, or (with its own seed) the class images."""

    def __init__(self, items: list[DataItem], recipe, base, seed: int | None = None, repeats: int | None = None,
                 sizes: list[tuple[int, int]] | None = None, processes: int = 1, hue_jitter: float = 0.0):
        """`sizes`: class pictures, prepared at every size of the instance examples; each batch of
        them comes at the size of the instance batch it joins (see `batch`). `processes`: the
        batches are global ones, batch_size per process (each process trains on its share).
        `hue_jitter`: the instance pictures' data.hue_jitter (class pictures are captioned with their colours)."""
        self.items, self.recipe, self.base, self.hue_jitter = items, recipe, base, hue_jitter
        self.batch_size = recipe.train.batch_size * processes
        self.seed = recipe.train.seed if seed is None else seed
        data = recipe.data
        self.sizes = sizes
        if sizes is None:
            self.examples = [Example(i, self._size(item, resolution))
                             for resolution in data.all_resolutions for i, item in enumerate(items)]
        else:
            self.examples = [Example(i, size) for size in sizes for i in range(len(items))]
        # Class pictures are drawn as pictures, in one order whatever their size: examples 0..n-1 stand for them.
        reps = [(repeats or items[e.item].repeats) if sizes is None or k < len(items) else 0
                for k, e in enumerate(self.examples)]
        # Repeats tiled (0..n-1, 0..n-1, ...): a shuffle of this list is what it always was.
        self.expanded = torch.tensor([e for r in range(max(reps)) for e in range(len(reps)) if reps[e] > r])
        self.size = len(self.expanded)
        self.one_size = sizes is not None or len({e.size for e in self.examples}) == 1
        per_size: dict[tuple[int, int], int] = {}
        for e in self.expanded.tolist():
            per_size[self.examples[e].size] = per_size.get(self.examples[e].size, 0) + 1
        self.batches_per_epoch = sum(math.ceil(n / self.batch_size) for n in per_size.values())
        self._epoch: tuple[int | None, object] = (None, None)
        family = base.family
        self.tokens = family.tokenize(base, [item.caption for item in items])
        self.empty_tokens = family.tokenize(base, "")
        self.latent_scale = 2 ** (len(base.vae.config.block_out_channels) - 1)
        # Random crops and hues differ every time, so only center crops (and their mirror) can be cached.
        self.cached = data.cache_latents and data.crop == "center" and not hue_jitter
        self.moments: dict[tuple[int, bool], torch.Tensor] = {}
        self.masks: dict[tuple[int, bool], torch.Tensor] = {}
        cache = LatentCache(cache_root() / "latents", module_fingerprint(base.vae)) if self.cached else None
        for e, example in enumerate(self.examples):
            for flip in (False, True) if data.flip else (False,):
                if self.cached:
                    self.moments[e, flip] = cache.moments(items[example.item], example.size, flip, base.vae)
                if self.cached and data.masked_loss:
                    self.masks[e, flip] = self._mask(e, flip, self._center(e))
        self.cond = self.empty_cond = None
        # No text encoder trains and captions never change: every caption is encoded once, here.
        if not family.text_trains(base) and not data.varied_captions:
            self.cond = self._encode_captions()
            with torch.no_grad():
                self.empty_cond = family.encode(base, self.empty_tokens).to("cpu", torch.float32)

    def _size(self, item: DataItem, resolution: int) -> tuple[int, int]:
        d = self.recipe.data
        if not d.buckets:
            return resolution, resolution
        return nearest_bucket(item.width, item.height, resolution, d.bucket_step, d.bucket_max_aspect,
                              d.bucket_max_upscale)

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

    def _schedule(self, epoch: int):
        """The epoch's order: a shuffle of the examples (one size), or its batches (buckets)."""
        if self._epoch[0] != epoch:  # one shuffle per epoch, not one per example
            g = torch.Generator().manual_seed(self.seed + 7919 * epoch)
            order = self.expanded[torch.randperm(self.size, generator=g)]
            self._epoch = (epoch, order if self.one_size else self._batches(order, g))
        return self._epoch[1]

    def _batches(self, order: torch.Tensor, g: torch.Generator) -> list[list[int]]:
        """Shuffled examples grouped by size into batches (a short last one filled from its group's
        start), the batches shuffled too."""
        n = self.batch_size
        groups: dict[tuple[int, int], list[int]] = {}
        for e in order.tolist():
            groups.setdefault(self.examples[e].size, []).append(e)
        batches = [[group[(start + k) % len(group)] for k in range(n)]
                   for group in groups.values() for start in range(0, len(group), n)]
        return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]

    def indices(self, step: int, micro: int) -> list[int]:
        """Example indices of one micro-batch: consecutive slices of per-epoch shuffles (one size),
        or the next of the epoch's batches (several sizes)."""
        train = self.recipe.train
        k = step * train.gradient_accumulation + micro
        if not self.one_size:
            epoch, position = divmod(k, self.batches_per_epoch)
            return self._schedule(epoch)[position]
        first = k * self.batch_size
        return [int(self._schedule(j // self.size)[j % self.size]) for j in range(first, first + self.batch_size)]

    def _center(self, e: int) -> tuple[int, int]:
        item, size = self.items[self.examples[e].item], self.examples[e].size
        return crop_offsets(item.width, item.height, size)

    def _mask(self, e: int, flip: bool, crop: tuple[int, int]) -> torch.Tensor:
        example = self.examples[e]
        return load_mask(self.items[example.item].mask, example.size, crop, flip, self.latent_scale,
                         self.recipe.data.unmasked_weight)

    def _moments(self, e: int, flip: bool, g: torch.Generator) -> tuple[torch.Tensor, tuple[int, int]]:
        """The latent distribution of example e, and where its crop starts (top, left)."""
        example, d = self.examples[e], self.recipe.data
        if self.cached:
            return self.moments[e, flip], self._center(e)
        item = self.items[example.item]
        crop = crop_offsets(item.width, item.height, example.size, d.crop, g)
        pixels = load_image(item.path, example.size, crop=crop, flip=flip)
        if self.hue_jitter:  # up to hue_jitter x half a turn either way
            pixels = rotate_hue(pixels, self.hue_jitter * (2 * torch.rand((), generator=g).item() - 1) / 2)
        vae = self.base.vae
        with torch.no_grad():
            dist = vae.encode(pixels[None].to(vae.device, vae.dtype)).latent_dist
        return dist.parameters[0].float().cpu(), crop

    def _crop_as_seen(self, e: int, flip: bool, crop: tuple[int, int]) -> tuple[int, int]:
        """A mirrored picture's crop starts where the crop ends in the unmirrored one."""
        if not flip:
            return crop
        example = self.examples[e]
        item = self.items[example.item]
        width, _ = resized_size(item.width, item.height, example.size)
        return crop[0], width - example.size[0] - crop[1]

    def caption(self, item: int, g: torch.Generator) -> str:
        d, caption = self.recipe.data, self.items[item].caption
        if not d.varied_captions:
            return caption
        return vary_tags(caption, g, shuffle=d.shuffle_tags, keep_tokens=d.keep_tokens,
                         keep_separator=d.keep_tokens_separator, dropout=d.tag_dropout, separator=d.tag_separator)

    def make_batch(self, examples: list[int], g: torch.Generator) -> Batch:
        d = self.recipe.data
        items = [self.examples[e].item for e in examples]
        flips = [d.flip and bool(torch.rand((), generator=g) < 0.5) for _ in examples]
        drawn = [self._moments(e, f, g) for e, f in zip(examples, flips)]
        latents = sample_latents(torch.stack([m for m, _ in drawn]), g) * self.base.vae.config.scaling_factor
        captions = [self.caption(i, g) for i in items]  # draws only when tags vary: other runs' streams stay
        if d.varied_captions:
            tokens = tuple(self.base.family.tokenize(self.base, captions))
        else:
            tokens = tuple(t[items].clone() for t in self.tokens)
        cond = self.cond.rows(items).clone() if self.cond is not None else None
        if d.caption_dropout:  # drawn only when on, so that other runs' random streams stay as they were
            for row in torch.nonzero(torch.rand(len(examples), generator=g) < d.caption_dropout).flatten().tolist():
                for t, empty in zip(tokens, self.empty_tokens):
                    t[row] = empty[0]
                captions[row] = ""
                if cond is not None:
                    cond.set_row(row, self.empty_cond)
        mask = None
        if d.masked_loss:
            mask = torch.stack([self.masks[e, f] if self.cached else self._mask(e, f, crop)
                                for e, f, (_, crop) in zip(examples, flips, drawn)])
        original = torch.tensor([[self.items[i].height, self.items[i].width] for i in items])
        crops = torch.tensor([self._crop_as_seen(e, f, c) for e, f, (_, c) in zip(examples, flips, drawn)])
        return Batch(latents, tokens, captions, g, cond, original_size=original, crop_top_left=crops, mask=mask)

    def batch(self, step: int, micro: int = 0, size: tuple[int, int] | None = None) -> Batch:
        """The micro-batch of a step; class pictures at `size`, the size of the batch they join."""
        examples = self.indices(step, micro)
        if size is not None:
            examples = [self.sizes.index(size) * len(self.items) + e for e in examples]
        return self.make_batch(examples, step_generator(self.seed, step, micro))


def without_trigger(items: list[DataItem], trigger: str) -> list[DataItem]:
    """The pictures captioned as if the subject had no name: "a sks dog on a beach" -> "a dog on a beach",
    "sks, 1girl, smile" -> "1girl, smile" (the trigger as a tag goes with its comma)."""
    if not trigger:
        return list(items)
    word = re.compile(rf"\s*\b{re.escape(trigger)}\b\s*,?")
    return [replace(item, caption=" ".join(word.sub(" ", item.caption).split())) for item in items]


class TrainingStream:
    """The batches a step trains on: the instance images, merged with the class images of prior
    preservation when there are any (loss = instance mean + class_weight * class mean), and with the
    same pictures captioned without the trigger for output preservation (+ its weight * their mean
    distance to the untouched model's prediction)."""

    def __init__(self, data: TrainingData, classes: TrainingData | None = None, class_weight: float = 1.0,
                 part: tuple[int, int] | None = None, plain: TrainingData | None = None, plain_weight: float = 0.0):
        """`part`: (rank, processes) of a run on several processes; each trains on its rows. `plain`: the
        instance pictures without the trigger in their captions, drawn in the same order (same seed)."""
        self.data, self.classes, self.class_weight, self.part = data, classes, class_weight, part
        self.plain, self.plain_weight = plain, plain_weight

    def batch(self, step: int, micro: int = 0) -> Batch:
        batch = self.data.batch(step, micro)
        if self.classes is not None:  # at the instance batch's size: (latent sides) x the VAE's scale
            size = (batch.latents.shape[-1] * self.data.latent_scale, batch.latents.shape[-2] * self.data.latent_scale)
            batch = batch.joined(self.classes.batch(step, micro, size), self.class_weight)
        if self.plain is not None:
            batch = batch.joined(self.plain.batch(step, micro), self.plain_weight, teacher=True)
        return replace(batch, part=self.part) if self.part else batch
