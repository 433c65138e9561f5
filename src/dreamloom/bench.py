"""`dreamloom bench`: what a training step costs, against what it must cost.

For each recipe, in one process on one device, three loops train the same base on the same pictures for the same
steps (warm-up steps excluded from every figure):
- dreamloom: the real trainer (`trainers.loop.train`), events and all;
- reference: the per-step work of diffusers' example scripts (`train_dreambooth_lora.py`): the pictures through the
  VAE and the captions through the text encoder at every step, `loss.item()` at every step, a progress bar;
- bare: the math alone: cached latents and text states, forward, backward, AdamW, nothing else.
Each loop's figure is also a ratio to the others, so a machine's speed cancels out.
"""

from __future__ import annotations

import json
import resource
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

LOOPS = ("dreamloom", "reference", "bare")


def _peak_mb(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"peak_allocated_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1),
                "peak_reserved_mb": round(torch.cuda.max_memory_reserved(device) / 2**20, 1)}
    return {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _recipe(name: str, data: Path, base: str | None, resolution: int | None, batch: int | None, steps: int, warmup: int):
    from .recipes import resolve_recipe

    sets = [f"train.steps={warmup + steps}", "train.checkpoint_every=0", "train.sample_every=0", "prior.enabled=false",
            f"train.log_every={warmup}"]
    sets += [f"base.model='{base}'"] * bool(base) + [f"data.resolution={resolution}"] * bool(resolution)
    sets += [f"train.batch_size={batch}"] * bool(batch)
    return resolve_recipe(name, sets, {"data.path": str(data), "data.class_word": "shape"})


def _ours(recipe, out: Path, warmup: int, steps: int) -> float:
    """Seconds per step of the real trainer between the end of warm-up and the last step (its events' times)."""
    from .trainers.run import start_run

    run, _ = start_run(recipe, out, log=lambda line: None)
    times = {e["step"]: e["time"] for e in run.events() if e["event"] == "step"}
    return (times[warmup + steps] - times[warmup]) / steps


def _prepared(recipe):
    """The recipe's base with the method's trained parts prepared, its optimizer, and the pictures as tensors."""
    from .datasets import load_image
    from .models.base import load_recipe_base
    from .trainers.loop import dataset_items
    from .trainers.optim import make_optimizer
    from .trainers.registry import get_method

    base = load_recipe_base(recipe.base)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base.to(device)
    method = get_method(recipe.method)(recipe)
    groups = method.prepare(base)
    items = dataset_items(recipe).train
    res = recipe.data.resolution
    pixels = torch.stack([load_image(item.path, (res, res)) for item in items]).to(device)
    tokens = base.family.tokenize(base, [item.caption for item in items])
    return base, method, make_optimizer(recipe.train, groups), [p for g in groups for p in g["params"]], pixels, tokens


def _loop(recipe, warmup: int, steps: int, cached: bool) -> float:
    """Seconds per step of a hand-written loop: `cached`, the bare math; else the example scripts' per-step work."""
    from tqdm.auto import tqdm

    from .trainers.noise_loss import predict
    from .trainers.batch import Batch

    base, method, optimizer, params, pixels, tokens = _prepared(recipe)
    device, scheduler, n = base.unet.device, base.noise_scheduler, recipe.train.batch_size
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        latents_all = base.vae.encode(pixels).latent_dist.mean * base.vae.config.scaling_factor
        cond_all = base.family.encode(base, tuple(t.to(device) for t in tokens))
    bar = tqdm(total=warmup + steps, disable=cached, leave=False)
    for step in range(warmup + steps):
        if step == warmup:
            _sync(device)
            start = time.perf_counter()
        rows = torch.randint(0, len(pixels), (n,), generator=g).tolist()
        if cached:
            latents, cond = latents_all[rows], cond_all.rows(rows)
        else:  # as the example scripts do: encode the pictures and the captions at every step
            with torch.no_grad():
                latents = base.vae.encode(pixels[rows]).latent_dist.sample() * base.vae.config.scaling_factor
                cond = base.family.encode(base, tuple(t[rows].to(device) for t in tokens))
        noise = torch.randn(latents.shape, generator=g).to(device)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (n,), generator=g).to(device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        batch = Batch(latents, tuple(t[rows] for t in tokens), [""] * n, g, cond)
        loss = F.mse_loss(predict(base, noisy, timesteps, batch), noise)
        loss.backward()
        if not cached:
            torch.nn.utils.clip_grad_norm_(params, recipe.train.max_grad_norm or 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if not cached:
            bar.set_postfix(loss=loss.detach().item())
            bar.update(1)
    _sync(device)
    bar.close()
    return (time.perf_counter() - start) / steps


def bench(recipes: list[str], base: str | None = None, resolution: int | None = None, batch: int | None = None,
          steps: int = 200, warmup: int = 20, log=print) -> dict:
    """{recipe: {loop: {ms_step, steps_s, images_s, peak memory}, ratios}} for every recipe."""
    from .toy.world import write_subject_folder

    results = {}
    with tempfile.TemporaryDirectory(prefix="dreamloom-bench-") as tmp:
        data = Path(tmp) / "pictures"
        write_subject_folder(data, "heart")
        for name in recipes:
            recipe = _recipe(name, data, base, resolution, batch, steps, warmup)
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            row, n = {}, recipe.train.batch_size
            for loop in LOOPS:
                log(f"bench {name}: {loop} loop, {warmup} + {steps} steps")
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                seconds = _ours(recipe, Path(tmp) / "runs", warmup, steps) if loop == "dreamloom" else \
                    _loop(recipe, warmup, steps, cached=loop == "bare")
                row[loop] = {"ms_step": round(1000 * seconds, 2), "steps_s": round(1 / seconds, 2),
                             "images_s": round(n / seconds, 2), **_peak_mb(device)}
            ours = row["dreamloom"]["ms_step"]
            row["ratios"] = {"dreamloom_over_bare": round(ours / row["bare"]["ms_step"], 3),
                             "reference_over_dreamloom": round(row["reference"]["ms_step"] / ours, 3)}
            row["settings"] = {"base": recipe.base.model, "resolution": recipe.data.resolution, "batch": n,
                               "steps": steps, "warmup": warmup, "device": str(device),
                               "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                               "threads": torch.get_num_threads()}
            results[name] = row
    return results


def table(results: dict) -> str:
    lines = ["| recipe | loop | ms/step | steps/s | images/s | peak memory (MB) |", "|---|---|---:|---:|---:|---:|"]
    for name, row in results.items():
        for loop in LOOPS:
            r = row[loop]
            memory = r.get("peak_allocated_mb", r.get("peak_rss_mb"))
            lines.append(f"| {name} | {loop} | {r['ms_step']} | {r['steps_s']} | {r['images_s']} | {memory} |")
        ratios = row["ratios"]
        lines.append(f"| {name} | ratios | dreamloom / bare = {ratios['dreamloom_over_bare']} | reference / dreamloom "
                     f"= {ratios['reference_over_dreamloom']} | | |")
    return "\n".join(lines)


def run_bench(args) -> int:
    results = bench(args.recipes or ["tiny-lora"], args.base, args.resolution, args.batch, args.steps, args.warmup)
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
        print(f"wrote {args.json}")
    return 0
