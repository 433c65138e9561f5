"""LoHa and LoKr through the lycoris-lora package (the reference implementation, whose file layout
A1111/Forge and ComfyUI load): LyCORIS's own modules wrap the layers the recipe targets, on the
attention (lora.target_modules) and the convolutions of the ResNet blocks ([conv]); `lora.use_dora`
weight-decomposes them as LyCORIS does.

- LoHa: dW = (w1_a @ w1_b) * (w2_a @ w2_b), a Hadamard product of two rank-r updates (rank up to r^2).
- LoKr: dW = w1 (x) w2, a Kronecker product of a small and a large factor; `lokr.factor` splits each
  dimension, and w2 is a full matrix when the rank is large enough, as LyCORIS decides.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from pydantic import Field

from ..errors import RecipeError
from ..recipes.sections import Section
from .lora import ConvSection, LoraSection, check_dora, conv_block_layers, layer_names
from .method import Format, Method, ParamGroups, freeze, part_learning_rate, unwrap

ADAPTERS = "lycoris_adapters"  # where a part keeps its LyCORIS modules (so they move, sync and save with it)


class LokrSection(Section):
    factor: int = Field(-1, ge=-1, description="Kronecker factor: each adapted dimension is split as factor x "
                        "(dim / factor); -1 lets LyCORIS choose the most even split of every layer")
    decompose_both: bool = Field(False, description="the smaller Kronecker factor is low-rank too (fewer parameters)")


class LycorisMethod(Method):
    """What LoHa and LoKr share; each says its LyCORIS module class and the options it passes."""

    switchable = True

    sections = {"lora": LoraSection, "conv": ConvSection}
    formats = (Format("kohya", "{name}.safetensors", "A1111/Forge (>= 1.5), ComfyUI, InvokeAI", attach="lora"),)
    algo = ""

    def __init__(self, recipe):
        super().__init__(recipe)
        check_dora(recipe)

    def module_class(self):
        raise NotImplementedError

    def module_options(self) -> dict:
        return {}

    def trainable_parts(self, base) -> tuple[str, ...]:
        return ("unet", *base.family.text_encoders) if self.recipe.lora.train_text_encoder else ("unet",)

    def targets(self, base, part: str) -> dict[str, tuple[int, float]]:
        """Layer name -> (rank, alpha) for every layer of the part that gets a module."""
        import torch

        lora = self.recipe.lora
        module = unwrap(getattr(base, part))
        wanted = lora.target_modules if part == "unet" else lora.text_encoder_target_modules
        key = "lora.target_modules" if part == "unet" else "lora.text_encoder_target_modules"
        names, found = layer_names(module), {}
        for target in wanted:
            hits = [n for n in names if n == target or n.endswith("." + target)]
            if not hits:
                from .lora import check_targets

                check_targets(module, [target], key, part)
            for name in hits:
                if not isinstance(module.get_submodule(name), (torch.nn.Linear, torch.nn.Conv2d)):
                    raise RecipeError(f"{key}: '{target}' names {name}, a {type(module.get_submodule(name)).__name__}; "
                                      f"{self.name} adapts linear and convolution layers only.")
                found[name] = (lora.rank, lora.alpha)
        if part == "unet":
            conv = self.recipe.conv
            for name, spatial in conv_block_layers(module).items():
                found[name] = (conv.rank, conv.alpha) if spatial else (lora.rank, lora.alpha)
        return found

    def check_layer(self, name: str, layer, rank: int) -> None:
        """A rank above a layer's smaller side: refused by name (LoKr overrides: it goes full-matrix)."""
        size = min(layer.weight.shape[0], layer.weight[0].numel())
        if rank > size:
            key = "conv.rank" if layer.weight.dim() == 4 and layer.weight.shape[-1] > 1 else "lora.rank"
            raise RecipeError(f"{key} = {rank} is larger than layer '{name}' ({tuple(layer.weight.shape)}), whose "
                              f"updates have rank at most {size}; choose {key} <= {size}.")

    def prepare(self, base) -> ParamGroups:
        import torch

        freeze(base)
        groups, cls, lora = [], self.module_class(), self.recipe.lora
        for part in self.trainable_parts(base):
            module = unwrap(getattr(base, part))
            adapters = torch.nn.ModuleDict()
            for name, (rank, alpha) in self.targets(base, part).items():
                layer = module.get_submodule(name)
                self.check_layer(name, layer, rank)
                lyco = cls(base.family.kohya_name(base, part, name), layer, 1.0, rank, alpha, dropout=lora.dropout,
                           weight_decompose=lora.use_dora, **self.module_options())
                lyco.to(layer.weight.device)
                lyco.apply_to()
                adapters[lyco.lora_name] = lyco
            module.add_module(ADAPTERS, adapters)
            groups.append({"params": list(adapters.parameters()), "lr": part_learning_rate(self.recipe.train, part)})
        return groups

    @contextmanager
    def switched_off(self, base):
        adapters = [lyco for part in self.trainable_parts(base) for lyco in self.adapters(base, part).values()]
        for lyco in adapters:
            lyco.multiplier = 0.0  # the wrapped layer's own output, unchanged
        try:
            yield
        finally:
            for lyco in adapters:
                lyco.multiplier = 1.0

    def adapters(self, base, part: str):
        return getattr(unwrap(getattr(base, part)), ADAPTERS)

    def kohya_state(self, base) -> dict:
        """The adapters in the kohya/LyCORIS file layout: `<kohya name>.hada_w1_a`, `.lokr_w1`, `.alpha`, ..."""
        return {f"{name}.{k}": v for part in self.trainable_parts(base)
                for name, lyco in self.adapters(base, part).items() for k, v in lyco.state_dict().items()}

    def state_dict(self, base) -> dict:
        return self.kohya_state(base)

    def load_state_dict(self, base, state) -> None:
        import torch

        for part in self.trainable_parts(base):
            for name, lyco in self.adapters(base, part).items():
                own = lyco.state_dict()
                missing = [k for k in own if f"{name}.{k}" not in state]
                if missing:
                    raise ValueError(f"checkpoint lacks {name}.{missing[0]}: it was made with other {self.name} settings")
                with torch.no_grad():
                    for k, v in lyco.named_parameters():
                        v.copy_(state[f"{name}.{k}"])

    def network_args(self) -> dict[str, str]:
        """kohya's ss_network_args, as LyCORIS's own kohya module writes them."""
        conv = self.recipe.conv
        args = {"algo": self.algo, "conv_dim": str(conv.rank), "conv_alpha": str(conv.alpha)}
        if self.recipe.lora.use_dora:
            args["dora_wd"] = "True"
        return args

    def export(self, base, run, formats, overwrite=False) -> list[Path]:
        from ..export.lora import write_kohya_lora

        return [write_kohya_lora(self.export_path(run, "kohya"), run, base, self.recipe, self.kohya_state(base),
                                 self.network_args(), overwrite=overwrite)] if "kohya" in formats else []


