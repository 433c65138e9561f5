"""`dreamloom estimate`: a run's peak GPU memory from the architecture and the recipe. Weights, gradients, optimizer state
and EMA are counted exactly on the model built on the meta device (no memory, instant), by the loop's rules; activations
are measured: the storages autograd saves in one forward + backward on the meta device, cached per arch x settings."""

from __future__ import annotations

import hashlib
import json
import math
from contextlib import nullcontext
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .atomic import atomic_write
from .errors import RecipeError
from .trainers.noise_loss import predict
from .trainers.parts import enable_gradient_checkpointing
from .trainers.sharding import largest_unit_numel

GiB = 2**30
# The CUDA context and cuBLAS/cuDNN kernels take ~0.3-0.5 GiB on CUDA 12 (lazy loading): they count against the
# card but not in torch.cuda.max_memory_allocated. We reserve 0.5 GiB.
CUDA_CONTEXT = 512 * 2**20
# The caching allocator reserves more than it hands out (block rounding, fragmentation), typically 5-15% over
# max_memory_allocated in training loops: we add 10% of the allocated bytes.
ALLOCATOR_SLACK = 0.10
MEASURE_VERSION = 1  # bump when the measurement changes: cached figures are then measured again
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


@dataclass
class Shardable:
    """What train.strategy divides among the processes: the trained weights of each part (their shapes: FSDP splits
    each tensor along its first dimension, the first process taking the larger piece) and the largest unit one gather
    brings whole (trainers/sharding.py: a ResNet, an attention layer), gathered in the compute dtype."""

    trained: dict[str, list[tuple[tuple[int, ...], int]]]  # part -> (shape, bytes per element) of each trained weight
    unit: int  # trained parameters of the largest unit
    compute_size: int  # bytes per element of a gathered weight (and of its unsharded gradient)

    def whole(self, part: str) -> int:
        return sum(math.prod(shape) * size for shape, size in self.trained[part])

    def share(self, part: str, n: int) -> int:
        """Bytes of the first process's shard of the part's trained weights."""
        return sum(math.ceil(shape[0] / n) * math.prod(shape[1:]) * size if shape else math.prod(shape) * size
                   for shape, size in self.trained[part])

    def numel(self) -> int:
        return sum(math.prod(shape) for part in self.trained for shape, _ in self.trained[part])


