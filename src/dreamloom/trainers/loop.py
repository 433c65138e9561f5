"""The one training loop every method runs in. Read it top to bottom: `train` sets up, runs the
steps and finishes; each of those three is one function below."""

from __future__ import annotations

import errno
import os
import time
import traceback
from contextlib import ExitStack, contextmanager, nullcontext, suppress
from dataclasses import dataclass, field

import torch
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from ..datasets.sources import DataSplit, recipe_data
from ..errors import DreamloomError, RecipeError, TrainingStopped
from ..models import Base
from ..models.base import load_recipe_base
from ..paths import free_bytes, human_bytes
from .checkpoint import load_checkpoint, register_hooks, save_checkpoint
from .compiling import compile_blocks
from .data import TrainingData, TrainingStream, without_trigger
from .ema import Ema
from .method import Method
from .mfu import StepFlops
from .observe import StopRequest, first_loss, measure_loss, peak_memory_mb, save_samples
from .optim import WEIGHT_DTYPES, prepare_optimizer, resolve_mixed_precision
from .parts import cast_for_precision, enable_gradient_checkpointing, offload_cached, unwrapped
from .prior import class_items
from .registry import get_method
from .sharding import Sharding, Unsharded, local
from .trackers import start_trackers


def dataset_items(recipe) -> DataSplit:
    """The run's training, regularization and validation pictures, every one decoded and checked."""
    return recipe_data(recipe)


@dataclass
class TrainState:
    """Everything the steps share, made once by `set_up`."""

    run: object
    recipe: object
    method: Method
    base: Base
    accelerator: Accelerator
    modules: list  # the trained parts, as the accelerator prepared them
    optimizer: object  # StandardOptimizer | FusedOptimizer: begin_step, clip, step, close
    lr_scheduler: object
    stream: TrainingStream
    validation: TrainingData | None  # the held-out pictures, measured at every checkpoint
    params: list
    ema: Ema | None
    sharding: Sharding | Unsharded  # whole weights for checkpoints, samples and exports, on the main process
    start: int
    loss_before: float
    flops: StepFlops
    compiled: int  # how many UNet blocks train.compile compiled (0: none)
    lr: float = 0.0  # the rate the latest step used
    losses: list = field(default_factory=list)  # the losses of the steps since the last log event, on the device


def train(run, base: Base | None = None, items: DataSplit | None = None) -> list:
    """Train the run's recipe to the end, from its latest checkpoint if it has one; returns the
    exported files. Every event lands in the run's events.jsonl."""
    stop = StopRequest(run.stop_file)
    try:
        state = set_up(run, base, items)
        t = state.recipe.train
        with tqdm(total=t.steps, initial=state.start, desc=state.recipe.name,
                  disable=not state.accelerator.is_main_process) as bar:
            timer = (time.perf_counter(), state.start)
            for step in range(state.start, t.steps):
                train_step(state, step)
                bar.update(1)
                if state.compiled and step == state.start:  # the first step compiles: its time is not a step's
                    state.run.log("compile", blocks=state.compiled, seconds=round(time.perf_counter() - timer[0], 2))
                    timer = (time.perf_counter(), step + 1)
                timer = log_step(state, step + 1, timer, bar)
                if step + 1 < t.steps:
                    between_steps(state, step + 1, stop)
        return finish(state)
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