class LohaMethod(LycorisMethod):
    name = "loha"
    algo = "loha"
    help = ("LoHa (LyCORIS): a Hadamard product of two low-rank updates, so more detail per parameter than LoRA "
            "at the same rank. Loads in A1111/Forge (>= 1.5), ComfyUI and InvokeAI.")
    toy_recipe = "toy-loha"

    def module_class(self):
        from lycoris.modules.loha import LohaModule

        return LohaModule


class LokrMethod(LycorisMethod):
    name = "lokr"
    algo = "lokr"
    sections = {**LycorisMethod.sections, "lokr": LokrSection}
    help = ("LoKr (LyCORIS): a Kronecker product of a small and a large factor: very small files that still "
            "learn a subject. Loads in A1111/Forge (>= 1.5), ComfyUI and InvokeAI.")
    toy_recipe = "toy-lokr"

    def module_class(self):
        from lycoris.modules.lokr import LokrModule

        return LokrModule

    def module_options(self) -> dict:
        lokr = self.recipe.lokr
        return {"factor": lokr.factor, "decompose_both": lokr.decompose_both}

    def check_layer(self, name: str, layer, rank: int) -> None:
        """A factor must divide both of the layer's dimensions (LyCORIS would silently choose another)."""
        factor = self.recipe.lokr.factor
        dims = (layer.weight.shape[0], layer.weight.shape[1])
        if factor > 0 and any(d % factor for d in dims):
            raise RecipeError(f"lokr.factor = {factor} does not divide layer '{name}' ({dims[0]} out, {dims[1]} in); "
                              "choose a factor that divides every adapted layer's dimensions, or -1 to let "
                              "LyCORIS choose per layer.")

    def network_args(self) -> dict[str, str]:
        lokr = self.recipe.lokr
        return {**super().network_args(), "factor": str(lokr.factor), "decompose_both": str(lokr.decompose_both)}
