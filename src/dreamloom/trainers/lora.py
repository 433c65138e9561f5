"""LoRA and LoCon through peft: low-rank adapters on the UNet's attention (and optionally the text
encoders); LoCon adds the convolutions of the ResNet blocks and samplers (kohya's conv_dim /
conv_alpha); `lora.use_dora` makes either weight-decomposed (DoRA, Liu et al. 2024)."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from pydantic import Field

from ..errors import RecipeError
from ..recipes.sections import Section
from .method import Format, Method, ParamGroups, freeze, part_learning_rate, unwrap


class LoraSection(Section):
    rank: int = Field(16, ge=1, le=1024)
    alpha: float = Field(16.0, gt=0, description="scale = alpha / rank")
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    train_text_encoder: bool = False
    text_encoder_target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj"]
    )
    use_dora: bool = Field(False, description="DoRA: each adapted weight's direction and magnitude train "
                           "apart (closer to full fine-tuning at the same rank; a little slower)")


class ConvSection(Section):
    """The convolutions of the UNet's ResNet blocks and up/down-samplers (kohya's conv_dim / conv_alpha)."""

    rank: int = Field(4, ge=1, le=1024, description="rank of the 3x3 convolutions' adapters (1x1 ones use lora.rank)")
    alpha: float = Field(1.0, gt=0, description="their scale = alpha / rank")


# Where LoCon's convolutions are: the blocks kohya's conv_dim targets (1x1 convolutions and linear
# layers inside them take the linear rank, as kohya does).
CONV_BLOCKS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
FORMATS = (
    Format("kohya", "{name}.safetensors", "A1111/Forge, ComfyUI, InvokeAI, diffusers", attach="lora"),
    Format("diffusers", "diffusers/pytorch_lora_weights.safetensors", "diffusers (pipe.load_lora_weights)",
           attach="lora"),
)


def layer_names(module) -> list[str]:
    """The names a target can match, as peft matches them: each weight layer's name and its suffixes
    (`down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q` is targeted by `to_q`, `attn1.to_q`, ...)."""
    import torch

    return [name for name, m in module.named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Embedding)) and name]


def check_targets(module, targets, key: str, part: str) -> None:
    """RecipeError naming the key, the names that match nothing, and names that exist."""
    names = layer_names(module)
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        short = dict.fromkeys(n.rsplit(".", 2)[-1] if not n.rsplit(".", 1)[-1].isdigit()
                              else ".".join(n.rsplit(".", 2)[-2:]) for n in names)
        raise RecipeError(f"{key}: {missing} match no layer of the {part}; names it has include "
                          f"{', '.join(list(short)[:24])}.")


def conv_block_layers(unet) -> dict[str, bool]:
    """Every Linear / Conv2d inside the ResNet blocks and samplers -> whether it is a kxk (k > 1) conv."""
    import torch

    found = {}
    for block_name, block in unet.named_modules():
        if type(block).__name__ in CONV_BLOCKS:
            for name, layer in block.named_modules():
                if isinstance(layer, torch.nn.Conv2d):
                    found[f"{block_name}.{name}"] = layer.kernel_size != (1, 1)
                elif isinstance(layer, torch.nn.Linear):
                    found[f"{block_name}.{name}"] = False
    return found


def check_rank(module, names, rank: int, key: str) -> None:
    """A rank above a layer's smaller side adds nothing a full update would not: refuse it by name."""
    import torch

    for name in names:
        layer = module.get_submodule(name)
        size = min(layer.weight.shape[0], layer.weight[0].numel()) if isinstance(layer, torch.nn.Conv2d) \
            else min(layer.weight.shape)
        if rank > size:
            raise RecipeError(f"{key} = {rank} is larger than layer '{name}' ({tuple(layer.weight.shape)}), whose "
                              f"updates have rank at most {size}; choose {key} <= {size}.")


def check_dora(recipe) -> None:
    """The settings DoRA cannot be combined with, refused before any work."""
    lora = recipe.lora
    if lora.use_dora and recipe.train.weights_dtype == "bf16":
        raise RecipeError("lora.use_dora with train.weights_dtype = 'bf16': DoRA's magnitudes learn corrections far "
                          "below bf16's resolution (0.4%), which would turn into rounding noise; keep "
                          "train.weights_dtype = 'fp32' (adapters are small).")


def check_dora_layers(module, names: list[str], key: str) -> None:
    """DoRA re-normalises each output channel of a linear or conv weight: nothing else has one (and
    A1111/ComfyUI read dora_scale only for those)."""
    import torch

    other = [n for n in names if not isinstance(module.get_submodule(n), (torch.nn.Linear, torch.nn.Conv2d))]
    if other:
        raise RecipeError(f"lora.use_dora with {key} naming {other[0]} ({type(module.get_submodule(other[0])).__name__}): "
                          "DoRA applies to linear and convolution layers only; drop it from the targets or turn "
                          "lora.use_dora off.")


