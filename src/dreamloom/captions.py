"""Caption placeholders, one rule everywhere: `{trigger}` and `{class_word}` are replaced (plain
text replacement, so a user's own braces stay as they are) and runs of spaces folded."""

from __future__ import annotations

import math
import re

PLACEHOLDERS = ("{trigger}", "{class_word}")
_OTHER = re.compile(r"\{[A-Za-z_]\w*\}")
_CHOICES = re.compile(r"\{([^{}]*\|[^{}]*)\}")


def fill_placeholders(text: str, trigger: str, class_word: str) -> str:
    filled = text.replace("{trigger}", trigger).replace("{class_word}", class_word)
    return " ".join(filled.split())


def unknown_placeholders(template: str) -> list[str]:
    """`{name}` placeholders of a recipe's template other than the two it may use (a typo, say)."""
    return [m for m in _OTHER.findall(template) if m not in PLACEHOLDERS]


def spelled_out(template: str) -> list[str]:
    """A prompt template's `{a|b|c}` choices (Dynamic Prompts' syntax) spelled out: every combination, the first
    group's choices changing fastest, so that any n consecutive prompts hold all n choices of the first group."""
    pieces = _CHOICES.split(template)  # text, choices, text, ..., text
    texts, groups = pieces[0::2], [choices.split("|") for choices in pieces[1::2]]
    prompts = []
    for k in range(math.prod(len(g) for g in groups)):
        chosen = []
        for g in groups:
            chosen.append(g[k % len(g)])
            k //= len(g)
        prompts.append("".join(t + c for t, c in zip(texts, [*chosen, ""])))
    return prompts