@dataclass
class Estimate:
    """Byte counts of what is on the GPU at the peak of a training step."""

    title: str  # recipe, base, resolution, examples per step, precision, trained parameters
    fused: bool
    weights: dict[str, int]  # part on the GPU -> bytes
    weight_labels: dict[str, str]  # part -> its parameters, trained and frozen, and their dtypes
    gradients: int
    optimizer: int
    ema: int
    autocast_copies: int  # compute-dtype copies of fp32 trained weights, held until the forward pass ends
    activations: int  # saved for backward, measured
    backward_transient: int  # gradients of the largest activation and of its neighbour
    step_temporaries: int  # the optimizer step's scratch
    other: int  # the batch on the GPU: latents, noise, text-encoder states
    notes: list[str] = field(default_factory=list)
    hints: dict[str, list[str]] = field(default_factory=dict)  # term -> recipe keys that cut it
    shardable: Shardable | None = None  # a full fine-tune: what train.strategy can divide
    strategy: str = "ddp"  # the figures above are per process of `processes` under this strategy
    processes: int = 1
    unsharded: "Estimate | None" = None  # the figures of one whole copy, which `sharded` divides

    def sharded(self, strategy: str, n: int) -> "Estimate":
        """The figures of one of n processes under an FSDP strategy. Each holds its shard of the trained weights, their
        gradients, the optimizer state and its scratch; full_shard gathers two units whole at a time (the one computing
        and the one prefetched), shard_grad_op keeps every unit whole from its forward to its backward; the unsharded
        gradients of two units wait for their reduce-scatter."""
        e, sh = self.unsharded or self, self.shardable
        if strategy == "ddp" or n == 1 or sh is None:
            return replace(e, strategy="ddp", processes=n, unsharded=None)
        whole = sum(sh.whole(part) for part in sh.trained)
        ratio = sum(sh.share(part, n) for part in sh.trained) / whole
        gathered = (2 * sh.unit if strategy == "full_shard" else sh.numel()) * sh.compute_size
        weights = {part: b - sh.whole(part) + sh.share(part, n) if part in sh.trained else b
                   for part, b in e.weights.items()}
        first = next(iter(sh.trained))
        weights[first] += gathered
        return replace(e, weights=weights, gradients=int(e.gradients * ratio) + 2 * sh.unit * sh.compute_size,
                       optimizer=int(e.optimizer * ratio), step_temporaries=int(e.step_temporaries * ratio),
                       autocast_copies=0,  # the weights are gathered in the compute dtype: nothing left to cast
                       weight_labels={**e.weight_labels, first: e.weight_labels[first] + f"; 1/{n} of the trained "
                                      f"weights, {'two units' if strategy == 'full_shard' else 'every unit'} gathered whole"},
                       strategy=strategy, processes=n, unsharded=e)

    def per_gpu(self, counts=(2, 4, 8)) -> str:
        """The predicted peak per GPU of each strategy at each process count: what to choose train.strategy by."""
        head = f"{'per GPU (GiB)':<16}" + "".join(f"{f'{n} GPUs':>10}" for n in counts)
        rows = [f"{name:<16}" + "".join(f"{self.sharded(name, n).total / GiB:>10.2f}" for n in counts)
                for name in ("ddp", "shard_grad_op", "full_shard")]
        return "\n".join([head, *rows])

    @property
    def allocated(self) -> int:
        """max_memory_allocated. Unless fused, gradients and the step's scratch come as the activations are freed."""
        fixed = sum(self.weights.values()) + self.optimizer + self.ema + self.other
        backward, after = self.activations + self.autocast_copies + self.backward_transient, self.gradients + self.step_temporaries
        return fixed + (backward + after if self.fused else max(backward, after))

    @property
    def total(self) -> int:
        return int(self.allocated * (1 + ALLOCATOR_SLACK)) + CUDA_CONTEXT

    def fits(self, vram_gb: float) -> bool:
        return self.total <= vram_gb * GiB

    def format(self, vram_gb: float | None = None) -> str:
        when = "in the backward pass" if self.fused else "after the backward pass"
        rows = [("weights", f"weights: {part} ({self.weight_labels[part]})", b) for part, b in self.weights.items()] + [
            ("gradients", f"gradients ({'one tensor at a time, fused' if self.fused else when})", self.gradients),
            ("optimizer", "optimizer state", self.optimizer), ("ema", "EMA copy", self.ema),
            ("autocast", "autocast copies of trained weights", self.autocast_copies),
            ("activations", "activations (saved for backward, measured)", self.activations),
            ("transient", "backward transients (2 x largest saved tensor)", self.backward_transient),
            ("step", f"optimizer-step temporaries ({when})", self.step_temporaries), ("other", "batch tensors", self.other),
            ("slack", f"allocator slack ({ALLOCATOR_SLACK:.0%} of allocated)", int(self.allocated * ALLOCATOR_SLACK)),
            ("context", "CUDA context and kernels (fixed)", CUDA_CONTEXT), ("total", "total (predicted peak)", self.total)]
        width = max(len(label) for _, label, _ in rows) + 2
        lines = [f"dreamloom estimate: {self.title}", "", f"{'term':<{width}}{'GiB':>8}"] + [
            f"{label:<{width}}{b / GiB:>8.3f}" for _, label, b in rows]
        if vram_gb is not None and self.fits(vram_gb):
            lines.append(f"\nfits a {vram_gb:g} GiB card ({(vram_gb * GiB - self.total) / GiB:.2f} GiB spare).")
        elif vram_gb is not None:
            big = sorted(rows[:-3], key=lambda r: -r[2])[:3]
            lines.append(f"\nWARNING: needs {self.total / GiB:.2f} GiB, more than the {vram_gb:g} GiB card. Biggest "
                         "terms: " + ", ".join(f"{label.split(' (')[0]} {b / GiB:.2f} GiB" for _, label, b in big) + ".")
            cuts = dict.fromkeys(h for key, _, _ in big for h in self.hints.get(key, []))
            lines += ["To cut them: " + "; ".join(cuts) + "."] if cuts else []
        if self.shardable is not None and not self.fused:
            lines += ["", "train.strategy and train.processes (or jobs submit --gpus):", self.per_gpu()]
        return "\n".join(lines + [f"note: {n}" for n in self.notes])