class LoraMethod(Method):
    name = "lora"
    switchable = True
    sections = {"lora": LoraSection}
    formats = FORMATS
    help = ("LoRA: a small adapter (a few MB) on the base's attention layers. The usual choice for a subject or "
            "a style; loads in every UI. lora.use_dora = true makes it DoRA (weight-decomposed).")
    toy_recipe = "toy-lora"
    toy_variants = {"dora": ("toy-dora", ())}

    def __init__(self, recipe):
        super().__init__(recipe)
        check_dora(recipe)

    def trainable_parts(self, base) -> tuple[str, ...]:
        return ("unet", *base.family.text_encoders) if self.recipe.lora.train_text_encoder else ("unet",)

    @contextmanager
    def switched_off(self, base):
        from peft.tuners.tuners_utils import BaseTunerLayer

        layers = [m for part in self.trainable_parts(base) for m in unwrap(getattr(base, part)).modules()
                  if isinstance(m, BaseTunerLayer)]
        for layer in layers:
            layer.enable_adapters(False)
        try:
            yield
        finally:  # enabling sets the adapters' requires_grad again, as they were
            for layer in layers:
                layer.enable_adapters(True)

    def targets(self, base, part: str) -> tuple[list[str], dict[str, int], dict[str, float]]:
        """(target modules, rank pattern, alpha pattern) of a part, in peft's terms."""
        cfg = self.recipe.lora
        return (list(cfg.target_modules) if part == "unet" else list(cfg.text_encoder_target_modules)), {}, {}

    def configs(self, base):
        """The peft config of each trained part, made once (at prepare: the layer names are read
        before the adapters are injected, which renames them)."""
        if getattr(self, "_configs", None) is None:
            self._configs = self._make_configs(base)
        return self._configs

    def _make_configs(self, base):
        from peft import LoraConfig

        cfg, configs = self.recipe.lora, {}
        for part in self.trainable_parts(base):
            targets, ranks, alphas = self.targets(base, part)
            configs[part] = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                                       rank_pattern=ranks, alpha_pattern=alphas, use_dora=cfg.use_dora,
                                       init_lora_weights=True)
        return configs

    def prepare(self, base) -> ParamGroups:
        from peft import inject_adapter_in_model

        freeze(base)
        groups = []
        for part, config in self.configs(base).items():
            module = getattr(base, part)
            key = "lora.target_modules" if part == "unet" else "lora.text_encoder_target_modules"
            plain = [t for t in config.target_modules if t not in config.rank_pattern]
            check_targets(module, plain, key, part)
            hits = [n for n in layer_names(module) if any(n == t or n.endswith("." + t) for t in plain)]
            check_rank(module, [n for n in hits if n not in config.rank_pattern], config.r, "lora.rank")
            if config.use_dora:
                check_dora_layers(module, hits, key)
            # peft's own injection, not transformers' add_adapter: that one checks a peft version at
            # run time, so a transformers release could break training (5.24 did with peft 0.21).
            inject_adapter_in_model(config, module)  # base weights stay frozen, only the adapters train
            params = [p for p in module.parameters() if p.requires_grad]
            groups.append({"params": params, "lr": part_learning_rate(self.recipe.train, part)})
        return groups

    def initially_zero(self, name: str) -> bool:
        return ".lora_B." in name

    def part_state_dicts(self, base) -> dict:
        """peft-named adapter weights per part, e.g. {'unet': {'down_blocks.0...to_q.lora_A.weight': T}}."""
        from peft.utils import get_peft_model_state_dict

        return {part: get_peft_model_state_dict(unwrap(getattr(base, part))) for part in self.trainable_parts(base)}

    def state_dict(self, base) -> dict:
        from ..statedicts import join_parts

        return join_parts(self.part_state_dicts(base))

    def load_state_dict(self, base, state) -> None:
        from peft.utils import set_peft_model_state_dict

        from ..statedicts import part_of

        for part in self.trainable_parts(base):
            result = set_peft_model_state_dict(unwrap(getattr(base, part)), part_of(state, part))
            if getattr(result, "unexpected_keys", None):
                raise ValueError(f"checkpoint has LoRA keys this model lacks: {result.unexpected_keys[:3]}")

    def network_args(self) -> dict[str, str]:
        """kohya's ss_network_args: what a loader needs besides rank and alpha."""
        return {"algo": "lora", "dora_wd": "True"} if self.recipe.lora.use_dora else {}

    def export(self, base, run, formats, overwrite=False) -> list[Path]:
        from ..export.lora import kohya_tensors, write_diffusers_lora, write_kohya_lora

        parts, written = self.part_state_dicts(base), []
        if "kohya" in formats:
            tensors = kohya_tensors(base, parts, self.configs(base))
            written.append(write_kohya_lora(self.export_path(run, "kohya"), run, base, self.recipe, tensors,
                                            self.network_args(), overwrite=overwrite))
        if "diffusers" in formats:
            written.append(write_diffusers_lora(self.export_path(run, "diffusers"), base, self.recipe.export.dtype,
                                                parts, self.configs(base), overwrite=overwrite))
        return written


class LoconMethod(LoraMethod):
    """LoRA on the attention and on the convolutions of the ResNet blocks and samplers."""

    name = "locon"
    sections = {"lora": LoraSection, "conv": ConvSection}
    help = ("LoCon: LoRA on the attention and on the convolutions of the ResNet blocks, which hold texture and "
            "colour: more of a style or a subject's look at a few MB more. Loads wherever LoRA does.")
    toy_recipe = "toy-locon"
    toy_variants = {}

    def targets(self, base, part: str) -> tuple[list[str], dict[str, int], dict[str, float]]:
        targets, _, _ = super().targets(base, part)
        if part != "unet":
            return targets, {}, {}
        lora, conv = self.recipe.lora, self.recipe.conv
        layers = conv_block_layers(unwrap(base.unet))
        ranks = {name: conv.rank if spatial else lora.rank for name, spatial in layers.items()}
        alphas = {name: conv.alpha if spatial else lora.alpha for name, spatial in layers.items()}
        check_rank(unwrap(base.unet), [n for n, spatial in layers.items() if spatial], conv.rank, "conv.rank")
        return targets + list(layers), ranks, alphas

    def network_args(self) -> dict[str, str]:
        conv = self.recipe.conv
        return {**super().network_args(), "conv_dim": str(conv.rank), "conv_alpha": str(conv.alpha)}
