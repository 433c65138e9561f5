"""DreamBooth: the whole UNet (and optionally the text encoders) learns the subject.

Prior preservation, EMA, the fused backward pass and bf16 weights are the loop's features
(recipe keys [prior] and [train]); this method only says which weights train and how the
result is saved.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from ..recipes.sections import Section
from .method import Format, Method, ParamGroups, freeze, part_learning_rate, unwrap


class DreamboothSection(Section):
    train_text_encoder: bool = False
    text_encoder_steps: int | None = Field(None, ge=0, description="stop training the text encoder after this step; empty: never")


class DreamboothMethod(Method):
    name = "dreambooth"
    sections = {"dreambooth": DreamboothSection}
    formats = (
        Format("single_file", "{name}.safetensors", "A1111/Forge, ComfyUI, InvokeAI, diffusers",
               companion=(".yaml", "A1111/Forge, next to an SD 2 v-prediction model")),
        Format("diffusers", "diffusers", "diffusers (from_pretrained)"),
    )
    help = "DreamBooth: trains the whole model. Strongest likeness, a full-size model file (GBs), needs a big GPU."
    toy_recipe = "toy-dreambooth"
    toy_variants = {"dreambooth-no-prior": ("toy-dreambooth", ("prior.enabled=false",))}  # what prior preservation buys
    full_finetune = True

    def trainable_parts(self, base) -> tuple[str, ...]:
        return ("unet", *base.family.text_encoders) if self.recipe.dreambooth.train_text_encoder else ("unet",)

    def prepare(self, base) -> ParamGroups:
        freeze(base)
        groups = []
        for part in self.trainable_parts(base):
            module = getattr(base, part)
            module.requires_grad_(True)
            groups.append({"params": [p for p in module.parameters()], "lr": part_learning_rate(self.recipe.train, part)})
        return groups

    def before_step(self, base, step: int) -> None:
        stop = self.recipe.dreambooth.text_encoder_steps
        if stop is not None and step >= stop:
            for part in self.trainable_parts(base):
                if part in base.family.text_encoders:  # its gradients stop; the optimizer skips it
                    unwrap(getattr(base, part)).requires_grad_(False)

    def state_dict(self, base) -> dict:
        from ..statedicts import join_parts

        return join_parts({part: unwrap(getattr(base, part)).state_dict() for part in self.trainable_parts(base)})

    def load_state_dict(self, base, state) -> None:
        from ..statedicts import part_of

        for part in self.trainable_parts(base):
            unwrap(getattr(base, part)).load_state_dict(part_of(state, part), strict=True)

    def export(self, base, run, formats, overwrite=False) -> list[Path]:
        import copy

        from ..atomic import atomic_dir
        from ..export.files import DTYPES, refuse_overwrite
        from ..export.ldm_checkpoint import save_single_file

        recipe, written = self.recipe, []
        if "single_file" in formats:
            res = recipe.data.resolution
            metadata = {"modelspec.title": recipe.output_name, "modelspec.trigger_phrase": recipe.data.trigger,
                        "modelspec.resolution": f"{res}x{res}"}
            written.append(save_single_file(base, self.export_path(run, "single_file"), dtype=recipe.export.dtype,
                                            metadata=metadata, overwrite=overwrite))
        if "diffusers" in formats:
            folder = self.export_path(run, "diffusers")
            refuse_overwrite(folder, overwrite)
            dtype = DTYPES[recipe.export.dtype]
            # Cast copies where the dtype differs: the trained model itself must stay as it is.
            parts = {k: m if m.dtype == dtype else copy.deepcopy(m).to(dtype) for k, m in base.modules().items()}
            with atomic_dir(folder) as tmp:
                base.with_modules(**parts).pipeline().save_pretrained(tmp)
            del parts
            written.append(folder)
        return written

    @classmethod
    def sampling_model(cls, run, files, strength: float = 1.0):
        """The exported model itself (its diffusers folder, else its single file), as a user loads it.
        A whole model has no strength to turn down."""
        from ..errors import DreamloomError
        from ..models import load_base

        if strength != 1.0:
            raise DreamloomError(f"run '{run.path}' is a DreamBooth run: its export is a whole model, with no strength "
                                 "to vary; vary step, cfg or seed instead (or extract a LoRA: dreamloom lora extract).")
        base = load_base(str(files.get("diffusers") or files["single_file"]))
        return base, base.pipeline()