def _hints(recipe, method) -> dict[str, list[str]]:
    t, full, hints, act = recipe.train, method.full_finetune, {}, ("activations", "transient")
    for keys, applies, hint in [
        (("weights", "gradients", "autocast"), full and t.weights_dtype == "fp32", "train.weights_dtype=bf16 (with train.fused_backward=true)"),
        (("weights",), full, "method=lora"),
        (("weights", "gradients", "optimizer"), full and t.strategy != "full_shard" and not t.fused_backward,
         "train.strategy=full_shard on several GPUs (train.processes, jobs submit --gpus)"), (("gradients",), not t.fused_backward, "train.fused_backward=true"),
        (("weights",), not (recipe.data.cache_latents and recipe.data.crop == "center"), "data.cache_latents=true"),
        (("optimizer", "step"), t.optimizer != "adamw8bit", "train.optimizer=adamw8bit"), (("ema",), t.ema and not t.ema_on_cpu, "train.ema_on_cpu=true"),
        (act, not t.gradient_checkpointing, "train.gradient_checkpointing=true"), (act, True, "a smaller data.resolution"),
        (act, t.batch_size > 1, "a smaller train.batch_size (raise train.gradient_accumulation)"),
        (act, recipe.prior.enabled, "prior.enabled=false (prior preservation doubles the batch)"),
        (act, recipe.prior.output_preservation > 0, "prior.output_preservation=0 (it adds each picture again)")]:
        for key in keys if applies else ():
            hints.setdefault(key, []).append(hint)
    return hints


_LOW = {F.linear, F.conv1d, F.conv2d, torch.matmul, torch.mm, torch.bmm, torch.baddbmm, torch.addmm,
        F.scaled_dot_product_attention, torch.Tensor.matmul, torch.Tensor.bmm, torch.Tensor.mm}
_FP32 = {F.group_norm, F.layer_norm, F.softmax, torch.softmax, torch.Tensor.softmax, F.log_softmax, F.mse_loss,
         torch.pow, torch.Tensor.pow, torch.exp, torch.Tensor.exp}


class _Autocast(TorchFunctionMode):
    """CUDA autocast's policy where autocast cannot see (meta): matmuls in the compute dtype, norms/softmax/losses in
    fp32, fp32 trained weights cast once per forward (autocast's weight cache); None: fp32. SDPA on meta runs as the
    fused kernel (saving q, k, v, out, log-sum-exp as CUDA's flash kernel does), not the math path's score matrix."""

    def __init__(self, dtype: torch.dtype | None):
        super().__init__()
        self.dtype, self.cache = dtype, {}

    def _cast(self, x, dtype):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dtype in (dtype, torch.float64):
            return x
        if x.is_leaf and x.requires_grad and x.dtype == torch.float32:
            return self.cache[id(x)] if id(x) in self.cache else self.cache.setdefault(id(x), x.to(dtype))
        return x.to(dtype)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs, target = kwargs or {}, self.dtype if func in _LOW else torch.float32 if func in _FP32 else None
        if self.dtype is not None and target is not None:
            args, kwargs = [self._cast(a, target) for a in args], {k: self._cast(v, target) for k, v in kwargs.items()}
        if func is F.scaled_dot_product_attention and args[0].device.type == "meta":
            return self.fused_sdpa(*args, **kwargs)
        return func(*args, **kwargs)

    @staticmethod
    def fused_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)[0]


