"""Base families: what differs between Stable Diffusion architectures, one object per family.

A family owns the names of a base's parts (what the loop moves, casts, offloads and checkpoints),
its tokenizers, text encoding into a Conditioning, the UNet call, the pipeline class, the names
other tools give its layers (kohya prefixes, the original single-file layout) and what exports call
it. The loop, the noise loss, the caches, the estimator, textual inversion, the exporters and the
sampler ask the family; none of them branches on which family it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .base import Base
    from .configs import Arch


@dataclass
class Conditioning:
    """What the UNet is conditioned on, one row per example: `hidden` (the cross-attention states)
    and whatever else a family's UNet takes (SDXL: `pooled`, the text embeds of its time ids)."""

    tensors: dict[str, torch.Tensor]

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.tensors[key]

    def rows(self, index) -> "Conditioning":
        return Conditioning({k: v[index] for k, v in self.tensors.items()})

    def to(self, device, dtype: torch.dtype | None = None) -> "Conditioning":
        return Conditioning({k: v.to(device, dtype) for k, v in self.tensors.items()})

    def clone(self) -> "Conditioning":
        return Conditioning({k: v.clone() for k, v in self.tensors.items()})

    def set_row(self, row: int, other: "Conditioning") -> None:
        """Row `row` becomes `other`'s only row (caption dropout: the empty caption's states)."""
        for key, tensor in self.tensors.items():
            tensor[row] = other.tensors[key][0]

    @staticmethod
    def cat(items: list["Conditioning"]) -> "Conditioning":
        return Conditioning({k: torch.cat([c.tensors[k] for c in items]) for k in items[0].tensors})


