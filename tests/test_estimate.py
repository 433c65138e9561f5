"""`dreamloom estimate`: its exact terms against a real tiny base, its measured terms against real CPU training steps,
the recipe keys' effects, the SD 1.5 figures on the meta device, and bad input."""

from __future__ import annotations

import json

import pytest
import torch

from dreamloom.errors import BaseModelError, RecipeError
from dreamloom.estimate import CUDA_CONTEXT, GiB, estimate, run_estimate
from dreamloom.models import load_base
from dreamloom.recipes import resolve_recipe
from dreamloom.trainers.fused import FusedOptimizer
from dreamloom.trainers.batch import Batch
from dreamloom.trainers.parts import enable_gradient_checkpointing
from dreamloom.trainers.optim import make_optimizer
from dreamloom.trainers.registry import get_method


def recipe(name: str, *sets: str, resolution: int = 96):
    """A built-in tiny recipe with two examples per step (DreamBooth's prior preservation doubles one): the real
    steps below then share their shapes, and the CPU kernels' first-use set-up is paid once."""
    batch = 1 if name == "tiny-dreambooth" else 2
    return resolve_recipe(name, [f"data.resolution={resolution}", f"train.batch_size={batch}", *sets])


def real_prepared(r):
    """A real tiny base with the recipe's method prepared on it, as the loop does (CPU: fp32, nothing offloaded)."""
    base, method = load_base("tiny"), get_method(r.method)(r)
    groups = method.prepare(base)
    if r.train.gradient_checkpointing:
        enable_gradient_checkpointing(base, method.trainable_parts(base))
    for name in method.trainable_parts(base):
        getattr(base, name).train()
    return base, method, groups


def examples_per_step(r) -> int:
    return r.train.batch_size * (2 if r.prior.enabled else 1)


