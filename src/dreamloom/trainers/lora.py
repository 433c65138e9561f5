"""LoRA through peft: low-rank adapters on the UNet's attention (and optionally the text encoder)."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from ..errors import RecipeError
from ..export.lora import write_diffusers_lora, write_kohya_lora
from .method import Method, ParamGroups, unwrap

PARTS = ("unet", "text_encoder")
TARGET_KEYS = {"unet": "lora.target_modules", "text_encoder": "lora.text_encoder_target_modules"}


def layer_names(module) -> list[str]:
    """The names a target can match, as peft matches them: each weight layer's name and its suffixes
    (`down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q` is targeted by `to_q`, `attn1.to_q`, ...)."""
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


class LoraMethod(Method):
    name = "lora"

    @property
    def trainable_modules(self) -> tuple[str, ...]:
        return PARTS if self.recipe.lora.train_text_encoder else ("unet",)

    def configs(self) -> dict[str, LoraConfig]:
        cfg = self.recipe.lora
        targets = {"unet": cfg.target_modules, "text_encoder": cfg.text_encoder_target_modules}
        return {
            part: LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                             target_modules=list(targets[part]), init_lora_weights=True)
            for part in self.trainable_modules
        }

    def prepare(self, base) -> ParamGroups:
        for part in PARTS:
            getattr(base, part).requires_grad_(False)
        groups = []
        train = self.recipe.train
        for part, config in self.configs().items():
            module = getattr(base, part)
            check_targets(module, config.target_modules, TARGET_KEYS[part], part)
            # peft's own injection, not transformers' add_adapter: that one checks a peft version at
            # run time, so a transformers release could break training (5.24 did with peft 0.21).
            inject_adapter_in_model(config, module)  # base weights stay frozen, only lora_A/B train
            params = [p for p in module.parameters() if p.requires_grad]
            lr = train.learning_rate if part == "unet" else (train.text_encoder_lr or train.learning_rate)
            groups.append({"params": params, "lr": lr})
        return groups

    def part_state_dicts(self, base) -> dict[str, dict[str, torch.Tensor]]:
        """peft-named LoRA weights per part, e.g. {'unet': {'down_blocks.0...to_q.lora_A.weight': T}}."""
        return {part: get_peft_model_state_dict(unwrap(getattr(base, part))) for part in self.trainable_modules}

    def state_dict(self, base) -> dict[str, torch.Tensor]:
        return {f"{part}.{k}": v for part, sd in self.part_state_dicts(base).items() for k, v in sd.items()}

    def load_state_dict(self, base, state) -> None:
        for part in self.trainable_modules:
            prefix = f"{part}."
            part_state = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
            result = set_peft_model_state_dict(unwrap(getattr(base, part)), part_state)
            if getattr(result, "unexpected_keys", None):
                raise ValueError(f"checkpoint has LoRA keys this model lacks: {result.unexpected_keys[:3]}")

    def export(self, base, run, formats, overwrite=False) -> list[Path]:
        parts = self.part_state_dicts(base)
        configs = self.configs()
        written = []
        if "kohya" in formats:
            written.append(write_kohya_lora(run, base, self.recipe, parts, overwrite=overwrite))
        if "diffusers" in formats:
            written.append(write_diffusers_lora(run, self.recipe, parts, configs, overwrite=overwrite))
        return written