class Family:
    """SD 1.x: one CLIP text encoder, its last hidden states, `unet(x, t, hidden)`."""

    name = "sd1"
    title = "SD 1.x"  # what users call it
    text_encoders: tuple[str, ...] = ("text_encoder",)
    tokenizers: tuple[str, ...] = ("tokenizer",)
    text_encoder_classes = {"text_encoder": "CLIPTextModel"}  # transformers class of each (its config: Arch.<part>)
    kohya_prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
    # prefixes other tools write for these parts (diffusers' kohya converter writes lora_te1_ for SD 1)
    kohya_aliases = {"lora_te1_": "text_encoder"}
    kohya_unet_layout = "diffusers"  # the UNet names kohya's trainer writes: diffusers' ("ldm": the original ones)
    modelspec = "stable-diffusion-v1"
    kohya_version = "sd_v1"
    v2 = False  # kohya's ss_v2
    # the original single-file layout: each text encoder's token and position embeddings (the first
    # entry's token key is how a file of this family is recognised)
    ldm_text_keys = {"text_encoder": ("cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
                                      "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight")}
    # the real CLIP tokenizers (repo, subfolder), one per tokenizer, looked up in a user's HF cache only
    tokenizer_repos = (("openai/clip-vit-large-patch14", None),)
    needs_v_yaml = False  # A1111/Forge read a v-model's parameterization from <name>.yaml
    embedding_keys: dict[str, str] | None = None  # an embedding file's key per text encoder (None: one tensor)

    @property
    def parts(self) -> tuple[str, ...]:
        """Every module of a base of this family, as the pipeline names them."""
        return ("unet", "vae", *self.text_encoders)

    @property
    def pipeline_class(self):
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline

    def pipeline(self, base: "Base", scheduler):
        pipe = self.pipeline_class(**{name: getattr(base, name) for name in (*self.parts, *self.tokenizers)},
                                   scheduler=scheduler, **self.pipeline_extras())
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def pipeline_extras(self) -> dict:
        return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}

    def pipeline_kwargs(self) -> dict:
        """What `from_pretrained` / `from_single_file` of this family's pipeline need besides the path."""
        return {"safety_checker": None, "requires_safety_checker": False}

    # --- text ---------------------------------------------------------------------------------
    def tokenize(self, base: "Base", captions: list[str] | str) -> tuple[torch.Tensor, ...]:
        """One [B, max_length] id tensor per tokenizer."""
        out = []
        for name in self.tokenizers:
            tokenizer = getattr(base, name)
            out.append(tokenizer(captions, padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                                 return_tensors="pt").input_ids)
        return tuple(out)

    def text_trains(self, base: "Base") -> bool:
        return any(p.requires_grad for name in self.text_encoders for p in getattr(base, name).parameters())

    def encode(self, base: "Base", tokens: tuple[torch.Tensor, ...], clip_skip: int = 1) -> Conditioning:
        """The text encoders' output; gradients flow only when a text encoder has trainable weights.
        `clip_skip` is A1111's: 1 the family's usual layer, 2 the one before it, and so on. `base` is
        anything with the family's text encoders as attributes (a Base, or a pipeline of it)."""
        with torch.set_grad_enabled(self.text_trains(base) and torch.is_grad_enabled()):
            return self._encode(base, tokens, clip_skip)

    def _encode(self, base: "Base", tokens: tuple[torch.Tensor, ...], clip_skip: int) -> Conditioning:
        te = base.text_encoder
        if clip_skip == 1:
            return Conditioning({"hidden": te(tokens[0].to(te.device))[0]})
        # an earlier layer through the final layer norm, as A1111 (and diffusers' clip_skip) do
        out = te(tokens[0].to(te.device), output_hidden_states=True)
        return Conditioning({"hidden": te.final_layer_norm(out.hidden_states[-clip_skip])})

    def unet_kwargs(self, cond: Conditioning, original_size: torch.Tensor, crop_top_left: torch.Tensor,
                    target_size: tuple[int, int]) -> dict:
        """The UNet's arguments besides the noisy latents and timesteps."""
        return {"encoder_hidden_states": cond["hidden"]}

    def text_width(self, base: "Base") -> int:
        return base.text_encoder.config.hidden_size

    # --- names other tools use ----------------------------------------------------------------
    def canonical(self, part: str, name: str) -> str:
        """A module or weight name as every other tool spells it. transformers 5 dropped CLIPTextModel's
        `text_model.` level; A1111, ComfyUI and older diffusers all still expect it."""
        if part in self.text_encoders and not name.startswith("text_model."):
            return f"text_model.{name}"
        return name

    @property
    def ldm_token_key(self) -> str:
        return next(iter(self.ldm_text_keys.values()))[0]

    def kohya_name(self, base: "Base", part: str, module_name: str) -> str:
        """kohya's key for a module: prefix + its path with `_` for `.` (A1111, Forge, ComfyUI read these)."""
        name = self.canonical(part, module_name)
        if part == "unet" and self.kohya_unet_layout == "ldm":
            from ..export.ldm_checkpoint import unet_ldm_module_names

            name = unet_ldm_module_names(base.unet, [module_name])[module_name]
        return self.kohya_prefixes[part] + name.replace(".", "_")

    def adaptable_layers(self, base: "Base", part: str) -> dict[str, torch.nn.Module]:
        """The layers of a part an adapter file can patch: its linear and conv layers by name (not the
        layers an in-memory adapter added)."""
        return {name: m for name, m in getattr(base, part).named_modules()
                if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and name
                and ".lora_" not in name and "base_layer" not in name}

    def kohya_modules(self, base: "Base") -> dict[str, tuple[str, str]]:
        """Every name a kohya-layout file may give a layer of this base -> (part, module name): the names
        we write, those of the other UNet layout (the original one; kohya's SDXL trainer uses it) and the
        prefixes other tools write (`kohya_aliases`)."""
        from ..export.ldm_checkpoint import unet_ldm_module_names

        table = {}
        for part in ("unet", *self.text_encoders):
            layers = list(self.adaptable_layers(base, part))
            prefix = self.kohya_prefixes[part]
            for name in layers:
                table[prefix + self.canonical(part, name).replace(".", "_")] = (part, name)
            for alias, aliased in self.kohya_aliases.items():
                if aliased == part:
                    table.update({alias + self.canonical(part, n).replace(".", "_"): (part, n) for n in layers})
            if part == "unet":  # both UNet layouts: other tools write whichever their trainer uses
                ldm = unet_ldm_module_names(base.unet, layers)
                table.update({prefix + ldm[n].replace(".", "_"): (part, n) for n in layers})
        return table

    def version(self, arch: "Arch", v_pred: bool) -> str:
        """kohya's ss_base_model_version (A1111/Forge list a LoRA only under a base of this version)."""
        return arch.version or self.kohya_version

    def modelspec_architecture(self, arch: "Arch") -> str:
        return f"dreamloom-{arch.version}" if arch.version else self.modelspec

    def text_to_ldm(self, base: "Base") -> dict[str, torch.Tensor]:
        from ..export.ldm_checkpoint import clip_to_ldm

        return clip_to_ldm(base.text_encoder)

    def arch_text_width(self, arch: "Arch") -> int:
        """The width of the text encoder whose token key recognises the family's files."""
        return getattr(arch, next(iter(self.ldm_text_keys)))["hidden_size"]


