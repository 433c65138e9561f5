"""Pivotal tuning: a textual-inversion embedding for the trigger and a LoRA, trained together.

The embedding gives the subject a word of its own; the LoRA ([lora] section) adds the detail a few
vectors cannot hold. The main export is the kohya LoRA with the embedding bundled inside
(`bundle_emb.<trigger>.string_to_param.*`, read by A1111 >= 1.7 and ComfyUI); the LoRA and the
embedding are also written as separate files for tools that do not read bundles.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import RecipeError
from ..export.embeddings import bundle_tensors, export_embedding
from ..export.lora import write_diffusers_lora, write_kohya_lora
from .lora import LoraMethod
from .method import Method, ParamGroups
from .textual_inversion import TextualInversionMethod, trigger_embedding


class PivotalMethod(Method):
    name = "pivotal"
    trainable_modules = ("unet", "text_encoder")  # the embedding's vectors live in the text encoder

    def __init__(self, recipe):
        super().__init__(recipe)
        self.lora = LoraMethod(recipe)
        self.ti = TextualInversionMethod(recipe)
        if recipe.output_name == recipe.data.trigger:
            raise RecipeError(f"export.output_name = '{recipe.output_name}' is the trigger, which names the embedding "
                              "files (<trigger>.safetensors); give the LoRA another name, or leave it empty.")

    def prepare(self, base) -> ParamGroups:
        groups = self.lora.prepare(base)  # freezes both parts, then adds the adapters
        return groups + [self.ti.param_group(self.ti.install(base))]

    def loss(self, base, batch):
        return self.ti.loss(base, batch)  # captions/templates with the trigger spelled out as its tokens

    def state_dict(self, base) -> dict:
        return {**self.lora.state_dict(base), **self.ti.state_dict(base)}

    def load_state_dict(self, base, state) -> None:
        self.lora.load_state_dict(base, state)  # it takes its own `unet.` / `text_encoder.` keys
        self.ti.load_state_dict(base, state)

    def export(self, base, run, formats, overwrite=False) -> list[Path]:
        recipe = self.recipe
        parts = self.lora.part_state_dicts(base)
        vectors = trigger_embedding(base).vectors.detach()
        written = []
        if "bundle" in formats:
            written.append(write_kohya_lora(run, base, recipe, parts, overwrite=overwrite,
                                            extra=bundle_tensors(recipe.data.trigger, vectors)))
        if "kohya" in formats:
            written.append(write_kohya_lora(run, base, recipe, parts, overwrite=overwrite,
                                            name=f"{recipe.output_name}-lora"))
        if "diffusers_lora" in formats:
            written.append(write_diffusers_lora(run, recipe, parts, self.lora.configs(), overwrite=overwrite))
        return written + export_embedding(run, base, recipe, vectors, formats, overwrite)
