"""Base specs, parsed in one place: what a recipe's `base.model` names, and its architecture read
without loading any weights (for checks before a run exists, and for the memory estimate).

A spec is one of: `tiny`, `toy` (the pretrained toy-world base), `random:<arch>` (an architecture
with random weights), a local diffusers folder, a local single-file checkpoint (`.safetensors`,
`.ckpt`), or a hub id (`org/name`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import BaseModelError
from .configs import ARCHS, TINY_BASES, Arch, arch_for_unet

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
BUILTIN = ("toy", *TINY_BASES)  # pretrained weights shipped with the package / built from config in code
RANDOM = "random:"


@dataclass(frozen=True)
class BaseSpec:
    text: str
    kind: str  # "builtin" | "random" | "folder" | "file" | "hub"
    path: Path | None = None

    @property
    def local(self) -> bool:
        """Readable without a network: everything but a hub id."""
        return self.kind != "hub"


def random_specs() -> list[str]:
    return [f"{RANDOM}{name}" for name in ARCHS if name not in TINY_BASES]


def builtin_specs() -> list[str]:
    """Every spec that needs no file: what the studio offers as built-in bases."""
    return [*BUILTIN, *random_specs()]


def parse_base_spec(spec: str) -> BaseSpec:
    """Which kind of base `spec` names; BaseModelError with the fix when it names none."""
    if spec in BUILTIN:
        return BaseSpec(spec, "builtin")
    if spec.startswith(RANDOM):
        if spec not in random_specs():
            raise BaseModelError(f"unknown random architecture '{spec}'; known: {', '.join(random_specs())}.")
        return BaseSpec(spec, "random")
    path = Path(spec).expanduser()
    if path.is_dir():
        return BaseSpec(spec, "folder", path)
    if path.is_file():
        if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
            raise BaseModelError(f"base model file '{path}' is not a checkpoint: expected .safetensors or .ckpt.")
        return BaseSpec(spec, "file", path)
    if HUB_ID.match(spec) and not spec.startswith((".", "~")):
        return BaseSpec(spec, "hub")
    raise BaseModelError(
        f"base model '{spec}' not found: no such file or folder. Pass `tiny`, `toy`, `random:sd15`, "
        "a diffusers folder, a .safetensors/.ckpt file, or a hub id like org/name.")


def spec_arch(spec: str | BaseSpec) -> Arch:
    """The architecture a spec names, read from configs or file headers, never from weights."""
    parsed = spec if isinstance(spec, BaseSpec) else parse_base_spec(spec)
    if parsed.kind == "builtin":
        return ARCHS[parsed.text]
    if parsed.kind == "random":
        return ARCHS[parsed.text.removeprefix(RANDOM)]
    if parsed.kind == "folder":
        config = parsed.path / "unet" / "config.json"
        if not config.is_file():
            raise BaseModelError(f"base model folder '{parsed.path}' has no unet/config.json: it is not a diffusers "
                                 "model folder. Pass a folder written by save_pretrained, or a single file.")
        return _unet_config_arch(config, parsed.text)
    if parsed.kind == "file":
        from .single_file import detect_arch, read_header

        return detect_arch(parsed.path, read_header(parsed.path)[0])
    return _hub_arch(parsed.text)


def _unet_config_arch(config: Path, spec: str) -> Arch:
    unet = json.loads(config.read_text())
    arch = arch_for_unet(unet)
    if arch is None:
        raise BaseModelError(f"base model '{spec}': a UNet of text width {unet.get('cross_attention_dim')} "
                             f"is no known architecture ({', '.join(ARCHS)}).")
    return arch


def _hub_arch(repo: str) -> Arch:
    """A hub model's architecture from the local hub cache where it was downloaded before, else from
    the published repos every architecture lists; reading an architecture never downloads."""
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(repo, "unet/config.json")
    if isinstance(cached, str):
        return _unet_config_arch(Path(cached), repo)
    for arch in ARCHS.values():
        if repo in arch.hub_ids:
            return arch
    raise BaseModelError(f"base model '{repo}' is a hub id that is not in the local hub cache, and reading an "
                         "architecture never downloads anything: pass a local folder or file (or a random:<arch> "
                         "of the same architecture).")


def spec_tokenizers(spec: str) -> list | None:
    """The tokenizers of the base a spec names, where they can be had without loading the model
    (built-in bases, a diffusers folder, a .safetensors checkpoint), so that a bad trigger is
    refused before any run exists; else None (the method checks on the loaded base)."""
    from .family import FAMILIES
    from .tokenizer import build_tokenizer

    try:
        parsed = parse_base_spec(spec)
        if parsed.kind in ("builtin", "random"):
            return [build_tokenizer() for _ in FAMILIES[spec_arch(parsed).family].tokenizers]
        if parsed.kind == "folder":
            from transformers import CLIPTokenizer

            family = FAMILIES[spec_arch(parsed).family]
            folders = [parsed.path / name for name in family.tokenizers]
            if all(f.is_dir() for f in folders):
                return [CLIPTokenizer.from_pretrained(f, local_files_only=True) for f in folders]
        if parsed.kind == "file" and parsed.path.suffix.lower() == ".safetensors":
            from .single_file import file_tokenizers

            return file_tokenizers(parsed.path)
    except Exception:  # loading the base reports what is wrong with it
        return None
    return None
