"""The `dreamloom lora` subcommands (filled in by the LoRA-tools work)."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("lora", help="LoRA tools: merge, resize, extract, info")
    p.set_defaults(func=lambda args: p.print_help() or 2)
