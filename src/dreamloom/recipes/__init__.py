"""Recipes: one typed TOML file per run. The names below load on first use, so that a method module
can import `recipes.sections` without pulling in the schema (which is built from the methods)."""

from importlib import import_module

_NAMES = {"Recipe": "schema", "builtin_names": "io", "builtin_text": "io", "dump_recipe": "io",
          "recipe_from_file": "io", "resolve_recipe": "io"}
__all__ = list(_NAMES)


def __getattr__(name: str):
    if name not in _NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_NAMES[name]}"), name)
