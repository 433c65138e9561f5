"""The judge: a small CNN that tells a toy-world picture's shape, colour and background.

It is what `dreamloom eval` measures with: trained on every shape (named, subject, unseen) plus
formless blobs, so a smudge is never counted as the subject; and on blurred, noisy copies and on
copies passed through the toy base's VAE, so that a generated picture (softer than a drawn one)
is judged for what it shows. Its penultimate features give the Frechet distance of the eval (the
FID idea in this world).
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from .world import BACKGROUNDS, COLOURS, SHAPES, random_scene, render

HEADS = {"shape": SHAPES, "colour": tuple(COLOURS), "background": tuple(BACKGROUNDS)}
FEATURES = 128
JUDGE_FILE = "judge.safetensors"


class Judge(nn.Module):
    def __init__(self):
        super().__init__()
        def block(i, o):
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(),
                                 nn.Conv2d(o, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(), nn.MaxPool2d(2))
        self.body = nn.Sequential(block(3, 16), block(16, 32), block(32, 64), block(64, 96),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(96, FEATURES), nn.ReLU())
        self.heads = nn.ModuleDict({k: nn.Linear(FEATURES, len(v)) for k, v in HEADS.items()})

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """[N, 3, 64, 64] in [-1, 1] -> [N, FEATURES]."""
        return self.body(pixels)

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features(pixels)
        return {k: head(f) for k, head in self.heads.items()}


def to_pixels(images) -> torch.Tensor:
    """PIL images -> [N, 3, 64, 64] float in [-1, 1] (64x64 is enforced by resizing)."""
    arrays = [np.asarray(im.convert("RGB").resize((64, 64)), dtype=np.float32) for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1


def degrade(pixels: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """What generation does to a picture: softer edges, a little noise."""
    n = pixels.shape[0]
    soft = F.interpolate(F.interpolate(pixels, scale_factor=0.5, mode="bilinear", antialias=True),
                         size=pixels.shape[-2:], mode="bilinear")
    pick = (torch.rand(n, 1, 1, 1, generator=g) < 0.5).float()
    out = pick * soft + (1 - pick) * pixels
    sigma = torch.rand(n, 1, 1, 1, generator=g) * 0.08
    return (out + sigma * torch.randn(out.shape, generator=g)).clamp(-1, 1)


def labelled_batch(rng: np.random.Generator, n: int):
    scenes = [random_scene(rng, shapes=SHAPES) for _ in range(n)]
    labels = {k: torch.tensor([v.index(getattr(s, k)) for s in scenes]) for k, v in HEADS.items()}
    return to_pixels([render(s) for s in scenes]), labels


@torch.no_grad()
def through_vae(pixels: torch.Tensor, vae) -> torch.Tensor:
    """The picture as the toy base's VAE gives it back: how every generated picture looks."""
    return vae.decode(vae.encode(pixels).latent_dist.mode()).sample.clamp(-1, 1)


def train_judge(steps: int = 1500, batch: int = 64, seed: int = 0, vae=None, log=print) -> Judge:
    """With `vae`, half of every batch goes through it, so that the judge reads generated pictures
    (softer than drawn ones) for the shape they show."""
    torch.manual_seed(seed)
    rng, g = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    judge = Judge()
    opt = torch.optim.AdamW(judge.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    judge.train()
    for step in range(steps):
        pixels, labels = labelled_batch(rng, batch)
        pixels = degrade(pixels, g)
        if vae is not None:
            pixels[: batch // 2] = through_vae(pixels[: batch // 2], vae)
        logits = judge(pixels)
        loss = sum(F.cross_entropy(logits[k], labels[k]) for k in HEADS)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % 100 == 0:
            log(f"judge step {step + 1}/{steps} loss {loss.item():.4f}")
    return judge.eval()


@torch.no_grad()
def accuracy(judge: Judge, n: int = 512, seed: int = 12345) -> dict[str, float]:
    """Share of fresh clean pictures whose every attribute the judge gets right, per head."""
    pixels, labels = labelled_batch(np.random.default_rng(seed), n)
    logits = judge(pixels)
    return {k: (logits[k].argmax(1) == labels[k]).float().mean().item() for k in HEADS}


def save_judge(judge: Judge, path: str | Path) -> None:
    save_file({k: v.contiguous() for k, v in judge.state_dict().items()}, str(path),
              metadata={"heads": ";".join(f"{k}={','.join(v)}" for k, v in HEADS.items())})


@lru_cache(maxsize=1)
def load_judge(path: str | None = None) -> Judge:
    """The shipped judge (package data) or one at `path`."""
    judge = Judge()
    if path is None:
        with resources.as_file(resources.files("dreamloom.toy") / "data" / JUDGE_FILE) as p:
            state = load_file(str(p))
    else:
        state = load_file(str(path))
    judge.load_state_dict(state)
    return judge.eval()


@torch.no_grad()
def judge_images(images, judge: Judge | None = None) -> dict:
    """Per image: the predicted label of each head, its probabilities, and the features."""
    judge = judge or load_judge()
    pixels = to_pixels(images) if not torch.is_tensor(images) else images
    f = judge.features(pixels)
    probs = {k: head(f).softmax(1) for k, head in judge.heads.items()}
    labels = {k: [HEADS[k][i] for i in p.argmax(1).tolist()] for k, p in probs.items()}
    return {"labels": labels, "probs": probs, "features": f}