def make_batch(r, base, method, seed: int) -> Batch:
    n, g = examples_per_step(r), torch.Generator().manual_seed(seed)
    tokens = base.family.tokenize(base, ["a photo of sks dog"] * n)
    cond = None
    if not base.family.text_trains(base):  # the loop's cached text-encoder states
        with torch.no_grad():
            cond = base.family.encode(base, tokens)
    latents = torch.randn(n, 4, r.data.resolution // 8, r.data.resolution // 8, generator=g)
    return Batch(latents, tokens, ["a photo of sks dog"] * n, g, cond)


def state_bytes(optimizer) -> int:
    """Bytes of the optimizer's state tensors, each storage once; the step counters stay on the CPU on a GPU too."""
    optimizers = optimizer.optimizers.values() if isinstance(optimizer, FusedOptimizer) else [optimizer]
    storages = {v.untyped_storage().data_ptr(): v.untyped_storage().nbytes() for opt in optimizers
                for state in opt.state.values() for k, v in state.items() if isinstance(v, torch.Tensor) and k != "step"}
    return sum(storages.values())


EXACT = [("tiny-lora",), ("tiny-lora", "train.optimizer='adamw8bit'"), ("tiny-lora", "train.optimizer='prodigy'"),
         ("tiny-lora", "lora.train_text_encoder=true", "train.optimizer='adamw8bit'"), ("tiny-dreambooth",),
         ("tiny-dreambooth", "train.optimizer='adamw8bit'"), ("tiny-dreambooth", "train.optimizer='adamw8bit'", "train.fused_backward=true"),
         ("tiny-dreambooth", "dreambooth.train_text_encoder=true", "train.fused_backward=true"),
         ("tiny-hypernetwork", "train.optimizer='prodigy'")]


@pytest.mark.parametrize("spec", EXACT, ids=lambda s: "+".join(s))
def test_parameter_gradient_and_optimizer_terms_are_exact(spec):
    r = recipe(*spec, "train.learning_rate=1.0" if "prodigy" in str(spec) else "train.steps=1")
    est = estimate(r, "tiny")
    base, method, groups = real_prepared(r)
    params = [p for g in groups for p in g["params"]]
    on_gpu = dict.fromkeys(["unet", *method.trainable_parts(base)])  # latents are cached: the VAE stays off the GPU
    assert est.weights == {part: sum(p.numel() * 4 for p in getattr(base, part).parameters()) for part in on_gpu}

    optimizer = FusedOptimizer(r.train, groups) if r.train.fused_backward else make_optimizer(r.train, groups)
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    if r.train.fused_backward:  # what the post-accumulate-grad hooks do, one weight after another
        optimizer.begin_step(0, True)
        grads = max(p.grad.untyped_storage().nbytes() for p in params)
        for p in params:
            optimizer._step_param(p)
    else:
        grads = sum(p.grad.untyped_storage().nbytes() for p in params)
        optimizer.step()
    assert est.gradients == grads
    assert est.optimizer == state_bytes(optimizer)


def real_saved_bytes(r) -> int:
    """Bytes saved for backward in a real CPU training step of the real tiny model (not meta): the method's loss on
    a real batch as the loop computes it, each storage counted once, the model's own weights left out."""
    base, method, _ = real_prepared(r)
    weights = {t.untyped_storage().data_ptr() for m in (base.unet, base.text_encoder) for t in m.parameters()}
    batch, seen = make_batch(r, base, method, 0), {}

    def pack(t):
        seen.setdefault(t.untyped_storage().data_ptr(), (t.untyped_storage().nbytes(), t))
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = method.loss(base, batch)
    loss.backward()
    return sum(n for ptr, (n, _) in seen.items() if ptr not in weights)


def real_peak_bytes(r) -> int:
    """Peak bytes allocated during one steady-state training step of the real tiny model on the CPU, done as the
    loop does it: the batch, the loss, backward, gradient clipping, the optimizer step, zero_grad(set_to_none).
    The profiler records every allocation and free of the CPU allocator during the step; the maximum of their running
    sum is the step's peak above what was live when it began. What was live then and would be on a GPU (the trained
    parts' weights, the optimizer state, created by a first step) is counted from those tensors themselves; the frozen
    text encoder and the VAE are in memory too, but off the GPU in the loop, so they are left out, as are the
    CUDA-only terms (context, allocator slack)."""
    from torch.profiler import ProfilerActivity, profile

    base, method, groups = real_prepared(r)
    t, params = r.train, [p for g in groups for p in g["params"]]
    optimizer = FusedOptimizer(t, groups) if t.fused_backward else make_optimizer(t, groups)

    def step(i):
        batch = make_batch(r, base, method, i)
        if t.fused_backward:
            optimizer.begin_step(i, True)
        method.loss(base, batch).backward()
        if t.max_grad_norm and not t.fused_backward:
            torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    step(0)
    parts = [getattr(base, name) for name in dict.fromkeys(["unet", *method.trainable_parts(base)])]
    live = sum(p.untyped_storage().nbytes() for m in parts for p in m.parameters()) + state_bytes(optimizer)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step(1)
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    running = peak = 0
    for _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
    return live + peak


MEASURED = [("tiny-lora",), ("tiny-dreambooth",), ("tiny-dreambooth", "dreambooth.train_text_encoder=true")]


@pytest.mark.parametrize("spec", MEASURED, ids=lambda s: "+".join(s))
def test_activation_term_matches_a_real_cpu_step(spec):
    r = recipe(*spec)
    measured = real_saved_bytes(r)
    assert estimate(r, "tiny").activations == pytest.approx(measured, rel=0.15)


@pytest.mark.parametrize("spec", [("tiny-hypernetwork",), ("tiny-dreambooth",),
                                  ("tiny-dreambooth", "train.gradient_checkpointing=true", "train.fused_backward=true",
                                   "train.optimizer='adamw8bit'")], ids=lambda s: "+".join(s))
def test_total_matches_the_peak_of_a_real_cpu_step(spec):
    r = recipe(*spec)
    est = estimate(r, "tiny")
    assert est.allocated == pytest.approx(real_peak_bytes(r), rel=0.15)
    assert est.total == int(est.allocated * 1.1) + CUDA_CONTEXT


def test_recipe_keys_move_the_terms_they_should():
    plain = estimate(recipe("tiny-dreambooth"), "tiny")
    checkpointed = estimate(recipe("tiny-dreambooth", "train.gradient_checkpointing=true"), "tiny")
    assert checkpointed.activations < plain.activations
    fused = estimate(recipe("tiny-dreambooth", "train.fused_backward=true"), "tiny")
    base, _, groups = real_prepared(recipe("tiny-dreambooth"))
    assert fused.gradients == max(p.numel() for g in groups for p in g["params"]) * 4 < plain.gradients
    assert estimate(recipe("tiny-dreambooth", "train.optimizer='adamw8bit'"), "tiny").optimizer < plain.optimizer
    ema = estimate(recipe("tiny-dreambooth", "train.ema=true"), "tiny")
    assert ema.ema == plain.gradients and estimate(recipe("tiny-dreambooth", "train.ema=true", "train.ema_on_cpu=true"), "tiny").ema == 0
    bigger = estimate(recipe("tiny-dreambooth", resolution=192), "tiny")
    assert bigger.activations > 3 * plain.activations
    no_cache = estimate(recipe("tiny-dreambooth", "data.cache_latents=false"), "tiny")
    assert set(no_cache.weights) == {"unet", "vae"}


def test_activations_are_cached_per_setting(tmp_path, monkeypatch):
    monkeypatch.setenv("DREAMLOOM_CACHE", str(tmp_path))
    first = estimate(recipe("tiny-lora"), "tiny")
    again = estimate(recipe("tiny-lora"), "tiny")
    assert "measured now" in first.notes[0] and "cached" in again.notes[0]
    assert again.activations == first.activations
    keys = list(json.loads((tmp_path / "estimate" / "activations.json").read_text()))
    estimate(recipe("tiny-lora", "lora.rank=8"), "tiny")
    assert len(json.loads((tmp_path / "estimate" / "activations.json").read_text())) == len(keys) + 1


def test_sd15_dreambooth_12gb_on_the_meta_device():
    est = estimate(resolve_recipe("sd15-dreambooth-12gb"), "random:sd15", 512)
    assert est.weights == {"unet": 3_438_083_856}  # 859,520,964 fp32 parameters: the whole UNet trains
    text = est.format(12)
    assert "859,520,964" in text and "512 px" in text
    assert est.fits(12) == ("fits a 12 GiB card" in text) != ("WARNING" in text)
    assert est.gradients < 0.2 * GiB  # fused: one tensor's gradient at a time
    assert 0 < est.activations < 2 * GiB and est.total < 12 * GiB
    warning = est.format(4)
    assert "WARNING" in warning and "train.weights_dtype=bf16" in warning


@pytest.mark.parametrize("name, card, parameters", [
    ("sdxl-lora-12gb", 10, None),  # the bar for the LoRA recipe: at most 10 GiB on a 12 GiB card
    ("sdxl-dreambooth-12gb", 12, 2_567_463_684),  # the whole UNet, with prior preservation
    ("sdxl-dreambooth-24gb", 24, 2_567_463_684)])
def test_sdxl_recipes_fit_their_cards_at_1024_px(name, card, parameters):
    recipe = resolve_recipe(name)
    est = estimate(recipe, "random:sdxl", 1024)
    assert est.total < card * GiB, est.format(card)
    if parameters:
        assert recipe.prior.enabled and f"{parameters:,}" in est.format(card)
    assert "vae" not in est.weights and {"text_encoder", "text_encoder_2"}.isdisjoint(est.weights)  # cached outputs


def test_unknown_architectures_and_bad_input(tmp_path):
    with pytest.raises(BaseModelError, match="random:foo.*random:sd15"):
        estimate(recipe("tiny-lora"), "random:foo")
    with pytest.raises(BaseModelError, match="someone/finetune.*not in the local hub cache.*never downloads"):
        estimate(recipe("tiny-lora"), "someone/finetune")
    with pytest.raises(RecipeError, match="multiple of 8"):
        estimate(recipe("tiny-lora"), "tiny", 100)
    folder = tmp_path / "model"
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "config.json").write_text(json.dumps({"cross_attention_dim": 1280}))
    with pytest.raises(BaseModelError, match="no known architecture"):
        estimate(recipe("tiny-lora"), str(folder))
    (folder / "unet" / "config.json").write_text(json.dumps({"cross_attention_dim": 32}))  # tiny's width
    assert estimate(recipe("tiny-lora"), str(folder)).weights == estimate(recipe("tiny-lora"), "tiny").weights


