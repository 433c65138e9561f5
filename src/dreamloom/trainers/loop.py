"""The one training loop every method runs in. Read it top to bottom: set-up, steps, end."""

from __future__ import annotations

import dataclasses
import resource
import time
import traceback
from contextlib import ExitStack

import torch
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState
from diffusers.optimization import get_scheduler
from diffusers.training_utils import cast_training_params
from tqdm.auto import tqdm

from ..datasets import load_items
from ..models import Base, load_base
from ..sampling import generate, make_grid
from .checkpoint import load_checkpoint, register_hooks, save_checkpoint
from .data import TrainingData, step_generator
from .method import Method, unwrap
from .optim import WEIGHT_DTYPES, make_optimizer, resolve_mixed_precision
from .registry import get_method


def dataset_items(recipe):
    d = recipe.data
    return load_items(d.path, trigger=d.trigger, class_word=d.class_word,
                      caption_template=d.caption_template, min_image_size=d.min_image_size)


def plain(base: Base) -> Base:
    """The base with accelerator wrappers removed: for sampling and exporting."""
    return dataclasses.replace(base, unet=unwrap(base.unet), text_encoder=unwrap(base.text_encoder))


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS


def cast_for_precision(base: Base, method: Method, dtype: torch.dtype) -> None:
    """Frozen weights in the compute dtype (half the memory); trained weights stay fp32."""
    if dtype == torch.float32:
        return
    for name in ("unet", "vae", "text_encoder"):
        module = getattr(base, name)
        module.to(dtype=dtype)
        if name in method.trainable_modules:
            cast_training_params(module, dtype=torch.float32)


@torch.no_grad()
def measure_loss(method: Method, base: Base, data: TrainingData, n: int = 16) -> float:
    """Loss on the training images with fixed noise and timesteps: comparable across a run."""
    losses = []
    for k in range(n):
        g = torch.Generator().manual_seed(1_000_000 + k)
        losses.append(method.loss(base, data.make_batch([k % len(data.items)], g)).item())
    return sum(losses) / n


def first_loss(run) -> float | None:
    """The loss measured when the run first started (a resumed run reports against it)."""
    return next((e.get("loss_before") for e in run.events() if e["event"] == "start"), None)


def save_samples(run, recipe, base: Base, step: int, accelerator: Accelerator) -> None:
    s = recipe.sample
    with accelerator.autocast():
        images = generate(plain(base).pipeline(), [recipe.fill(p) for p in s.prompts],
                          negative_prompt=s.negative_prompt, steps=s.steps, guidance_scale=s.guidance_scale,
                          seed=s.seed, images_per_prompt=s.images_per_prompt)
    run.samples.mkdir(exist_ok=True)
    path = run.samples / f"step-{step:08d}.png"
    make_grid(images, cols=s.images_per_prompt).save(path)
    run.log("sample", step=step, path=str(path), prompts=[recipe.fill(p) for p in s.prompts])


