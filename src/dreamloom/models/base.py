"""Base models: what every method trains on top of, from whichever source the user names.

Specs (`tiny`, `toy`, `random:<arch>`, a diffusers folder, a single file, a hub id) are parsed in
`specs.py`.
Loading never makes a silent network call that can hang a run: a hub id that cannot be
reached ends in an error telling the user to pass a local folder or file.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, DiffusionPipeline
from diffusers import UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ..errors import BaseModelError
from .configs import ARCHS, SD_SCHEDULER, TINY_BASES, Arch, arch_for_unet
from .family import FAMILIES, Family
from .specs import parse_base_spec, spec_arch
from .tokenizer import build_tokenizer, builtin_vocab_size

@dataclass
class Base:
    """The parts of a Stable Diffusion model (under the names its pipeline gives them) plus what we
    know about its architecture. Which parts there are is the family's: `family.parts`."""

    spec: str
    arch: Arch
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler_config: dict
    text_encoder_2: torch.nn.Module | None = None  # families with two text encoders (SDXL)
    tokenizer_2: CLIPTokenizer | None = None

    @property
    def family(self) -> Family:
        return FAMILIES[self.arch.family]

    @property
    def prediction_type(self) -> str:
        return self.scheduler_config.get("prediction_type", "epsilon")

    @cached_property
    def noise_scheduler(self) -> DDPMScheduler:
        return DDPMScheduler.from_config(self.scheduler_config)

    def modules(self) -> dict[str, torch.nn.Module]:
        return {name: getattr(self, name) for name in self.family.parts}

    def with_modules(self, **modules: torch.nn.Module) -> "Base":
        """The same base with some parts replaced (unwrapped, or cast copies for an export)."""
        return dataclasses.replace(self, **modules)

    def pipeline(self):
        """A sampling pipeline over these very modules (adapters injected into them apply)."""
        return self.family.pipeline(self, DDIMScheduler.from_config(self.scheduler_config))

    def to(self, device: torch.device | str) -> "Base":
        for module in self.modules().values():
            module.to(device)
        return self