def set_up(run, base, items) -> TrainState:
    """The accelerator, the method on the base, the data, the optimizer and schedule, then the
    state of the latest checkpoint (if any) restored."""
    recipe = run.recipe()
    t = recipe.train
    items = items if items is not None else dataset_items(recipe)
    base = base if base is not None else load_recipe_base(recipe.base)
    method = get_method(recipe.method)(recipe)
    for note in recipe.notes(base.arch):
        run.log("warning", message=note)

    cpu = processes_without_gpus()
    precision = resolve_mixed_precision(t.mixed_precision, PartialState(cpu=cpu).device)
    if t.weights_dtype == "bf16" and precision != "bf16":
        raise RecipeError("train.weights_dtype = 'bf16' needs bf16 mixed precision, which this device lacks.")
    AcceleratorState._reset_state()  # a process (a test, the studio) may train runs of differing precision
    trackers = dict(log_with=t.log_with, project_dir=str(run.path / "logs")) if t.log_with else {}
    accelerator = Accelerator(mixed_precision=precision, cpu=cpu, **trackers)
    if t.fused_backward and accelerator.num_processes > 1:
        raise RecipeError("train.fused_backward steps weights before gradients are averaged across GPUs; "
                          "turn it off for multi-GPU runs.")
    torch.manual_seed(t.seed)
    base.to(accelerator.device)

    classes, class_list = None, list(items.regularization)
    if recipe.prior.enabled:  # generated from the untouched base, before any training memory exists
        with accelerator.main_process_first(), accelerator.autocast():  # the others then find them made
            prior_list, made = class_items(recipe, base, log=lambda m: print(m, flush=True))
        class_list += prior_list
        run.log("class_images", count=len(prior_list), generated=made, folder=str(prior_list[0].path.parent))

    groups = method.prepare(base)
    parts = method.trainable_parts(base)
    if t.gradient_checkpointing:
        enable_gradient_checkpointing(base, parts)
    cast_for_precision(base, WEIGHT_DTYPES[precision], keep_trained=t.weights_dtype == "bf16")
    sharded = t.strategy != "ddp" and accelerator.num_processes > 1
    if t.channels_last and not sharded:
        # NHWC: the layout oneDNN's and cuDNN's fast convolutions read (BENCHMARKS.md); FSDP2 shards kept plain, untried
        base.unet.to(memory_format=torch.channels_last)
    compiled = 0
    if t.compile == "blocks":
        compiled = compile_blocks(base.unet)
    processes = accelerator.num_processes
    data = TrainingData(items.train, recipe, base, processes=processes, hue_jitter=recipe.data.hue_jitter)
    if class_list:  # each batch of class pictures comes at the size of the instance batch it joins
        sizes = list(dict.fromkeys(e.size for e in data.examples))
        classes = TrainingData(class_list, recipe, base, seed=t.seed + 1, repeats=1, sizes=sizes, processes=processes)
    validation = TrainingData(items.validation, recipe, base, seed=t.seed + 2, repeats=1) if items.validation else None
    plain = None
    if recipe.prior.output_preservation:  # the same pictures in the same order, captioned without the trigger
        plain = TrainingData(without_trigger(items.train, recipe.data.trigger), recipe, base, processes=processes)
    if accelerator.device.type == "cuda":  # latents and captions are cached: those parts wait in CPU memory
        offload_cached(base, data.cached, data.cond is not None)

    sharding = Unsharded(accelerator.is_main_process)
    if sharded:
        if precision == "fp16":
            raise RecipeError(f"train.strategy = '{t.strategy}' cannot scale fp16 losses; set train.mixed_precision = 'bf16'.")
        sharding = Sharding(base, parts, t.strategy, accelerator.is_main_process, WEIGHT_DTYPES[precision])
        groups = sharding.regroup(groups, base)
    params = [p for g in groups for p in g["params"]]
    modules, optimizer = prepare_optimizer(t, groups, accelerator, [getattr(base, n) for n in parts], params,
                                           sharded=isinstance(sharding, Sharding))
    base = base.with_modules(**dict(zip(parts, modules)))
    lr_scheduler = get_scheduler(t.lr_scheduler, optimizer.schedulable, num_warmup_steps=t.lr_warmup_steps,
                                 num_training_steps=t.steps)
    accelerator.register_for_checkpointing(lr_scheduler)
    ema = Ema(params, t.ema_decay, t.ema_on_cpu) if t.ema else None
    register_hooks(accelerator, method, base, sharding, ema)

    latest = run.latest_checkpoint()
    start = load_checkpoint(accelerator, latest) if latest is not None else 0
    method.before_step(base, start)
    loss_before = measure_loss(method, unwrapped(base), data) if start == 0 else first_loss(run)
    run.log("start", method=method.name, base=base.spec, steps=t.steps, resumed_from=start,
            device=str(accelerator.device), mixed_precision=precision, images=len(items.train),
            validation_images=len(items.validation), buckets=len({e.size for e in data.examples}),
            class_images=len(classes.items) if classes else 0,
            trainable_params=sum(p.numel() for p in params), loss_before=loss_before,
            strategy=t.strategy if isinstance(sharding, Sharding) else "ddp" if processes > 1 else None,
            trained_bytes_per_process=sum(local(p).numel() * p.element_size() for p in params))
    part = (accelerator.process_index, processes) if processes > 1 else None
    stream = TrainingStream(data, classes, recipe.prior.loss_weight, part, plain, recipe.prior.output_preservation)
    state = TrainState(run, recipe, method, base, accelerator, modules, optimizer, lr_scheduler, stream, validation,
                       params, ema, sharding, start, loss_before, StepFlops(accelerator.device, precision), compiled)
    start_trackers(accelerator, recipe)
    if start == 0:
        log_validation(state, 0)
    for module in modules:
        module.train()
    return state


