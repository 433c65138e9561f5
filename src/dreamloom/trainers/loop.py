"""The one training loop every method runs in. Read it top to bottom: set-up, steps, end."""

from __future__ import annotations

import dataclasses
import errno
import resource
import signal
import threading
import time
import traceback
from contextlib import ExitStack, contextmanager, nullcontext, suppress

import torch
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from ..datasets import load_items
from ..errors import DreamloomError, RecipeError, TrainingStopped
from ..models import Base, load_base
from ..paths import free_bytes, human_bytes
from ..sampling import generate, make_grid
from .checkpoint import load_checkpoint, register_hooks, save_checkpoint
from .data import TrainingData
from .ema import Ema
from .fused import FusedOptimizer
from .method import Method, unwrap
from .optim import WEIGHT_DTYPES, make_optimizer, resolve_mixed_precision
from .prior import class_items
from .registry import get_method

PARTS = ("unet", "vae", "text_encoder")


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


def cast_for_precision(base: Base, dtype: torch.dtype, keep_trained: bool) -> None:
    """Frozen weights in the compute dtype (half the memory). Trained weights stay fp32 unless
    the recipe keeps them in bf16 (stochastic rounding takes care of their updates)."""
    if dtype == torch.float32:
        return
    for name in PARTS:
        for p in getattr(base, name).parameters():
            if not p.requires_grad or keep_trained:
                p.data = p.data.to(dtype)


@contextmanager
def parts_on(base: Base, device: torch.device):
    """Bring offloaded parts (VAE, frozen text encoder) to the device for sampling, then back."""
    where = {name: next(getattr(base, name).parameters()).device for name in PARTS}
    for name in PARTS:
        getattr(base, name).to(device)
    try:
        yield
    finally:
        for name, dev in where.items():
            getattr(base, name).to(dev)


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
    prompts = [recipe.fill(p) for p in s.prompts]
    with parts_on(base, accelerator.device), accelerator.autocast():
        images = generate(plain(base).pipeline(), prompts, negative_prompt=s.negative_prompt, steps=s.steps,
                          guidance_scale=s.guidance_scale, seed=s.seed, images_per_prompt=s.images_per_prompt)
    run.samples.mkdir(exist_ok=True)
    path = run.samples / f"step-{step:08d}.png"
    make_grid(images, cols=s.images_per_prompt).save(path)
    run.log("sample", step=step, path=str(path), prompts=prompts)