class SD2Family(Family):
    """SD 2.x: OpenCLIP ViT-H (23 layers kept: the penultimate one), v-prediction at 768 px."""

    name = "sd2"
    title = "SD 2.x"
    modelspec = "stable-diffusion-v2-768-v"
    kohya_version = "sd_v2"
    v2 = True
    ldm_text_keys = {"text_encoder": ("cond_stage_model.model.token_embedding.weight",
                                      "cond_stage_model.model.positional_embedding")}
    tokenizer_repos = (("stabilityai/stable-diffusion-2-1", "tokenizer"),)
    needs_v_yaml = True

    def version(self, arch: "Arch", v_pred: bool) -> str:
        return arch.version or ("sd_v2_v" if v_pred else "sd_v2")

    def text_to_ldm(self, base: "Base") -> dict[str, torch.Tensor]:
        from ..export.ldm_checkpoint import open_clip_to_ldm

        return open_clip_to_ldm(base.text_encoder)


class SDXLFamily(Family):
    """SDXL: CLIP-L and OpenCLIP-G, their penultimate hidden states side by side, OpenCLIP-G's
    projected end token as the pooled embedding, and size conditioning (original size, crop, target
    size) with it through the UNet's text_time embedding."""

    name = "sdxl"
    title = "SDXL"
    text_encoders = ("text_encoder", "text_encoder_2")
    tokenizers = ("tokenizer", "tokenizer_2")
    text_encoder_classes = {"text_encoder": "CLIPTextModel", "text_encoder_2": "CLIPTextModelWithProjection"}
    kohya_prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
    kohya_aliases = {}
    kohya_unet_layout = "ldm"  # kohya's SDXL trainer works on the original UNet: input_blocks_4_1_...
    modelspec = "stable-diffusion-xl-v1-base"
    kohya_version = "sdxl_base_v1-0"  # stock A1111 lists a LoRA as SDXL only from this
    ldm_text_keys = {  # OpenCLIP-G's first: its keys are what only SDXL files have
        "text_encoder_2": ("conditioner.embedders.1.model.token_embedding.weight",
                           "conditioner.embedders.1.model.positional_embedding"),
        "text_encoder": ("conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight",
                         "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight")}
    tokenizer_repos = (("stabilityai/stable-diffusion-xl-base-1.0", "tokenizer"),
                       ("stabilityai/stable-diffusion-xl-base-1.0", "tokenizer_2"))
    embedding_keys = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}  # A1111/Forge and ComfyUI read these

    @property
    def pipeline_class(self):
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline

    def pipeline_extras(self) -> dict:
        return {"image_encoder": None, "feature_extractor": None, "force_zeros_for_empty_prompt": True}

    def pipeline_kwargs(self) -> dict:
        return {}

    def _encode(self, base: "Base", tokens: tuple[torch.Tensor, ...], clip_skip: int) -> Conditioning:
        hidden = []
        for part, ids in zip(self.text_encoders, tokens):
            te = getattr(base, part)
            out = te(ids.to(te.device), output_hidden_states=True)
            hidden.append(out.hidden_states[-1 - clip_skip])  # SDXL's usual layer is already the penultimate
        return Conditioning({"hidden": torch.cat(hidden, dim=-1), "pooled": out[0]})  # out: OpenCLIP-G's

    def unet_kwargs(self, cond: Conditioning, original_size, crop_top_left, target_size) -> dict:
        hidden, pooled = cond["hidden"], cond["pooled"]
        n, device = hidden.shape[0], hidden.device
        if original_size is None:  # no picture behind it (an estimate, a sample): as if uncropped at the size
            original_size, crop_top_left = torch.tensor([target_size] * n), torch.zeros(n, 2)
        parts = [original_size, crop_top_left, torch.tensor([target_size] * n)]
        time_ids = torch.cat([p.to(device, pooled.dtype) for p in parts], dim=1)
        return {"encoder_hidden_states": hidden, "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}

    def text_width(self, base: "Base") -> int:
        return sum(getattr(base, part).config.hidden_size for part in self.text_encoders)

    def text_to_ldm(self, base: "Base") -> dict[str, torch.Tensor]:
        from ..export.ldm_checkpoint import clip_to_ldm, open_clip_to_ldm

        te2 = base.text_encoder_2
        return {**clip_to_ldm(base.text_encoder, "conditioner.embedders.0.transformer.text_model."),
                **open_clip_to_ldm(te2, "conditioner.embedders.1.model.", projection=te2.text_projection.weight.T)}


FAMILIES: dict[str, Family] = {f.name: f for f in (Family(), SD2Family(), SDXLFamily())}


def family_of_pipeline(pipe) -> Family:
    """The family whose text-to-image pipeline this is (SD 1 and SD 2 encode text alike, so the
    first match is enough)."""
    for family in FAMILIES.values():
        if isinstance(pipe, family.pipeline_class):
            return family
    raise TypeError(f"{type(pipe).__name__} is no text-to-image pipeline of a family dreamloom knows")
