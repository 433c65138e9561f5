from .io import builtin_names, builtin_text, dump_recipe, recipe_from_file, resolve_recipe
from .schema import Recipe

__all__ = ["Recipe", "builtin_names", "builtin_text", "dump_recipe", "recipe_from_file", "resolve_recipe"]