class StopRequest:
    """SIGTERM (a cancel from the job queue, the worker's death, `kill`) and Ctrl-C ask training to
    stop after the current step, with a checkpoint, rather than losing the work since the last one.
    A second Ctrl-C stops at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested = False
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def _handle(self, signum, frame):
        if signum == signal.SIGINT:
            if self.requested:
                raise KeyboardInterrupt
            print("\nstopping after this step, with a checkpoint (Ctrl-C again to stop at once)", flush=True)
        self.requested = True

    def close(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def train(run, base: Base | None = None, items=None) -> list:
    """Train the run's recipe to the end, from its latest checkpoint if it has one; returns the
    exported files. Every event lands in the run's events.jsonl."""
    stop = StopRequest()
    try:
        return _train(run, base, items, stop)
    except TrainingStopped as exc:
        run.log("stopped", message=str(exc))
        raise
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            run.log("error", message=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
            raise
        run.remove_partial_checkpoints()
        message = (f"no space left on the device of '{run.path}' ({human_bytes(free_bytes(run.path))} free). Free some "
                   f"space, then continue with `dreamloom train --resume {run.path}`")
        with suppress(OSError):  # the event log is on that full disk too
            run.log("error", message=message)
        raise DreamloomError(message) from None
    except BaseException as exc:
        run.log("error", message=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
        raise
    finally:
        stop.close()


def _train(run, base, items, stop: StopRequest):
    recipe = run.recipe()
    t = recipe.train
    items = items if items is not None else dataset_items(recipe)
    base = base if base is not None else load_base(recipe.base.model)
    method = get_method(recipe.method)(recipe)

    precision = resolve_mixed_precision(t.mixed_precision, PartialState().device)
    if t.weights_dtype == "bf16" and precision != "bf16":
        raise RecipeError("train.weights_dtype = 'bf16' needs bf16 mixed precision, which this device lacks.")
    AcceleratorState._reset_state()  # a process (a test, the studio) may train runs of differing precision
    accelerator = Accelerator(mixed_precision=precision)
    if t.fused_backward and accelerator.num_processes > 1:
        raise RecipeError("train.fused_backward steps weights before gradients are averaged across GPUs; "
                          "turn it off for multi-GPU runs.")
    device = accelerator.device
    torch.manual_seed(t.seed)
    base.to(device)

    prior = None
    if recipe.prior.enabled:  # generated from the untouched base, before any training memory exists
        with accelerator.autocast():
            prior_items, made = class_items(recipe, base, log=lambda m: print(m, flush=True))
        run.log("class_images", count=len(prior_items), generated=made, folder=str(prior_items[0].path.parent))

    groups = method.prepare(base)
    if t.gradient_checkpointing:
        base.unet.enable_gradient_checkpointing()
        if "text_encoder" in method.trainable_modules:
            base.text_encoder.gradient_checkpointing_enable()
    cast_for_precision(base, WEIGHT_DTYPES[precision], keep_trained=t.weights_dtype == "bf16")
    data = TrainingData(items, recipe, base)
    if recipe.prior.enabled:
        prior = TrainingData(prior_items, recipe, base, seed=t.seed + 1, repeats=1)
    if device.type == "cuda":  # latents and captions are cached: those parts wait in CPU memory
        if data.cached:
            base.vae.to("cpu")
        if data.hidden_states is not None:
            base.text_encoder.to("cpu")

    params = [p for g in groups for p in g["params"]]
    names = method.trainable_modules
    if t.fused_backward:
        optimizer = FusedOptimizer(t, groups, seed=t.seed)
        modules = accelerator.prepare(*[getattr(base, n) for n in names])
        modules = list(modules) if isinstance(modules, (list, tuple)) else [modules]
        accelerator.register_for_checkpointing(optimizer)
    else:
        *modules, optimizer = accelerator.prepare(*[getattr(base, n) for n in names], make_optimizer(t, groups))
    for name, module in zip(names, modules):
        setattr(base, name, module)
    lr_scheduler = get_scheduler(t.lr_scheduler, optimizer, num_warmup_steps=t.lr_warmup_steps,
                                 num_training_steps=t.steps)
    accelerator.register_for_checkpointing(lr_scheduler)
    ema = Ema(params, t.ema_decay, t.ema_on_cpu) if t.ema else None
    register_hooks(accelerator, method, base, ema)

    start = 0
    latest = run.latest_checkpoint()
    if latest is not None:
        start = load_checkpoint(accelerator, latest)
    method.before_step(base, start)
    loss_before = measure_loss(method, base, data) if start == 0 else first_loss(run)
    run.log("start", method=method.name, base=base.spec, steps=t.steps, resumed_from=start,
            device=str(device), mixed_precision=precision, images=len(items),
            class_images=len(prior.items) if prior else 0,
            trainable_params=sum(p.numel() for p in params), loss_before=loss_before)

    for module in modules:
        module.train()
    bar = tqdm(total=t.steps, initial=start, desc=recipe.name, disable=not accelerator.is_main_process)
    try:
        last_time, last_step = time.perf_counter(), start
        for step in range(start, t.steps):
            torch.manual_seed(t.seed + step)  # dropout and the like: same per step after a resume
            method.before_step(base, step)
            step_loss = 0.0
            for micro in range(t.gradient_accumulation):
                last_micro = micro == t.gradient_accumulation - 1
                if t.fused_backward:
                    optimizer.begin_step(step, last_micro)
                with ExitStack() as stack:
                    if not last_micro:  # sync gradients across GPUs only once per step
                        for module in modules:
                            stack.enter_context(accelerator.no_sync(module))
                    batch = data.batch(step, micro)
                    if prior:
                        batch = batch.with_prior(prior.batch(step, micro), recipe.prior.loss_weight)
                    loss = method.loss(base, batch) / t.gradient_accumulation
                    accelerator.backward(loss)
                step_loss += loss.item()
            if t.max_grad_norm and not t.fused_backward:  # the fused pass clips inside its hooks
                accelerator.clip_grad_norm_(params, t.max_grad_norm)
            lr = lr_scheduler.get_last_lr()[0]  # the rate this step used
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if ema:
                ema.step()
            done = step + 1
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}")

            if done % t.log_every == 0 or done == t.steps:
                now = time.perf_counter()
                it_s = (done - last_step) / max(now - last_time, 1e-9)
                run.log("step", step=done, loss=step_loss, lr=lr, it_s=round(it_s, 3),
                        images_s=round(it_s * t.batch_size * t.gradient_accumulation, 3),
                        peak_mem_mb=round(peak_memory_mb(device), 1))
                last_time, last_step = now, done
            if done < t.steps and (stop.requested or (t.checkpoint_every and done % t.checkpoint_every == 0)):
                path = save_checkpoint(accelerator, run, done, t.keep_checkpoints)
                run.log("checkpoint", step=done, path=str(path))
            if stop.requested and done < t.steps:
                raise TrainingStopped(f"stopped at step {done} of {t.steps} with a checkpoint; "
                                      f"continue with `dreamloom train --resume {run.path}`")
            if t.sample_every and done % t.sample_every == 0 and done < t.steps and accelerator.is_main_process:
                with ema.applied() if ema else nullcontext():
                    save_samples(run, recipe, base, done, accelerator)
    finally:
        bar.close()
    if t.fused_backward:
        optimizer.remove_hooks()

    path = save_checkpoint(accelerator, run, t.steps, t.keep_checkpoints)
    run.log("checkpoint", step=t.steps, path=str(path))
    exports = []
    if accelerator.is_main_process:
        for module in modules:
            module.eval()
        with ema.applied() if ema else nullcontext():  # samples and exports show the EMA weights
            loss_after = measure_loss(method, base, data)
            save_samples(run, recipe, base, t.steps, accelerator)
            exports = method.export(plain(base), run, recipe.export.formats)
        run.log("export", paths=[str(p) for p in exports])
        run.log("end", step=t.steps, loss_before=loss_before, loss_after=loss_after)
    accelerator.end_training()
    return exports
