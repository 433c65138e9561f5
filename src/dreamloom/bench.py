"""`dreamloom bench`: what a training step costs, against what it must cost.

For each recipe, in one process on one device, three loops train the same base on the same pictures for the same
steps (warm-up steps excluded from every figure):
- dreamloom: the real trainer (`trainers.loop.train`), events and all;
- reference: the per-step work of diffusers' example scripts (`train_dreambooth_lora.py`): the pictures decoded from
  their files (its DreamBoothDataset, at the scripts' default of no loader workers), through the VAE, and the captions
  through the text encoder at every step, gradient clipping, `loss.item()` at every step, a progress bar;
- bare: the math alone: cached latents and text states, forward, backward, AdamW, nothing else.
Each loop's figure is also a ratio to the others, so a machine's speed cancels out.
"""

from __future__ import annotations

import json
import resource
import tempfile
import time
from contextlib import nullcontext
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


def _recipe(name: str, data: Path, base: str | None, resolution: int | None, batch: int | None, steps: int, warmup: int,
            extra: list[str]):
    from .recipes import resolve_recipe

    sets = [f"train.steps={warmup + steps}", "train.checkpoint_every=0", "train.sample_every=0", "prior.enabled=false",
            f"train.log_every={warmup}", "sample.images_per_prompt=1", "sample.steps=2"]  # the end's samples: unmeasured
    sets += [f"base.model='{base}'"] * bool(base) + [f"data.resolution={resolution}"] * bool(resolution)
    sets += [f"train.batch_size={batch}"] * bool(batch) + list(extra)
    return resolve_recipe(name, sets, {"data.path": str(data), "data.class_word": "shape"})


def _ours(recipe, out: Path, warmup: int, steps: int) -> tuple[float, dict]:
    """Seconds per step of the real trainer between the end of warm-up and the last step (its events' times), and
    the seconds its first step spent compiling (train.compile)."""
    from .trainers.run import start_run

    run, _ = start_run(recipe, out, log=lambda line: None)
    events = run.events()
    times = {e["step"]: e["time"] for e in events if e["event"] == "step"}
    compiled = [e["seconds"] for e in events if e["event"] == "compile"]
    return (times[warmup + steps] - times[warmup]) / steps, {"compile_s": compiled[0]} if compiled else {}


def _precision(recipe, device: torch.device) -> str:
    from .trainers.optim import resolve_mixed_precision

    return resolve_mixed_precision(recipe.train.mixed_precision, device)


def _prepared(recipe, device: torch.device):
    """The recipe's base with the method's trained parts prepared (gradient checkpointing as the recipe says), its
    frozen weights in the compute dtype (as the example scripts and dreamloom keep them), its optimizer, and the
    pictures as tensors and files."""
    from .datasets import load_image
    from .models.base import load_recipe_base
    from .trainers.loop import dataset_items
    from .trainers.optim import WEIGHT_DTYPES, make_optimizer
    from .trainers.parts import cast_for_precision, enable_gradient_checkpointing
    from .trainers.registry import get_method

    base = load_recipe_base(recipe.base)
    base.to(device)
    method = get_method(recipe.method)(recipe)
    groups = method.prepare(base)
    if recipe.train.gradient_checkpointing:  # recomputing activations is part of the recipe's math
        enable_gradient_checkpointing(base, method.trainable_parts(base))
    cast_for_precision(base, WEIGHT_DTYPES[_precision(recipe, device)], keep_trained=False)
    items = dataset_items(recipe).train
    res = recipe.data.resolution
    pixels = torch.stack([load_image(item.path, (res, res)) for item in items]).to(device, base.vae.dtype)
    tokens = base.family.tokenize(base, [item.caption for item in items])
    paths = [item.path for item in items]
    return base, make_optimizer(recipe.train, groups), [p for g in groups for p in g["params"]], pixels, tokens, paths


