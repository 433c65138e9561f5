"""Method name -> class. Adding a method is one module and one line here."""

from __future__ import annotations

from ..errors import RecipeError
from .lora import LoraMethod
from .method import Method

METHODS: dict[str, type[Method]] = {LoraMethod.name: LoraMethod}


def get_method(name: str) -> type[Method]:
    if name not in METHODS:
        raise RecipeError(f"unknown method '{name}'; known: {', '.join(METHODS)}.")
    return METHODS[name]
