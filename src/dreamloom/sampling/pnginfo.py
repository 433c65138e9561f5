"""A picture's settings in its PNG text, as A1111 writes them ("parameters": the prompt, the
negative prompt, then `Key: value, ...`; what A1111's PNG Info tab, ComfyUI and civitai read), and
read back; beside it every cell's prompt and seed as JSON ("dreamloom") for grids."""

from __future__ import annotations

import json
import re

from PIL.PngImagePlugin import PngInfo

_FIELD = re.compile(r'\s*([\w][\w \-/]*):\s*("(?:\\.|[^"\\])*"|[^,]*)(?:,|$)')


def picture_fields(r, *, seed: int, width: int, height: int) -> dict[str, str]:
    """A1111's fields of one picture of a request (sampling/command.Request)."""
    fields = {"Steps": r.steps, "Sampler": r.scheduler or "DDIM", "CFG scale": f"{r.guidance:g}", "Seed": seed,
              "Size": f"{width}x{height}", "Model": r.model_name}
    if r.clip_skip and r.clip_skip > 1:
        fields["Clip skip"] = r.clip_skip
    if r.init_image is not None:
        fields["Denoising strength"] = f"{r.strength:g}"
    if r.hires is not None:
        fields.update({"Denoising strength": f"{r.hires.strength:g}", "Hires upscale": f"{r.hires.scale:g}",
                       "Hires steps": r.hires.steps or r.steps,
                       "Hires upscaler": "Latent" if r.hires.upscaler == "latent" else "Lanczos"})
    if r.controlnet:
        fields["ControlNet 0"] = f'"Module: none, Model: {_stem(r.controlnet)}, Weight: {r.control_scale:g}"'
    for i, (path, strength) in enumerate(r.loras):
        fields[f"Lora {i}"] = f'"{_stem(path)}: {strength if r.adapter_strength is None else r.adapter_strength:g}"'
    return {k: str(v) for k, v in fields.items()}


def _stem(path) -> str:
    from pathlib import Path

    return Path(str(path)).stem


def parameters_text(prompt: str, negative_prompt: str, fields: dict[str, str]) -> str:
    negative = f"\nNegative prompt: {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n" + ", ".join(f"{k}: {v}" for k, v in fields.items())


def read_parameters(text: str) -> tuple[str, str, dict[str, str]]:
    """(prompt, negative prompt, fields) of an A1111 "parameters" text: the last line holds the
    fields, a line starting 'Negative prompt:' (and what follows it) the negative prompt."""
    *lines, last = text.split("\n")
    fields = {m.group(1).strip(): m.group(2).strip() for m in _FIELD.finditer(last)}
    start = next((i for i, line in enumerate(lines) if line.startswith("Negative prompt:")), len(lines))
    negative = "\n".join(lines[start:]).removeprefix("Negative prompt:").strip()
    return "\n".join(lines[:start]), negative, fields


def png_info(cells: list[dict], columns: int, axes: dict) -> PngInfo:
    """PNG text of the written picture: A1111's "parameters" of its first picture (A1111 does the same
    for grids) and every picture's prompt, seed and cell settings as JSON."""
    info = PngInfo()
    first = cells[0]
    info.add_text("parameters", parameters_text(first["prompt"], first["negative"], first["fields"]))
    info.add_text("dreamloom", json.dumps({"cells": cells, "columns": columns, "axes": axes}))
    return info
