"""`dreamloom toy pretrain`: the toy base from nothing, reproducibly (seeded), on a CPU.

1. the judge (package data in the repo) is trained separately, after the base, because half of
   its pictures pass through the base's VAE (`train_judge(vae=...)`); the bar check at the end
   of this pretraining uses the shipped judge;
2. a pretraining set of toy-world pictures with captions is written as an ordinary image folder;
3. the VAE learns to reconstruct toy pictures (its own small loop: the training loop trains
   denoisers, not autoencoders), and its latent scale is measured as SD's was;
4. the UNet and text encoder train together in dreamloom's own training loop (recipe
   `toy-pretrain`: DreamBooth method on a random base, 10% empty captions for guidance, EMA,
   min-SNR), so the run can be watched, stopped and resumed like any other;
5. the result is written as a diffusers folder (`--base DIR/base`) and as the one fp16 file
   that ships as package data (`DIR/toy-base.safetensors`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch

from ..atomic import atomic_dir
from ..models.base import build_random
from ..models.configs import ARCHS
from ..models.toy import save_toy_base
from .judge import to_pixels
from .world import pretraining_example, random_scene, render



def write_pretraining_set(folder: Path, count: int, seed: int = 0) -> Path:
    """`count` pictures with .txt captions; an interrupted write continues where it stopped."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        image, caption = pretraining_example(rng)  # drawn even when present: the stream stays the same
        path = folder / f"{i:06d}.png"
        if not path.with_suffix(".txt").exists():
            image.save(path)
            path.with_suffix(".txt").write_text(caption)
    return folder


def foreground(pixels: torch.Tensor) -> torch.Tensor:
    """[N, 1, H, W] mask of pixels that differ from the picture's corner (the background) colour."""
    corner = pixels[:, :, :1, :1]
    return ((pixels - corner).abs().amax(dim=1, keepdim=True) > 0.15).float()


def train_vae(steps: int, batch: int = 32, seed: int = 0, lr: float = 3e-3, kl_weight: float = 1e-6, log=print):
    """The toy VAE: L1 + MSE reconstruction with a light KL term, on fresh pictures every step
    (all shapes, the unseen ones included: an SD VAE can encode things its UNet never saw)."""
    from .world import SHAPES

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed + 1)
    vae = build_random(ARCHS["toy"], seed=seed).vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    for step in range(steps):
        pixels = to_pixels([render(random_scene(rng, shapes=SHAPES)) for _ in range(batch)])
        dist = vae.encode(pixels).latent_dist
        recon = vae.decode(dist.sample()).sample
        # The shape is a small part of the picture: weight its pixels up, or the VAE learns the
        # background well and the shape's colour badly (what the judge, and users, look at).
        weight = 1 + 4 * foreground(pixels)
        error = (recon - pixels).abs() + (recon - pixels).pow(2)
        loss = (weight * error).mean() / weight.mean() + kl_weight * dist.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % 100 == 0 or step + 1 == steps:
            log(f"vae step {step + 1}/{steps} loss {loss.item():.4f}")
    vae.eval()
    with torch.no_grad():  # SD's rule: scale latents to unit variance
        pixels = to_pixels([render(random_scene(rng, shapes=SHAPES)) for _ in range(256)])
        std = vae.encode(pixels).latent_dist.sample().std().item()
    vae.register_to_config(scaling_factor=round(1.0 / std, 5))
    return vae


# Cosine cycles with warm restarts, each from the last one's EMA weights at a lower rate. Judged
# by the bar (shape / colour / background, %): after the first 31 / 98 / 100, the second 92 / 100
# / 100, the third 97 / 100 / 100 (the second still drew a star's thin points as a blob).
STAGES = ({}, {"train.steps": 3000, "train.learning_rate": 3e-4, "train.lr_warmup_steps": 50, "train.seed": 1},
          {"train.steps": 3000, "train.learning_rate": 2e-4, "train.lr_warmup_steps": 50, "train.seed": 2})


def _stage_run(runs: Path, values: dict, overrides: list[str]):
    """The stage's run, trained to its end: resumed if it was killed, started if there is none."""
    from ..rundir import RunDir
    from ..recipes import resolve_recipe
    from ..trainers.run import resume_run, start_run

    existing = sorted(runs.glob("*")) if runs.is_dir() else []
    if existing and not RunDir.open(existing[-1]).is_finished():
        return resume_run(existing[-1])[0]
    if existing:
        return RunDir.open(existing[-1])
    return start_run(resolve_recipe("toy-pretrain", list(overrides), values), runs)[0]


def pretrain(out: Path, images: int = 16000, vae_steps: int = 1500, steps: int | None = None,
             overrides: list[str] = (), seed: int = 0) -> Path:
    """The whole pretraining into `out`; returns the fp16 base file. Rerun with the same `out`, it
    continues where it stopped (a killed stage resumes from its last checkpoint)."""
    from ..models import load_base
    from ..models.toy import load_toy_base

    out.mkdir(parents=True, exist_ok=True)
    data = write_pretraining_set(out / "data", images, seed)
    init = out / "init"
    if not (init / "model_index.json").is_file():
        base = build_random(ARCHS["toy"], seed=seed)
        base.vae = train_vae(vae_steps, seed=seed)
        with atomic_dir(init) as tmp:
            base.pipeline().save_pretrained(tmp)
    start = init
    for i, stage in enumerate(STAGES, 1):
        values = {"data.path": str(data), "train.seed": seed, **stage, "base.model": str(start)}
        if steps is not None:
            values["train.steps"] = steps
        run = _stage_run(out / f"runs-{i}", values, overrides)
        start = run.exports / "diffusers"
    base = load_base(str(start))
    shutil.copytree(start, out / "base", dirs_exist_ok=True)
    path = save_toy_base(base, out / "toy-base.safetensors", metadata={"dreamloom.run": run.path.name})
    load_toy_base(path)  # the file must load as the shipped one does
    return path
