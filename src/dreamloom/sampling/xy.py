"""A1111's X/Y plot: one setting varied along the columns, another along the rows, every cell the
same seed otherwise, labelled, in one picture. `--x strength=0,0.5,1 --y step=200,400,600`."""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

from ..errors import DreamloomError

# axis -> (what it varies, how a value is read)
AXES: dict[str, tuple[str, type]] = {
    "seed": ("the seed", int),
    "cfg": ("the CFG (guidance) scale", float),
    "steps": ("the sampling steps", int),
    "scheduler": ("the sampler, by its A1111 name", str),
    "strength": ("every --lora/--hypernetwork file's strength (with --run: its exports')", float),
    "step": ("the checkpoint of --run at that training step", int),
    "prompt": ("the prompt: the first value is searched in it and replaced by each (A1111's Prompt S/R)", str),
    "clip_skip": ("A1111's CLIP skip", int),
}


@dataclass
class Axis:
    name: str
    values: list

    def label(self, value) -> str:
        return f"{self.name}: {value:g}" if isinstance(value, float) else f"{self.name}: {value}"


def parse_axis(text: str, flag: str) -> Axis:
    """`name=v1,v2,...` -> Axis, every value checked before anything is drawn."""
    name, sep, values = text.partition("=")
    name = name.strip().lower().replace("-", "_")
    if not sep or name not in AXES:
        raise DreamloomError(f"{flag} '{text}': give NAME=V1,V2,... with NAME one of {', '.join(AXES)} "
                             "(e.g. strength=0,0.5,1).")
    kind = AXES[name][1]
    parts = [v.strip() for v in values.split(",") if v.strip()]
    try:
        parsed = [kind(v) for v in parts]
    except ValueError:
        raise DreamloomError(f"{flag} '{text}': {name} takes {kind.__name__} values, e.g. "
                             f"{name}={'1,2' if kind is int else '0.5,1'}.") from None
    if not parsed:
        raise DreamloomError(f"{flag} '{text}': no values after '='.")
    if name == "scheduler":
        from .schedulers import scheduler_name

        parsed = [scheduler_name(v) for v in parsed]
    return Axis(name, parsed)


def labelled_grid(cells: list[list[Image.Image]], x: Axis | None, y: Axis | None) -> Image.Image:
    """Rows of cells with the x values above the columns and the y values left of the rows."""
    font = ImageFont.load_default()
    w, h = cells[0][0].size
    top = 20 if x else 0
    left = max((int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(y.label(v), font=font)) for v in y.values),
               default=0) + 10 if y else 0
    grid = Image.new("RGB", (left + w * len(cells[0]), top + h * len(cells)), "white")
    draw = ImageDraw.Draw(grid)
    for r, row in enumerate(cells):
        for c, cell in enumerate(row):
            grid.paste(cell, (left + c * w, top + r * h))
    for c, value in enumerate(x.values if x else []):
        draw.text((left + c * w + 4, 4), x.label(value), fill="black", font=font)
    for r, value in enumerate(y.values if y else []):
        draw.text((4, top + r * h + h // 2 - 5), y.label(value), fill="black", font=font)
    return grid