def train(run, base: Base | None = None, items=None, resume: bool = False) -> list:
    """Train the run's recipe to the end (resuming from its latest checkpoint if asked);
    returns the exported files. Every event lands in the run's events.jsonl."""
    try:
        return _train(run, base, items, resume)
    except BaseException as exc:
        run.log("error", message=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
        raise


def _train(run, base, items, resume):
    recipe = run.recipe()
    t = recipe.train
    items = items if items is not None else dataset_items(recipe)
    base = base if base is not None else load_base(recipe.base.model)
    method = get_method(recipe.method)(recipe)

    precision = resolve_mixed_precision(t.mixed_precision, PartialState().device)
    AcceleratorState._reset_state()  # a process (a test, the studio) may train runs of differing precision
    accelerator = Accelerator(mixed_precision=precision)
    torch.manual_seed(t.seed)

    groups = method.prepare(base)
    if t.gradient_checkpointing:
        base.unet.enable_gradient_checkpointing()
        if "text_encoder" in method.trainable_modules:
            base.text_encoder.gradient_checkpointing_enable()
    cast_for_precision(base, method, WEIGHT_DTYPES[precision])
    base.to(accelerator.device)
    data = TrainingData(items, recipe, base)
    if data.cached and accelerator.device.type == "cuda":
        base.vae.to("cpu")  # latents are cached: the VAE is only needed again for samples

    optimizer = make_optimizer(t, groups)
    lr_scheduler = get_scheduler(t.lr_scheduler, optimizer, num_warmup_steps=t.lr_warmup_steps,
                                 num_training_steps=t.steps)
    names = method.trainable_modules
    *modules, optimizer = accelerator.prepare(*[getattr(base, n) for n in names], optimizer)
    for name, module in zip(names, modules):
        setattr(base, name, module)
    accelerator.register_for_checkpointing(lr_scheduler)
    register_hooks(accelerator, method, base)
    params = [p for g in groups for p in g["params"]]

    start = 0
    latest = run.latest_checkpoint() if resume else None
    if latest is not None:
        start = load_checkpoint(accelerator, latest)
    loss_before = measure_loss(method, base, data) if start == 0 else first_loss(run)
    run.log("start", method=method.name, base=base.spec, steps=t.steps, resumed_from=start,
            device=str(accelerator.device), mixed_precision=precision, images=len(items),
            trainable_params=sum(p.numel() for p in params), loss_before=loss_before)

    for module in modules:
        module.train()
    bar = tqdm(total=t.steps, initial=start, desc=recipe.name, disable=not accelerator.is_main_process)
    last_time, last_step = time.perf_counter(), start
    for step in range(start, t.steps):
        torch.manual_seed(t.seed + step)  # dropout and the like: same per step after a resume
        step_loss = 0.0
        for micro in range(t.gradient_accumulation):
            with ExitStack() as stack:
                if micro < t.gradient_accumulation - 1:  # sync gradients across GPUs only once
                    for module in modules:
                        stack.enter_context(accelerator.no_sync(module))
                loss = method.loss(base, data.batch(step, micro)) / t.gradient_accumulation
                accelerator.backward(loss)
            step_loss += loss.item()
        if t.max_grad_norm:
            accelerator.clip_grad_norm_(params, t.max_grad_norm)
        lr = lr_scheduler.get_last_lr()[0]  # the rate this step used
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.4f}")

        if done % t.log_every == 0 or done == t.steps:
            now = time.perf_counter()
            it_s = (done - last_step) / max(now - last_time, 1e-9)
            run.log("step", step=done, loss=step_loss, lr=lr, it_s=round(it_s, 3),
                    images_s=round(it_s * t.batch_size * t.gradient_accumulation, 3),
                    peak_mem_mb=round(peak_memory_mb(accelerator.device), 1))
            last_time, last_step = now, done
        if t.checkpoint_every and done % t.checkpoint_every == 0 and done < t.steps:
            path = save_checkpoint(accelerator, run, done, t.keep_checkpoints)
            run.log("checkpoint", step=done, path=str(path))
        if t.sample_every and done % t.sample_every == 0 and done < t.steps and accelerator.is_main_process:
            save_samples(run, recipe, base, done, accelerator)
    bar.close()

    path = save_checkpoint(accelerator, run, t.steps, t.keep_checkpoints)
    run.log("checkpoint", step=t.steps, path=str(path))
    exports = []
    if accelerator.is_main_process:
        for module in modules:
            module.eval()
        loss_after = measure_loss(method, base, data)
        save_samples(run, recipe, base, t.steps, accelerator)
        exports = method.export(plain(base), run, recipe.export.formats)
        run.log("export", paths=[str(p) for p in exports])
        run.log("end", step=t.steps, loss_before=loss_before, loss_after=loss_after)
    accelerator.end_training()
    return exports