def measure_activations(base, method, resolution: int, batch: int, dtype: torch.dtype, checkpointing: bool) -> dict:
    """Bytes saved for backward in one step's forward + backward on the base's device (meta: no memory), of the autocast
    weight copies and of the largest saved tensor. Checkpointed: the blocks' inputs + the largest block's saves."""
    family, trained_parts = base.family, method.trainable_parts(base)
    parts, device = [getattr(base, name) for name in dict.fromkeys(["unet", *trained_parts])], base.unet.device
    trains_text = family.text_trains(base)
    mode, outer, kept, recompute = _Autocast(None if dtype == torch.float32 else dtype), {}, {}, [[]]
    storage_id = lambda t: t.untyped_storage()._cdata  # noqa: E731  (views share their storage)
    own = {storage_id(t) for m in parts for t in (*m.parameters(), *m.buffers())}

    def record(seen: dict, t: torch.Tensor) -> torch.Tensor:  # each storage once; holding t keeps its id unique
        seen.setdefault(storage_id(t), (t.untyped_storage().nbytes(), t))
        return t
    def saving(seen: dict):
        return torch.autograd.graph.saved_tensors_hooks(lambda t: record(seen, t), lambda t: t)
    def sizes(seen: dict, exclude) -> list[int]:
        return [n for key, (n, _) in seen.items() if key not in exclude]

    def checkpoint(fn, *args, **kwargs):
        with saving(inner := {}):
            fn(*args, **kwargs)  # what this block saves while it is recomputed in the backward pass
        casts = {storage_id(c) for c in mode.cache.values()}
        recompute[0] = max(recompute[0], sizes(inner, own | casts | kept.keys() | outer.keys()), key=sum)
        [record(kept, a) for a in args if isinstance(a, torch.Tensor)]
        def run(*a, **k):  # the backward pass recomputes outside the mode: enter it again
            with nullcontext() if torch._C._is_torch_function_mode_enabled() else mode:
                return fn(*a, **k)
        return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False, **kwargs)

    if checkpointing:  # as the loop does it, then with our function in place of torch's (which it calls)
        enable_gradient_checkpointing(base, trained_parts)
        for m in (x for part in parts for x in part.modules() if getattr(x, "gradient_checkpointing", False)):
            m._gradient_checkpointing_func = checkpoint
    with mode, saving(outer):  # what noise_loss does, with zeros for data
        for part in parts:
            part.train()
        example = zero_batch(base, batch, resolution, cached_text=not trains_text)
        t = torch.zeros(batch, dtype=torch.long, device=device)
        loss = F.mse_loss(predict(base, example.latents, t, example), example.latents)
    with saving(outer):
        loss.backward()
    casts = {storage_id(c): c.untyped_storage().nbytes() for c in mode.cache.values()}
    saved = sizes(outer, own | casts.keys()) + sizes(kept, own | casts.keys() | outer.keys()) + recompute[0]
    return {"activations": sum(saved), "autocast_copies": sum(casts.values()), "largest_saved": max(saved, default=0),
            "device": device.type}


def zero_batch(base, batch: int, resolution: int, cached_text: bool):
    """A batch of zeros shaped as the loop's (text states cached where no text encoder trains)."""
    from .trainers.batch import Batch

    family, h, device = base.family, resolution // 8, base.unet.device
    tokens = tuple(torch.zeros(batch, getattr(base, name).model_max_length, dtype=torch.long, device=device)
                   for name in family.tokenizers)
    cond = None
    if cached_text:
        with torch.no_grad():
            cond = family.encode(base, tokens)
    latents = torch.zeros(batch, base.unet.config.in_channels, h, h, device=device)
    sizes = torch.full((batch, 2), resolution, device=device)
    return Batch(latents, tokens, [""] * batch, None, cond, original_size=sizes, crop_top_left=sizes * 0)


