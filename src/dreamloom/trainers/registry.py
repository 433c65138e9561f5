"""Method name -> plug-in. Adding a method is its module (its sections, formats, help, toy recipe
and training), one line here, its built-in recipes and its tests; the recipe schema, the studio,
`dreamloom eval` and the benchmark read what they need from here."""

from __future__ import annotations

from ..errors import RecipeError
from .dreambooth import DreamboothMethod
from .hypernetwork import HypernetworkMethod
from .lora import LoconMethod, LoraMethod
from .lycoris import LohaMethod, LokrMethod
from .method import Method
from .pivotal import PivotalMethod
from .textual_inversion import TextualInversionMethod

METHODS: dict[str, type[Method]] = {m.name: m for m in (
    LoraMethod, DreamboothMethod, HypernetworkMethod, TextualInversionMethod, PivotalMethod,
    LoconMethod, LohaMethod, LokrMethod,
)}


def get_method(name: str) -> type[Method]:
    if name not in METHODS:
        raise RecipeError(f"unknown method '{name}'; known: {', '.join(METHODS)}.")
    return METHODS[name]


def section_types() -> dict[str, type]:
    """Every method section by its recipe name; methods that share a section share its model."""
    found: dict[str, type] = {}
    for method in METHODS.values():
        for name, model in method.sections.items():
            if found.setdefault(name, model) is not model:
                raise TypeError(f"section [{name}] of {method.name} is another model than the one of that name")
    return found


def eval_entries() -> dict[str, tuple[str, tuple[str, ...]]]:
    """`dreamloom eval --methods` names -> (toy recipe, --set overrides): each method's toy recipe and variants."""
    entries = {}
    for method in METHODS.values():
        if method.toy_recipe:
            entries[method.name] = (method.toy_recipe, ())
        entries.update(method.toy_variants)
    return entries
