"""Hypernetworks (A1111's format) trained in the shared loop: 8-bit AdamW, checkpointing, mixed
precision and resume, none of which A1111's own trainer has."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from ..errors import RecipeError
from ..recipes.sections import Section
from .method import Format, Method, ParamGroups, freeze


class HypernetworkSection(Section):
    """AUTOMATIC1111's hypernetwork: per context width, two MLPs that shift attention's k and v."""

    layer_structure: list[float] = Field(default_factory=lambda: [1.0, 2.0, 1.0])
    activation: str = Field("linear", description="linear relu leakyrelu elu swish tanh sigmoid softsign mish")
    layer_norm: bool = False
    dropout: bool = False
    dropout_structure: list[float] | None = Field(None, description="per layer; empty: A1111's default for `dropout`")
    last_layer_dropout: bool = False
    activate_output: bool = False
    weight_init: Literal["Normal", "XavierUniform", "XavierNormal", "KaimingUniform", "KaimingNormal"] = "Normal"
    allow_unportable: bool = Field(False, description="allow an activation ComfyUI cannot load (A1111 only)")


def config_from_section(section):
    """The recipe's [hypernetwork] section as a network config; RecipeError naming key and fix."""
    from ..models.hypernetwork import (PORTABLE_ACTIVATIONS, HypernetworkConfig, a1111_activations,
                                       default_dropout_structure)

    ls = list(section.layer_structure)
    if len(ls) < 2 or ls[0] != 1 or ls[-1] != 1 or any(x <= 0 for x in ls):
        raise RecipeError(
            f"hypernetwork.layer_structure = {ls}: it must start and end with 1 (the MLP maps the context "
            "back to its own width) and hold only positive sizes, e.g. [1, 2, 1] or [1, 1.5, 1.5, 1].")
    name = section.activation
    known = a1111_activations()
    if name not in known:
        raise RecipeError(f"hypernetwork.activation = '{name}' is unknown; choose one of "
                          f"{', '.join(PORTABLE_ACTIVATIONS)} (these load in A1111 and ComfyUI).")
    if name not in PORTABLE_ACTIVATIONS and not section.allow_unportable:
        raise RecipeError(
            f"hypernetwork.activation = '{name}': A1111 loads it but ComfyUI refuses the file. Choose one of "
            f"{', '.join(PORTABLE_ACTIVATIONS)}, or set hypernetwork.allow_unportable = true for an A1111-only file.")
    try:
        known[name]()
    except TypeError:
        raise RecipeError(f"hypernetwork.activation = '{name}' needs arguments, which the file format cannot "
                          f"hold; choose one of {', '.join(PORTABLE_ACTIVATIONS)}.") from None
    dropout = section.dropout_structure
    if dropout is not None and section.last_layer_dropout:
        raise RecipeError("hypernetwork.last_layer_dropout is ignored when hypernetwork.dropout_structure is given "
                          "(the structure says each layer's dropout, the last hidden one included); remove one of them.")
    if dropout is None:
        dropout = default_dropout_structure(ls, section.dropout, section.last_layer_dropout)
    elif not section.dropout and any(dropout):
        raise RecipeError("hypernetwork.dropout_structure is set but hypernetwork.dropout = false, so it would "
                          "be ignored; set hypernetwork.dropout = true, or remove dropout_structure.")
    if len(dropout) != len(ls) or dropout[0] != 0 or dropout[-1] != 0 or not all(0 <= p < 1 for p in dropout):
        raise RecipeError(
            f"hypernetwork.dropout_structure = {dropout}: give one probability per layer_structure entry "
            f"({len(ls)}), each in [0, 1), with 0 first and last, e.g. {default_dropout_structure(ls, True, True)}.")
    return HypernetworkConfig(
        layer_structure=tuple(float(x) for x in ls), activation_func=name, is_layer_norm=section.layer_norm,
        weight_initialization=section.weight_init, use_dropout=section.dropout,
        dropout_structure=tuple(float(p) for p in dropout), last_layer_dropout=dropout[-2] != 0,
        activate_output=section.activate_output)


class HypernetworkMethod(Method):
    name = "hypernetwork"
    sections = {"hypernetwork": HypernetworkSection}
    formats = (
        Format("pt", "{name}.pt", "A1111/Forge, ComfyUI", attach="hypernetwork"),
        Format("safetensors", "{name}.safetensors", "dreamloom's sampler", attach="hypernetwork"),
    )
    help = "Hypernetwork: small networks that nudge attention (A1111 style). Mostly for styles."
    toy_recipe = "toy-hypernetwork"

    def __init__(self, recipe):
        super().__init__(recipe)
        self.config = config_from_section(recipe.hypernetwork)  # bad settings fail before any work
        self.network = None

    def prepare(self, base) -> ParamGroups:
        from ..models.hypernetwork import Hypernetwork, attach_hypernetwork, context_widths

        freeze(base)
        self.network = Hypernetwork(self.config, context_widths(base.unet)).to(base.unet.device)
        # Trained at strength 1: A1111 ignores the strength while training, too.
        attach_hypernetwork(base.unet, self.network, 1.0)
        return [{"params": list(self.network.parameters()), "lr": self.recipe.train.learning_rate}]

    def initially_zero(self, name: str) -> bool:
        return "processor.networks." in name and name.endswith("bias")

    def state_dict(self, base) -> dict:
        return self.network.state_dict()

    def load_state_dict(self, base, state) -> None:
        result = self.network.load_state_dict(state, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise ValueError(f"checkpoint does not fit this hypernetwork: missing {result.missing_keys[:3]}, "
                             f"unexpected {result.unexpected_keys[:3]}")

    def export(self, base, run, formats, overwrite=False) -> list[Path]:
        from ..export.hypernetwork import write_hypernetwork_pt, write_hypernetwork_safetensors

        writers = {"pt": write_hypernetwork_pt, "safetensors": write_hypernetwork_safetensors}
        return [writers[f](self.export_path(run, f), run, base, self.recipe, self.network, overwrite=overwrite)
                for f in formats]
