"""Pivotal tuning: a textual-inversion embedding for the trigger and a LoRA, trained together.

The embedding gives the subject a word of its own; the LoRA ([lora] section) adds the detail a few
vectors cannot hold. The main export is the kohya LoRA with the embedding bundled inside
(`bundle_emb.<trigger>.string_to_param.*`, read by A1111 >= 1.7 and ComfyUI); the LoRA and the
embedding are also written as separate files for tools that do not read bundles.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import RecipeError
from . import lora as lora_module
from . import textual_inversion as ti_module
from .method import Format, Method, ParamGroups

FORMATS = (
    Format("bundle", "{name}.safetensors", "A1111/Forge (>= 1.7), ComfyUI: the LoRA with its embedding inside",
           attach="lora"),
    Format("kohya", "{name}-lora.safetensors", "A1111/Forge, ComfyUI, InvokeAI (with the embedding file beside it)"),
    Format("diffusers_lora", "diffusers/pytorch_lora_weights.safetensors", "diffusers (pipe.load_lora_weights)"),
    *ti_module.FORMATS,
)


class PivotalMethod(Method):
    name = "pivotal"
    sections = {"lora": lora_module.LoraSection, "textual_inversion": ti_module.TextualInversionSection}
    formats = FORMATS
    help = "Pivotal tuning: a new word and a LoRA trained together, in one file."
    toy_recipe = "toy-pivotal"

    def __init__(self, recipe):
        super().__init__(recipe)
        self.lora = lora_module.LoraMethod(recipe)
        self.ti = ti_module.TextualInversionMethod(recipe, inside=self.name)
        if recipe.output_name == recipe.data.trigger:
            raise RecipeError(f"export.output_name = '{recipe.output_name}' is the trigger, which names the embedding "
                              "files (<trigger>.safetensors); give the LoRA another name, or leave it empty.")

    def trainable_parts(self, base) -> tuple[str, ...]:
        return ("unet", *base.family.text_encoders)  # the embedding's vectors live in the text encoders

    def prepare(self, base) -> ParamGroups:
        ti_module.check_formats(self.recipe, base)
        groups = self.lora.prepare(base)  # freezes every part, then adds the adapters
        return groups + [self.ti.param_group(self.ti.install(base))]

    def initially_zero(self, name: str) -> bool:
        return self.lora.initially_zero(name)

    def loss(self, base, batch):
        return self.ti.loss(base, batch)  # captions/templates with the trigger spelled out as its tokens

    def state_dict(self, base) -> dict:
        return {**self.lora.state_dict(base), **self.ti.state_dict(base)}

    def load_state_dict(self, base, state) -> None:
        self.lora.load_state_dict(base, state)  # it takes its own per-part keys
        self.ti.load_state_dict(base, state)

    def export(self, base, run, formats, overwrite=False) -> list[Path]:
        from ..export.embeddings import bundle_tensors, export_embedding
        from ..export.lora import kohya_tensors, write_diffusers_lora, write_kohya_lora

        recipe, parts, configs = self.recipe, self.lora.part_state_dicts(base), self.lora.configs(base)
        vectors, args = ti_module.trigger_vectors(base), self.lora.network_args()
        written = []
        if "bundle" in formats:
            tensors = {**kohya_tensors(base, parts, configs), **bundle_tensors(base, recipe.data.trigger, vectors)}
            written.append(write_kohya_lora(self.export_path(run, "bundle"), run, base, recipe, tensors, args,
                                            overwrite=overwrite))
        if "kohya" in formats:
            written.append(write_kohya_lora(self.export_path(run, "kohya"), run, base, recipe,
                                            kohya_tensors(base, parts, configs), args, overwrite=overwrite))
        if "diffusers_lora" in formats:
            written.append(write_diffusers_lora(self.export_path(run, "diffusers_lora"), base, recipe.export.dtype,
                                                parts, configs, overwrite=overwrite))
        paths = {f: self.export_path(run, f) for f in formats if f in {t.name for t in ti_module.FORMATS}}
        return written + export_embedding(paths, run, base, recipe, vectors, overwrite)