def train_step(state: TrainState, step: int) -> None:
    """One optimizer step over gradient_accumulation micro-batches; its loss joins state.losses, on the device."""
    t, accelerator, optimizer = state.recipe.train, state.accelerator, state.optimizer
    seed_step(accelerator.device, t.seed + step)
    state.method.before_step(state.base, step)
    step_loss = torch.zeros((), device=accelerator.device)
    # The FLOPs of one step, once, for the MFU (CUDA only): the first, or with train.compile the one after it
    with state.flops.counting(ready=not state.compiled or step > state.start):
        for micro in range(t.gradient_accumulation):
            last_micro = micro == t.gradient_accumulation - 1
            optimizer.begin_step(step, last_micro)
            with ExitStack() as stack:
                if not last_micro:  # sync gradients across GPUs only once per step
                    for module in state.modules:
                        stack.enter_context(accelerator.no_sync(module))
                loss = state.method.loss(state.base, state.stream.batch(step, micro)) / t.gradient_accumulation
                accelerator.backward(loss)
            step_loss += loss.detach().float()  # on the device: read every log_every steps, no host sync here
    if accelerator.num_processes > 1:  # each process's loss is its rows' share of the whole batch's
        step_loss = accelerator.reduce(step_loss, "mean")
    state.losses.append(step_loss)
    optimizer.clip()
    state.lr = state.lr_scheduler.get_last_lr()[0]  # the rate this step used
    optimizer.step()
    state.lr_scheduler.step()
    if state.ema:
        state.ema.step()


def read_losses(state: TrainState, done: int, keep: bool = False) -> float:
    """The mean loss of the steps since the last read (one host sync; `keep`: they stay for the next), after checking
    that each was finite: a non-finite loss stops training before any checkpoint could hold the weights it ruined."""
    losses = torch.stack(state.losses).cpu()
    state.losses = state.losses if keep else []
    bad = torch.nonzero(~torch.isfinite(losses)).flatten().tolist()
    if bad:  # training on would only spread the NaN through every weight
        step = done - len(losses) + bad[0] + 1
        raise DreamloomError(
            f"the loss became {losses[bad[0]].item()} at step {step}: the weights are ruined, so training stopped "
            "(checkpoints made so far are intact). Usually fp16 overflowing: set train.mixed_precision = 'bf16' (or "
            f"'no'); else lower train.learning_rate ({state.recipe.train.learning_rate:g}); then resume.")
    return losses.mean().item()


def seed_step(device: torch.device, seed: int) -> None:
    """Dropout and the like draw the same at a step after a resume. The global generators of this device only:
    torch.manual_seed would seed every kind of device there is, at 50 times the cost."""
    torch.random.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed(seed)


def log_step(state: TrainState, done: int, timer: tuple[float, int], bar) -> tuple[float, int]:
    """Every log_every steps and at the last: the mean loss since the last, speed and memory, as an event."""
    t = state.recipe.train
    if done % t.log_every and done != t.steps:
        return timer
    loss = read_losses(state, done)
    bar.set_postfix(loss=f"{loss:.4f}")
    now, timed = time.perf_counter(), done - timer[1]  # timed 0: the one step since was the compiling one
    speed = {}
    if timed:
        it_s = timed / max(now - timer[0], 1e-9)
        speed = dict(it_s=round(it_s, 3), **state.flops.mfu(it_s), images_s=round(
            it_s * t.batch_size * t.gradient_accumulation * state.accelerator.num_processes, 3))
    state.run.log("step", step=done, loss=loss, lr=state.lr, peak_mem_mb=round(peak_memory_mb(state.accelerator.device), 1),
                  **speed)
    state.accelerator.log({"loss": loss, "lr": state.lr, **({"it_s": speed["it_s"]} if speed else {})}, step=done)
    return now, done