def _optimizer_bytes(train, params: list, names: dict[int, str], method) -> tuple[int, int]:
    """(state, step temporaries). State is fp32 (trained fp32 weights, or the fused pass's fp32 stand-in of a bf16
    weight). bitsandbytes: 32-bit under 4096 elements, else 8-bit plus two fp32 absmax per 256-element block.
    prodigyopt: s, p0, exp_avg, exp_avg_sq; p0 is 0-dim for a weight all zeros at its first step (LoRA B, biases)."""
    state, qmaps = 0, 0
    for p in params:
        n, name = p.numel(), names.get(id(p), "")
        if train.optimizer == "adamw":
            state += 8 * n
        elif train.optimizer == "adamw8bit":
            state, qmaps = state + (2 * n + 8 * math.ceil(n / 256) if n >= 4096 else 8 * n), qmaps + (n >= 4096)
        elif train.optimizer == "adafactor":  # no first moment; second moments factored into a row and a column
            shape = tuple(p.shape)
            state += 4 * (math.prod(shape[:-1]) + math.prod(shape[:-2]) * shape[-1] if len(shape) >= 2 else n)
        else:
            zero = method.initially_zero(name)
            state += 4 * (n * (2 + (train.adam_beta1 > 0)) + (1 if zero else n))
    state += 2 * 256 * 4 * (qmaps if train.fused_backward else min(qmaps, 1))  # bnb's two fp32 quantization maps
    if train.optimizer == "adamw" and not train.fused_backward:  # foreach AdamW: sqrt(exp_avg_sq) of every weight
        return state, 4 * sum(p.numel() for p in params)
    # bitsandbytes updates in place; the others per weight, with two fp32 temporaries of one tensor
    largest = max(p.numel() for p in params)  # Adafactor's update holds three fp32 copies of one tensor
    return state, {"adamw8bit": 0, "adafactor": 12 * largest}.get(train.optimizer, 8 * largest)


