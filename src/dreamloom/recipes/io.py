"""Recipes in and out: built-ins by name, TOML files, `--set key=value` overrides, and errors
that name the offending key and list the allowed ones."""

from __future__ import annotations

import tomllib
from importlib import resources
from pathlib import Path
from typing import Any

import tomli_w
from pydantic import BaseModel, ValidationError

from ..errors import RecipeError
from .schema import SCHEMA_VERSION, Recipe

MIGRATIONS: dict[int, Any] = {}  # version -> function(dict) -> dict of the next version


def builtin_names() -> list[str]:
    folder = resources.files(__package__) / "builtin"
    return sorted(p.name.removesuffix(".toml") for p in folder.iterdir() if p.name.endswith(".toml"))


def builtin_text(name: str) -> str:
    path = resources.files(__package__) / "builtin" / f"{name}.toml"
    if not path.is_file():
        raise RecipeError(f"no built-in recipe '{name}'; built-ins: {', '.join(builtin_names())}.")
    return path.read_text()


def _parse(text: str, source: str) -> dict:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"recipe {source} is not valid TOML: {exc}") from exc


def load_recipe_dict(name_or_path: str) -> dict:
    """The raw recipe dict of a built-in name or a .toml file."""
    path = Path(name_or_path).expanduser()
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise RecipeError(f"recipe file '{path}' does not exist.")
        return _parse(path.read_text(), f"'{path}'")
    return _parse(builtin_text(name_or_path), f"'{name_or_path}'")


def _migrate(data: dict, source: str) -> dict:
    version = data.get("schema_version", SCHEMA_VERSION)
    if not isinstance(version, int) or version > SCHEMA_VERSION or version < 1:
        raise RecipeError(
            f"recipe {source} has schema_version {version!r}; this dreamloom reads 1 to "
            f"{SCHEMA_VERSION}. Upgrade dreamloom to read newer recipes."
        )
    while version < SCHEMA_VERSION:
        data = MIGRATIONS[version](data)
        version += 1
    return dict(data, schema_version=SCHEMA_VERSION)


def _model_at(loc: tuple, model: type[BaseModel] = Recipe) -> type[BaseModel] | None:
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        annotation = field.annotation
        candidates = getattr(annotation, "__args__", (annotation,))
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if model is None:
            return None
    return model


def _explain(exc: ValidationError, source: str) -> RecipeError:
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        key = ".".join(str(p) for p in loc)
        if err["type"] == "extra_forbidden":
            section = _model_at(loc[:-1])
            allowed = ", ".join(section.model_fields) if section else "?"
            where = f"[{'.'.join(map(str, loc[:-1]))}]" if len(loc) > 1 else "the top level"
            lines.append(f"- unknown key '{key}'; allowed keys in {where}: {allowed}")
        elif not loc:  # a rule about the recipe as a whole
            lines.append(f"- {err['msg'].removeprefix('Value error, ')}")
        else:
            lines.append(f"- {key}: {err['msg']} (got {err.get('input')!r})")
    return RecipeError(f"recipe {source} is not valid:\n" + "\n".join(lines))


def validate(data: dict, source: str) -> Recipe:
    try:
        return Recipe.model_validate(_migrate(data, source))
    except ValidationError as exc:
        raise _explain(exc, source) from None


def parse_override(item: str) -> tuple[list[str], Any]:
    """`train.steps=800` -> (['train', 'steps'], 800); values are TOML, else plain strings."""
    if "=" not in item:
        raise RecipeError(f"--set '{item}' needs the form dotted.key=value, e.g. train.steps=800.")
    key, raw = (s.strip() for s in item.split("=", 1))
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # bare words (a path, a hub id) are strings
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str], values: dict[str, Any] | None = None) -> dict:
    """Apply `--set key=value` strings, then already-typed {dotted.key: value} pairs."""
    pairs = [(*parse_override(item), item) for item in overrides]
    pairs += [(key.split("."), value, f"{key}={value}") for key, value in (values or {}).items()]
    for keys, value, item in pairs:
        node = data
        for k in keys[:-1]:
            child = node.setdefault(k, {})
            if not isinstance(child, dict):
                raise RecipeError(f"--set '{item}': '{k}' is a value, not a section.")
            node = child
        node[keys[-1]] = value
    return data


def resolve_recipe(name_or_path: str, overrides: list[str] = (), values: dict[str, Any] | None = None) -> Recipe:
    data = apply_overrides(load_recipe_dict(name_or_path), list(overrides), values)
    return validate(data, f"'{name_or_path}'")


def recipe_from_file(path: Path) -> Recipe:
    return recipe_from_text(path.read_text(), f"'{path}'")


def recipe_from_text(text: str, source: str) -> Recipe:
    return validate(_parse(text, source), source)


def dump_recipe(recipe: Recipe) -> str:
    return tomli_w.dumps(recipe.model_dump(mode="json", exclude_none=True))