def _loop(recipe, warmup: int, steps: int, cached: bool) -> tuple[float, dict]:
    """Seconds per step of a hand-written loop: `cached`, the bare math; else the example scripts' per-step work.
    The bare loop also counts the FLOPs of one (warm-up) step: the math every loop does."""
    from torch.utils.flop_counter import FlopCounterMode
    from tqdm.auto import tqdm

    from .datasets import load_image
    from .trainers.batch import Batch
    from .trainers.noise_loss import predict

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base, optimizer, params, pixels, tokens, paths = _prepared(recipe, device)
    precision = _precision(recipe, device)
    autocast = dict(device_type=device.type, dtype=torch.float16 if precision == "fp16" else torch.bfloat16,
                    enabled=precision != "no")
    scheduler, n, flops = base.noise_scheduler, recipe.train.batch_size, {}
    g = torch.Generator().manual_seed(0)
    with torch.no_grad(), torch.autocast(**autocast):
        latents_all = base.vae.encode(pixels).latent_dist.mean.float() * base.vae.config.scaling_factor
        cond_all = base.family.encode(base, tuple(t.to(device) for t in tokens))
    bar = tqdm(total=warmup + steps, disable=cached, leave=False)
    for step in range(warmup + steps):
        if step == warmup:
            _sync(device)
            start = time.perf_counter()
        counter = FlopCounterMode(display=False) if cached and step == 0 else None
        with counter or nullcontext(), torch.autocast(**autocast):
            rows = torch.randint(0, len(pixels), (n,), generator=g).tolist()
            if cached:
                latents, cond = latents_all[rows], cond_all.rows(rows)
            else:  # as the example scripts do: decode and encode the pictures and the captions at every step
                res = recipe.data.resolution
                decoded = torch.stack([load_image(paths[r], (res, res)) for r in rows]).to(device, pixels.dtype)
                with torch.no_grad():
                    latents = base.vae.encode(decoded).latent_dist.sample().float() * base.vae.config.scaling_factor
                    cond = base.family.encode(base, tuple(t[rows].to(device) for t in tokens))
            noise = torch.randn(latents.shape, generator=g).to(device)
            timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (n,), generator=g).to(device)
            noisy = scheduler.add_noise(latents, noise, timesteps)
            batch = Batch(latents, tuple(t[rows] for t in tokens), [""] * n, g, cond)
            loss = F.mse_loss(predict(base, noisy, timesteps, batch).float(), noise)
            loss.backward()
        if counter is not None:
            flops = {"step_flops": counter.get_total_flops()}
        if not cached:
            torch.nn.utils.clip_grad_norm_(params, recipe.train.max_grad_norm or 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if not cached:
            bar.set_postfix(loss=loss.detach().item())
            bar.update(1)
    _sync(device)
    bar.close()
    return (time.perf_counter() - start) / steps, flops


def _pictures(folder: Path, side: int) -> None:
    """The toy world's four heart pictures, enlarged to `side` px where smaller (a recipe refuses pictures below its
    resolution)."""
    from PIL import Image

    from .toy.world import write_subject_folder

    for path in write_subject_folder(folder, "heart"):
        with Image.open(path) as img:
            small = img.width < side
            if small:
                img = img.resize((side, side), Image.Resampling.BICUBIC)
        if small:
            img.save(path)


def _throughput(flops: int | None, steps_s: float, device: torch.device, precision: str) -> dict:
    """Achieved TFLOP/s of the step's math, and where the device's peak is known (CUDA, bf16/fp16) the MFU."""
    from .trainers.mfu import peak_flops

    if not flops:
        return {}
    peak = peak_flops(device, precision)
    return {"tflops_s": round(flops * steps_s / 1e12, 3), **({"mfu": round(flops * steps_s / peak, 4)} if peak else {})}


def bench(recipes: list[str], base: str | None = None, resolution: int | None = None, batch: int | None = None,
          steps: int = 200, warmup: int = 20, sets: list[str] = (), log=print) -> dict:
    """{recipe: {loop: {ms_step, steps_s, images_s, peak memory, TFLOP/s, MFU}, ratios, settings}} for every recipe;
    `sets` (KEY=VALUE) change the recipe of every loop."""
    results = {}
    with tempfile.TemporaryDirectory(prefix="dreamloom-bench-") as tmp:
        data = Path(tmp) / "pictures"
        for name in recipes:
            recipe = _recipe(name, data, base, resolution, batch, steps, warmup, list(sets))
            _pictures(data, max(*recipe.data.all_resolutions, recipe.data.min_image_size))
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            row, n, measured = {}, recipe.train.batch_size, {}
            for loop in ("bare", "reference", "dreamloom"):  # the bare loop first: it counts the step's FLOPs
                log(f"bench {name}: {loop} loop, {warmup} + {steps} steps")
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                seconds, measured[loop] = _ours(recipe, Path(tmp) / "runs", warmup, steps) if loop == "dreamloom" \
                    else _loop(recipe, warmup, steps, cached=loop == "bare")
                row[loop] = {"ms_step": round(1000 * seconds, 2), "steps_s": round(1 / seconds, 2),
                             "images_s": round(n / seconds, 2), **_peak_mb(device)}
            flops = measured["bare"].get("step_flops")
            for loop in LOOPS:
                row[loop].update(_throughput(flops, 1000 / row[loop]["ms_step"], device, _precision(recipe, device)))
            row = {loop: row[loop] for loop in LOOPS}
            row["dreamloom"].update(measured["dreamloom"])
            ours = row["dreamloom"]["ms_step"]
            row["ratios"] = {"dreamloom_over_bare": round(ours / row["bare"]["ms_step"], 3),
                             "reference_over_dreamloom": round(row["reference"]["ms_step"] / ours, 3)}
            row["settings"] = {"base": recipe.base.model, "resolution": recipe.data.resolution, "batch": n,
                               "steps": steps, "warmup": warmup, "sets": list(sets), "step_flops": flops,
                               "mixed_precision": _precision(recipe, device), "device": str(device),
                               "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                               "threads": torch.get_num_threads()}
            results[name] = row
    return results


def table(results: dict) -> str:
    lines = ["| recipe | loop | ms/step | steps/s | images/s | peak memory (MB) | TFLOP/s | MFU |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, row in results.items():
        for loop in LOOPS:
            r = row[loop]
            memory = r.get("peak_allocated_mb", r.get("peak_rss_mb"))
            compiled = f" (compiling: {r['compile_s']} s before)" if "compile_s" in r else ""
            lines.append(f"| {name} | {loop}{compiled} | {r['ms_step']} | {r['steps_s']} | {r['images_s']} | {memory} | "
                         f"{r.get('tflops_s', '')} | {r.get('mfu', '')} |")
        ratios = row["ratios"]
        lines.append(f"| {name} | ratios | dreamloom / bare = {ratios['dreamloom_over_bare']} | reference / dreamloom "
                     f"= {ratios['reference_over_dreamloom']} | | | | |")
    return "\n".join(lines)


def run_bench(args) -> int:
    results = bench(args.recipes or ["tiny-lora"], args.base, args.resolution, args.batch, args.steps, args.warmup,
                    args.set)
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
        print(f"wrote {args.json}")
    return 0
