"""The `dreamloom lora` subcommands: thin shells over merge.py, resize.py, extract.py and info.py."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import DreamloomError

DTYPES = ["fp16", "bf16", "fp32"]


def _positive_int(text: str) -> int:
    from ..cli import positive_int

    return positive_int(text)


def _energy(text: str) -> float:
    from ..cli import finite_float

    value = finite_float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{value:g} is outside (0, 1]: the share of squared singular values to keep")
    return value


def _rank_or_energy(p, required: bool) -> None:
    group = p.add_mutually_exclusive_group(required=required)
    group.add_argument("--rank", type=_positive_int, help="rank of every layer in the output")
    group.add_argument("--energy", type=_energy, help="per layer, the smallest rank that keeps this share (0-1] "
                       "of the squared singular values, e.g. 0.9; layers then differ in rank")


def _common(p, out_help: str) -> None:
    p.add_argument("--out", required=True, type=Path, help=out_help)
    p.add_argument("--dtype", choices=DTYPES, default="fp16", help="precision of the written weights (default fp16)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists (otherwise refused)")


def _report(line: str) -> None:
    print(line, file=sys.stderr)


def _out_suffix(path: Path) -> None:
    if path.suffix != ".safetensors":
        raise DreamloomError(f"--out '{path}' must end in .safetensors (the only format the lora tools write).")


def run_merge(args) -> int:
    from .merge import merge_into_base, merge_into_lora

    _out_suffix(args.out)
    if args.to_lora:
        path = merge_into_lora(args.files, args.out, base_spec=args.base, rank=args.rank, energy=args.energy,
                               dtype=args.dtype, overwrite=args.overwrite, report=_report)
    else:
        if args.base is None or args.rank is not None or args.energy is not None:
            raise DreamloomError("merge into a checkpoint needs --base (the model to merge into) and takes no "
                                 "--rank/--energy; to make one LoRA file instead, add --to-lora.")
        path = merge_into_base(args.files, args.base, args.out, args.dtype, args.overwrite)
    print(path)
    return 0


def run_resize(args) -> int:
    from .resize import resize

    _out_suffix(args.out)
    print(resize(args.file, args.out, rank=args.rank, energy=args.energy, base_spec=args.base, dtype=args.dtype,
                 overwrite=args.overwrite, report=_report))
    return 0


def run_extract(args) -> int:
    from .extract import extract

    _out_suffix(args.out)
    print(extract(args.model, args.base, args.out, rank=args.rank, energy=args.energy, conv=args.conv,
                  dtype=args.dtype, overwrite=args.overwrite, report=_report))
    return 0


def run_info(args) -> int:
    from .info import describe, text

    info = describe(args.file)
    print(json.dumps(info, indent=2) if args.json else text(info))
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("lora", help="LoRA tools: merge, resize, extract, info",
                       description="Maintain LoRA/LyCORIS files: merge them, shrink them, extract one from a "
                                   "fine-tuned model, or see what a file is. Outputs are kohya-layout .safetensors.")
    tools = p.add_subparsers(dest="lora_command", metavar="TOOL")
    p.set_defaults(func=lambda args: p.print_help() or 2)

    m = tools.add_parser("merge", help="merge LoRAs at strengths into a base checkpoint or into one LoRA")
    m.add_argument("files", nargs="+", metavar="FILE[:STRENGTH]", help="kohya-layout LoRA/LyCORIS files, each "
                   "with an optional strength (default 1), e.g. sks.safetensors:0.8")
    m.add_argument("--base", help="the base model: merged into (a checkpoint is written), or whose weights the "
                   "SVD of --to-lora uses (tiny, a diffusers folder, a .safetensors checkpoint)")
    m.add_argument("--to-lora", action="store_true", help="write one LoRA file instead of a checkpoint: ranks "
                   "side by side (exact, plain LoRAs only), or with --rank/--energy the summed difference by SVD")
    _rank_or_energy(m, required=False)
    _common(m, "the file to write (.safetensors): a single-file checkpoint, or a LoRA with --to-lora")
    m.set_defaults(func=run_merge)

    r = tools.add_parser("resize", help="a LoRA to a lower rank by SVD, printing each layer's error")
    r.add_argument("file", help="a kohya-layout LoRA or LoCon file")
    _rank_or_energy(r, required=True)
    r.add_argument("--base", help="the base it was made for, when its metadata does not say (only names the "
                   "family in the output's metadata; no weights are read)")
    _common(r, "the resized LoRA to write (.safetensors)")
    r.set_defaults(func=run_resize)

    e = tools.add_parser("extract", help="a LoRA from a fine-tuned (DreamBooth) model and its base")
    e.add_argument("model", help="the fine-tuned model: a .safetensors checkpoint or a diffusers folder")
    e.add_argument("--base", required=True, help="the model it was fine-tuned from")
    _rank_or_energy(e, required=True)
    e.add_argument("--conv", action="store_true", help="also extract 3x3 conv layers (LoCon); default: linear "
                   "and 1x1 conv layers only")
    _common(e, "the LoRA to write (.safetensors)")
    e.set_defaults(func=run_extract)

    i = tools.add_parser("info", help="what a LoRA/LyCORIS/embedding/hypernetwork file is, without a base")
    i.add_argument("file", help="the file to describe (.safetensors or .pt)")
    i.add_argument("--json", action="store_true", help="print JSON instead of text")
    i.set_defaults(func=run_info)