def test_hub_bases_are_read_from_the_published_ids_or_the_local_hub_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    # a published base: its architecture is known without a download
    assert "stable-diffusion-v1-5/stable-diffusion-v1-5, 512 px" in run_estimate("sd15-lora-12gb", None, 512, 12, [])
    assert estimate(recipe("sd15-lora-12gb"), None, 512).total == estimate(recipe("sd15-lora-12gb"), "random:sd15", 512).total
    # a community finetune downloaded before: its cached unet/config.json says which architecture it is
    snapshot = tmp_path / "models--someone--finetune" / "snapshots" / "abc123"
    (snapshot / "unet").mkdir(parents=True)
    (snapshot / "unet" / "config.json").write_text(json.dumps({"cross_attention_dim": 32}))  # tiny's width
    (tmp_path / "models--someone--finetune" / "refs").mkdir()
    (tmp_path / "models--someone--finetune" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    assert estimate(recipe("tiny-lora"), "someone/finetune").weights == estimate(recipe("tiny-lora"), "tiny").weights


def test_an_op_without_a_meta_kernel_falls_back_to_a_real_cpu_run(monkeypatch):
    import dreamloom.estimate as module

    measure = module.measure_activations

    def no_meta(base, *args):
        if base.unet.device.type == "meta":
            raise NotImplementedError("no meta kernel for this op")
        return measure(base, *args)
    monkeypatch.setattr(module, "measure_activations", no_meta)
    est = estimate(recipe("tiny-lora", "lora.rank=4"), "tiny", use_cache=False)
    assert "real CPU run" in est.format() and "measured now on cpu" in est.notes[0]
    monkeypatch.undo()
    assert est.activations == estimate(recipe("tiny-lora", "lora.rank=4"), "tiny", use_cache=False).activations