def between_steps(state: TrainState, done: int, stop: StopRequest) -> None:
    """A checkpoint when due or asked for (then stop, if asked); the validation loss with each
    checkpoint; validation samples when due (and at checkpoints with sample.at_checkpoints)."""
    t, run = state.recipe.train, state.run
    due = bool(t.checkpoint_every and done % t.checkpoint_every == 0)
    # Processes agree on a stop through a collective (a host sync): every log_every steps and at checkpoints, not each step.
    asked = state.accelerator.num_processes == 1 or due or done % t.log_every == 0
    stopping = asked and agreed(state.accelerator, stop.requested)
    if stopping or due:
        if state.losses:  # never a checkpoint of weights a non-finite loss has ruined
            read_losses(state, done, keep=True)
        path = save_checkpoint(state.accelerator, run, done, t.keep_checkpoints)
        run.log("checkpoint", step=done, path=str(path))
    if due:  # before a stop too: a resumed run starts after this step and would never measure it
        log_validation(state, done)
    if stopping:
        raise TrainingStopped(f"stopped at step {done} of {t.steps} with a checkpoint; "
                              f"continue with `dreamloom train --resume {run.path}`")
    sample_due = (t.sample_every and done % t.sample_every == 0) or (due and state.recipe.sample.at_checkpoints)
    if sample_due:
        with whole_model(state) as whole:
            if whole is not None:  # the main process
                save_samples(run, state.recipe, whole, done, state.accelerator)


def processes_without_gpus() -> bool:
    """Several processes launched on a machine without a GPU: they train on the CPU, over gloo."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def agreed(accelerator, requested: bool) -> bool:
    """A stop one process was asked for (a signal reaches each at its own moment) is taken by all
    at the same step: their checkpoint is one collective save."""
    if accelerator.num_processes == 1:
        return requested
    flag = torch.tensor(float(requested), device=accelerator.device)
    return accelerator.reduce(flag, "sum").item() > 0


@contextmanager
def whole_model(state: TrainState):
    """The whole trained model on the main process (None on the others; sharded weights are gathered), with the EMA
    weights applied, and run eagerly: compiled blocks are for training steps (an eval pass would compile them anew)."""
    with state.ema.applied() if state.ema else nullcontext(), state.sharding.gathered(state.base) as whole, \
            torch.compiler.set_stance("force_eager"):
        yield whole


@contextmanager
def evaluating(state: TrainState, whole):
    """The trained parts of `whole` in eval mode (no dropout) for the duration."""
    modules = [getattr(whole, part) for part in state.method.trainable_parts(whole)]
    training = [m.training for m in modules]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for module, was in zip(modules, training):
            module.train(was)


def log_validation(state: TrainState, step: int) -> None:
    """The loss on the held-out pictures (every process takes part: sharded weights are gathered)."""
    if state.validation is not None:
        with whole_model(state) as whole:
            if whole is not None:
                validation_loss(state, whole, step)


def validation_loss(state: TrainState, whole, step: int) -> None:
    """The loss on the held-out pictures, at the same noise and timesteps every time (so that the
    checkpoints' figures compare), on the main process through whole, unwrapped parts (DDP's forward
    would wait for the others)."""
    if state.validation is None:
        return
    with evaluating(state, whole):
        loss = measure_loss(state.method, whole, state.validation, n=max(16, len(state.validation.examples)))
    state.run.log("validation", step=step, loss=loss)
    state.accelerator.log({"validation_loss": loss}, step=step)


def finish(state: TrainState) -> list:
    """The last checkpoint, then (main process) the final loss, samples and exports with the EMA weights."""
    t, run, accelerator = state.recipe.train, state.run, state.accelerator
    state.optimizer.close()
    path = save_checkpoint(accelerator, run, t.steps, t.keep_checkpoints)
    run.log("checkpoint", step=t.steps, path=str(path))
    # The trained model as it is sampled and handed back: in the layout a loader reads its export into, so that the
    # export draws what it draws (train.channels_last is a layout for training steps)
    unwrapped(state.base).unet.to(memory_format=torch.contiguous_format)
    exports = []
    with whole_model(state) as whole:  # samples and exports show the EMA weights
        if whole is not None:
            validation_loss(state, whole, t.steps)
            for part in state.method.trainable_parts(whole):  # and stay so: the trained model is used as it is exported
                getattr(whole, part).eval()
            loss_after = measure_loss(state.method, whole, state.stream.data)
            save_samples(run, state.recipe, whole, t.steps, accelerator)
            exports = state.method.export(whole, run, state.recipe.export.formats)
            run.log("export", paths=[str(p) for p in exports])
            run.log("end", step=t.steps, loss_before=state.loss_before, loss_after=loss_after)
    accelerator.end_training()
    return exports