def text_encoder_config(arch: Arch, tokenizer: CLIPTokenizer | None = None, part: str | None = None) -> CLIPTextConfig:
    """The config of one of the architecture's text encoders (by its part name; default the first)."""
    tokenizer = tokenizer or build_tokenizer()
    cfg = dict(getattr(arch, part or FAMILIES[arch.family].text_encoders[0]))
    if cfg["vocab_size"] is None:
        cfg["vocab_size"] = builtin_vocab_size()
    # The pooled output is taken at the end token; these ids make transformers look it up.
    return CLIPTextConfig(**cfg, bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def build_random(arch: Arch, seed: int = 0, meta: bool = False, tokenizers: list | None = None) -> Base:
    """The architecture with seeded random weights (or on the meta device: shapes only), with the
    built-in tokenizer unless others are given (one per tokenizer of the family)."""
    family = FAMILIES[arch.family]
    tokenizers = tokenizers or [build_tokenizer() for _ in family.tokenizers]

    def build():
        import transformers

        parts = {"unet": UNet2DConditionModel(**arch.unet),
                 "vae": AutoencoderKL(**arch.vae, scaling_factor=arch.vae_scaling_factor)}
        for (part, cls), tokenizer in zip(family.text_encoder_classes.items(), tokenizers):
            parts[part] = getattr(transformers, cls)(text_encoder_config(arch, tokenizer, part))
        return parts

    if meta:
        with init_empty_weights():
            parts = build()
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            parts = build()
    for module in parts.values():
        module.eval()
    spec = arch.name if arch.name in TINY_BASES else f"random:{arch.name}"  # "toy" names the pretrained weights
    return Base(spec, arch, scheduler_config=dict(SD_SCHEDULER, prediction_type=arch.prediction_type),
                **parts, **dict(zip(family.tokenizers, tokenizers)))


def load_recipe_base(section) -> Base:
    """The base a recipe's [base] section names, with its prediction type and noise schedule as the
    section says (a v-pred community base whose file does not say so; zero terminal SNR)."""
    from ..errors import RecipeError

    base = load_base(section.model)
    config = dict(base.scheduler_config)
    if section.prediction_type != "auto":
        config["prediction_type"] = section.prediction_type
    if section.zero_terminal_snr:
        if config.get("prediction_type") != "v_prediction":
            raise RecipeError(f"base.zero_terminal_snr needs a v-prediction model; '{section.model}' predicts "
                              f"{config.get('prediction_type', 'epsilon')}. Set base.prediction_type = 'v_prediction' "
                              "if it is a v-pred base, or turn zero_terminal_snr off.")
        config.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")  # sampling starts at pure noise
    return base if config == base.scheduler_config else dataclasses.replace(base, scheduler_config=config)


def meta_base(spec: str) -> Base:
    """The base a spec names, built on the meta device from its architecture: names and shapes,
    no weights read or allocated (checks before a run exists, the memory estimate)."""
    base = build_random(spec_arch(spec), meta=True)
    for module in base.modules().values():
        module.to("meta")  # buffers too, which init_empty_weights leaves on the CPU
    return base


def base_from_pipeline(spec: str, pipe) -> Base:
    arch = arch_for_unet(dict(pipe.unet.config))
    if arch is None:
        raise BaseModelError(
            f"base model '{spec}': its UNet (cross-attention width {pipe.unet.config.cross_attention_dim}) matches "
            f"no supported architecture ({', '.join(ARCHS)}); dreamloom trains SD 1.x and SD 2.x models."
        )
    family = FAMILIES[arch.family]
    parts = {name: getattr(pipe, name) for name in (*family.parts, *family.tokenizers)}
    for name in family.parts:
        parts[name].eval()
    return Base(spec, arch, scheduler_config=dict(pipe.scheduler.config), **parts)


def _load_folder(spec: str, folder: Path) -> Base:
    if not (folder / "model_index.json").is_file():
        raise BaseModelError(
            f"base model folder '{folder}' has no model_index.json: it is not a diffusers "
            "model folder. Pass a folder written by save_pretrained, or a single .safetensors file."
        )
    family = FAMILIES[spec_arch(spec).family]
    # fp32 in memory whatever the files hold (an fp16 export): trained weights need it, CPUs cannot
    # run fp16 layers, and the loop casts frozen parts to the compute dtype itself.
    pipe = family.pipeline_class.from_pretrained(folder, local_files_only=True, torch_dtype=torch.float32,
                                                 **family.pipeline_kwargs())
    return base_from_pipeline(spec, pipe)


def _load_hub(spec: str) -> Base:
    try:  # the pipeline class comes from the repo's model_index.json
        pipe = DiffusionPipeline.from_pretrained(spec, **Family().pipeline_kwargs())
    except Exception as exc:  # network, auth, missing repo: all end the same way for the user
        raise BaseModelError(
            f"could not load base model '{spec}' from the Hugging Face hub ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else 'no details'}). Without network access, "
            "pass a local diffusers folder or a .safetensors checkpoint with --base."
        ) from exc
    return base_from_pipeline(spec, pipe)


def load_base(spec: str) -> Base:
    """Load the base model a recipe names. Raises BaseModelError with the fix on failure."""
    parsed = parse_base_spec(spec)
    if spec in TINY_BASES:
        return build_random(ARCHS[spec])
    if spec == "toy":
        from .toy import load_toy_base

        return load_toy_base()
    if parsed.kind == "random":
        return build_random(spec_arch(parsed))
    if parsed.kind == "folder":
        return _load_folder(spec, parsed.path)
    if parsed.kind == "file":
        from .single_file import load_single_file

        return base_from_pipeline(spec, load_single_file(parsed.path))
    return _load_hub(spec)
