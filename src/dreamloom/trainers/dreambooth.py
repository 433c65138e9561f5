"""DreamBooth: the whole UNet (and optionally the text encoder) learns the subject.

Prior preservation, EMA, the fused backward pass and bf16 weights are the loop's features
(recipe keys [prior] and [train]); this method only says which weights train and how the
result is saved.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

from ..atomic import atomic_dir
from ..export.files import DTYPES, refuse_overwrite
from ..export.ldm_checkpoint import save_single_file
from .method import Method, ParamGroups, unwrap


class DreamboothMethod(Method):
    name = "dreambooth"

    @property
    def trainable_modules(self) -> tuple[str, ...]:
        return ("unet", "text_encoder") if self.recipe.dreambooth.train_text_encoder else ("unet",)

    def prepare(self, base) -> ParamGroups:
        base.vae.requires_grad_(False)
        base.text_encoder.requires_grad_(False)
        train = self.recipe.train
        groups = []
        for part in self.trainable_modules:
            module = getattr(base, part)
            module.requires_grad_(True)
            lr = train.learning_rate if part == "unet" else (train.text_encoder_lr or train.learning_rate)
            groups.append({"params": [p for p in module.parameters()], "lr": lr})
        return groups

    def before_step(self, base, step: int) -> None:
        stop = self.recipe.dreambooth.text_encoder_steps
        if "text_encoder" in self.trainable_modules and stop is not None and step >= stop:
            unwrap(base.text_encoder).requires_grad_(False)  # its gradients stop; the optimizer skips it

    def state_dict(self, base) -> dict:
        return {f"{part}.{k}": v for part in self.trainable_modules
                for k, v in unwrap(getattr(base, part)).state_dict().items()}

    def load_state_dict(self, base, state) -> None:
        for part in self.trainable_modules:
            prefix = f"{part}."
            unwrap(getattr(base, part)).load_state_dict(
                {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}, strict=True)

    def export(self, base, run, formats, overwrite=False) -> list[Path]:
        name = self.recipe.output_name
        written = []
        if "single_file" in formats:
            metadata = {"modelspec.title": name, "modelspec.trigger_phrase": self.recipe.data.trigger,
                        "modelspec.resolution": f"{self.recipe.data.resolution}x{self.recipe.data.resolution}"}
            written.append(save_single_file(base, run.exports / f"{name}.safetensors",
                                            dtype=self.recipe.export.dtype, metadata=metadata, overwrite=overwrite))
        if "diffusers" in formats:
            folder = run.exports / "diffusers"
            refuse_overwrite(folder, overwrite)
            dtype = DTYPES[self.recipe.export.dtype]
            # Cast copies where the dtype differs: the trained model itself must stay as it is.
            parts = {part: getattr(base, part) for part in ("unet", "vae", "text_encoder")}
            parts = {k: m if m.dtype == dtype else copy.deepcopy(m).to(dtype) for k, m in parts.items()}
            with atomic_dir(folder) as tmp:
                dataclasses.replace(base, **parts).pipeline().save_pretrained(tmp)
            del parts
            written.append(folder)
        return written
