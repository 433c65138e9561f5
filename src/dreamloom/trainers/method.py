"""The Method plug-in: everything about one way of personalizing a model, in its own module.

A method declares its recipe sections (pydantic models), its export formats (file names, where
each loads, how the sampler attaches it), its help text and its toy recipe; the recipe schema, the
studio's tables and try-it panel, `dreamloom eval` and `eval --methods` derive all of it from the
registry (registry.py). The training loop owns everything shared (optimizer, precision,
checkpoints, sampling, events); a method only chooses which weights train, how its loss differs
(usually not), and how its weights are saved and exported.

Method modules are imported by the recipe schema, so at import time they load nothing heavier
than pydantic: torch, peft and the rest are imported where they are used.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    import torch

    from ..models import Base
    from ..recipes import Recipe
    from ..rundir import RunDir
    from .batch import Batch


ParamGroups = list[dict]  # torch optimizer parameter groups: {"params": [...], "lr": float}


@dataclass(frozen=True)
class Format:
    """One file (or folder) a method exports."""

    name: str  # the value in export.formats
    file: str  # where it goes under exports/: {name} is export.output_name, {trigger} data.trigger
    loads_in: str  # where users load it
    attach: str | None = None  # how the sampler puts it on a base (sampling.attach): lora | hypernetwork | embedding
    companion: tuple[str, str] | None = None  # (suffix, loads in) of a file written beside it in some cases

    def path(self, recipe: "Recipe") -> Path:
        return Path(self.file.format(name=recipe.output_name, trigger=recipe.data.trigger))


class Method:
    """Base class of every method; subclasses override what differs."""

    name: ClassVar[str] = ""
    sections: ClassVar[dict[str, type]] = {}  # recipe sections the method reads: [name] -> its pydantic model
    formats: ClassVar[tuple[Format, ...]] = ()  # the first is the main export
    help: ClassVar[str] = ""  # one or two plain sentences for the studio
    toy_recipe: ClassVar[str | None] = None  # its built-in recipe on the toy base (dreamloom eval --methods)
    toy_variants: ClassVar[dict[str, tuple[str, tuple[str, ...]]]] = {}  # more eval rows: name -> (recipe, --set)
    full_finetune: ClassVar[bool] = False  # trains whole parts of the base (memory estimate hints)
    switchable: ClassVar[bool] = False  # has switched_off: the untouched model without a copy (output preservation)

    def __init__(self, recipe: "Recipe"):
        self.recipe = recipe

    def trainable_parts(self, base: "Base") -> tuple[str, ...]:
        """The base's parts (family.parts names) holding weights that train: the loop prepares,
        casts and checkpoints them."""
        return ("unet",)

    def prepare(self, base: "Base") -> ParamGroups:
        """Freeze the base, inject/initialise trainable weights, return optimizer groups."""
        raise NotImplementedError

    def before_step(self, base: "Base", step: int) -> None:
        """Called before every step (and on resume): for schedules such as freezing a part."""

    def loss(self, base: "Base", batch: "Batch") -> "torch.Tensor":
        from .noise_loss import noise_loss

        return noise_loss(base, batch, self.recipe.train, teacher=lambda: self.switched_off(base))

    def switched_off(self, base: "Base"):
        """A context in which the base computes as it did before training (the trained adapters bypassed)."""
        raise NotImplementedError(f"{self.name} cannot switch its training off")

    def state_dict(self, base: "Base") -> dict[str, "torch.Tensor"]:
        """The trained weights: what checkpoints hold and exports are made from."""
        raise NotImplementedError

    def load_state_dict(self, base: "Base", state: dict[str, "torch.Tensor"]) -> None:
        raise NotImplementedError

    def export(self, base: "Base", run: "RunDir", formats: list[str], overwrite: bool = False) -> list[Path]:
        raise NotImplementedError

    def initially_zero(self, name: str) -> bool:
        """Whether the trained weight `name` starts at all zeros (Prodigy keeps less state for it)."""
        return False

    def export_path(self, run: "RunDir", format_name: str) -> Path:
        return run.exports / format_of(type(self), format_name).path(self.recipe)

    @classmethod
    def sampling_model(cls, run: "RunDir", files: dict[str, Path], strength: float = 1.0):
        """(base, pipeline) as a user samples this run's exports ({format: path}) at `strength`: by
        default the run's base with the first format that attaches. Methods that export a whole model
        override it."""
        from ..models.base import load_recipe_base
        from ..sampling.attach import attach_file

        recipe = run.recipe()
        fmt = next((f for f in cls.formats if f.attach and f.name in files), None)
        if fmt is None:
            from ..errors import DreamloomError

            raise DreamloomError(f"run '{run.path}' exported none of {[f.name for f in cls.formats if f.attach]}, "
                                 "the files a sampler can put on its base; re-export it with one of them.")
        base = load_recipe_base(recipe.base)
        pipe = base.pipeline()
        attach_file(fmt.attach, pipe, base, files[fmt.name], strength)
        return base, pipe


def freeze(base: "Base") -> None:
    """Every weight of the base frozen: a method then unfreezes or adds what it trains."""
    for module in base.modules().values():
        module.requires_grad_(False)


def part_learning_rate(train, part: str) -> float:
    """The UNet's weights train at train.learning_rate, a text encoder's at train.<part>_lr (SDXL's second:
    text_encoder_2_lr), falling back to text_encoder_lr, then learning_rate."""
    if part == "unet":
        return train.learning_rate
    return getattr(train, f"{part}_lr", None) or train.text_encoder_lr or train.learning_rate


def format_of(method: type[Method], name: str) -> Format:
    return next(f for f in method.formats if f.name == name)


def unwrap(module):
    """The module itself, under any DDP or torch.compile wrapper the accelerator added."""
    import torch

    while True:
        inner = getattr(module, "module", None) or getattr(module, "_orig_mod", None)
        if not isinstance(inner, torch.nn.Module):
            return module
        module = inner
