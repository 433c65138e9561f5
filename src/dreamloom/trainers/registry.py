"""Method name -> class. Adding a method is one module and one line here."""

from __future__ import annotations

from ..errors import RecipeError
from .dreambooth import DreamboothMethod
from .hypernetwork import HypernetworkMethod
from .lora import LoraMethod
from .method import Method
from .pivotal import PivotalMethod
from .textual_inversion import TextualInversionMethod

METHODS: dict[str, type[Method]] = {m.name: m for m in (LoraMethod, DreamboothMethod, HypernetworkMethod,
                                                         TextualInversionMethod, PivotalMethod)}


def get_method(name: str) -> type[Method]:
    if name not in METHODS:
        raise RecipeError(f"unknown method '{name}'; known: {', '.join(METHODS)}.")
    return METHODS[name]