def estimate(recipe, base_spec: str | None = None, resolution: int | None = None, *, use_cache: bool = True) -> Estimate:
    """Predicted peak GPU memory of training `recipe` on `base_spec` (default: the recipe's base)."""
    from .models import load_base, spec_arch
    from .models.base import meta_base
    from .paths import cache_root
    from .trainers.parts import cast_for_precision
    from .trainers.registry import get_method
    # Every bucket's area is at most resolution^2, so the square of the largest resolution is the peak.
    spec, res, t = base_spec or recipe.base.model, resolution or max(recipe.data.all_resolutions), recipe.train
    if res % 8 or res < 32:
        raise RecipeError(f"resolution {res}: it must be a multiple of 8, at least 32.")
    precision = {"auto": "bf16", "no": "fp32"}.get(t.mixed_precision, t.mixed_precision)
    # prior preservation adds a class picture per picture, output preservation the picture again (trigger-free caption;
    # its untouched-model target is computed without gradients, which saves nothing for the backward pass)
    rows = 1 + recipe.prior.enabled + (recipe.prior.output_preservation > 0)
    dtype, batch, bf16_weights = DTYPES[precision], t.batch_size * rows, t.weights_dtype == "bf16"
    base, arch_key = meta_base(spec), spec_arch(spec).name
    method = get_method(recipe.method)(recipe)
    trained = list({id(p): p for g in method.prepare(base) for p in g["params"]}.values())
    cast_for_precision(base, dtype, keep_trained=bf16_weights)
    weights, labels, names, vae = {}, {}, {}, [] if recipe.data.cache_latents and recipe.data.crop == "center" else ["vae"]
    text = list(base.family.text_encoders) if recipe.data.varied_captions else []  # encoded every step then
    for part in dict.fromkeys(["unet", *method.trainable_parts(base), *vae, *text]):  # what the loop keeps on the GPU
        params = dict(getattr(base, part).named_parameters())
        names.update({id(p): name for name, p in params.items()})
        weights[part] = sum(p.numel() * p.element_size() for p in params.values())
        kinds = [(f"{'trained' if p.requires_grad else 'frozen'} {DTYPE_NAMES[p.dtype]}", p.numel()) for p in params.values()]
        labels[part] = f"{sum(n for _, n in kinds):,} params: " + ", ".join(
            f"{sum(n for k, n in kinds if k == kind):,} {kind}" for kind in dict.fromkeys(k for k, _ in kinds))
    big = max(trained, key=lambda p: p.numel())  # fused: one gradient at a time (+ fp32 copies of it and its weight)
    grads = big.numel() * (big.element_size() + 8 * bf16_weights) if t.fused_backward else \
        sum(p.numel() * p.element_size() for p in trained)
    optimizer, temporaries = _optimizer_bytes(t, trained, names, method)
    notes, path = [], cache_root() / "estimate" / "activations.json"
    sig = hashlib.sha1(str([(names.get(id(p)), tuple(p.shape), str(p.dtype)) for p in trained]).encode()).hexdigest()[:10]
    key = f"v{MEASURE_VERSION}|{arch_key}|{res}px|batch {batch}|checkpointing {t.gradient_checkpointing}|{precision}|{method.name}:{sig}"
    cache = json.loads(path.read_text()) if use_cache and path.is_file() else {}
    if not (hit := key in cache):
        try:
            cache[key] = measure_activations(base, method, res, batch, dtype, t.gradient_checkpointing)
        except (NotImplementedError, RuntimeError) as exc:  # an op without a meta kernel: a real CPU run
            notes.append(f"the meta run failed ({type(exc).__name__}: {str(exc)[:100]}); activations were measured "
                         "in a real CPU run instead (slow; CPU kernels may save a little differently)")
            method.prepare(real := load_base(spec))
            cast_for_precision(real, dtype, keep_trained=bf16_weights)
            cache[key] = measure_activations(real, method, res, batch, dtype, t.gradient_checkpointing)
        if use_cache:  # written whole, then renamed: a concurrent estimate never reads half a file
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, json.dumps(cache, indent=1, sort_keys=True))
    notes.insert(0, f"activations: {'a cached measurement' if hit else 'measured now'} on {cache[key]['device']} ({path})")
    notes += ["mixed_precision 'auto' taken as bf16 (fp16 GPUs need the same memory)"] * (t.mixed_precision == "auto") + [
        "not counted: VAE encoding when latents are not cached; validation samples (between steps, no activations)"]
    h, measured = res // 8, cache[key]
    text_numel = sum(v[0].numel() for v in zero_batch(base, 1, res, cached_text=True).cond.tensors.values())
    shardable = None
    if method.full_finetune:
        shardable = Shardable({part: [(tuple(p.shape), p.element_size()) for p in getattr(base, part).parameters()
                                      if p.requires_grad] for part in method.trainable_parts(base)},
                              unit=max(largest_unit_numel(getattr(base, part)) for part in method.trainable_parts(base)),
                              compute_size=dtype.itemsize)
    sharded = t.strategy != "ddp" and t.processes > 1
    return Estimate(
        f"{recipe.name} on {spec}, {res} px, {batch} example(s) per step, {precision} compute, "
        + (f"{t.strategy} on {t.processes} processes (per process), " if sharded else "") +
        f"{sum(p.numel() for p in trained):,} trained parameters", t.fused_backward, weights, labels, grads, optimizer,
        ema=sum(p.numel() * p.element_size() for p in trained) if t.ema and not t.ema_on_cpu else 0,
        autocast_copies=measured["autocast_copies"], activations=measured["activations"],
        backward_transient=2 * measured["largest_saved"], step_temporaries=temporaries,
        other=batch * 4 * (2 * 4 * h * h + text_numel),  # latents, noise, text states
        notes=notes, hints=_hints(recipe, method), shardable=shardable).sharded(t.strategy, t.processes)


def run_estimate(recipe_name_or_path: str, base: str | None, resolution: int | None, vram: float | None, overrides: list[str]) -> str:
    from .recipes import resolve_recipe  # what `dreamloom estimate` prints

    return estimate(resolve_recipe(recipe_name_or_path, overrides), base, resolution).format(vram)
