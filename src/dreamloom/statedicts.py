"""State dicts of several parts in one flat dict (checkpoints, the toy base's file): each key
prefixed by its part's name, `unet.down_blocks.0...`, and split apart again."""

from __future__ import annotations


def join_parts(parts: dict[str, dict]) -> dict:
    return {f"{part}.{key}": value for part, state in parts.items() for key, value in state.items()}


def part_of(state: dict, part: str) -> dict:
    prefix = f"{part}."
    return {key.removeprefix(prefix): value for key, value in state.items() if key.startswith(prefix)}
