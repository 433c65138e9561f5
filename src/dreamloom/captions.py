"""Caption placeholders, one rule everywhere: `{trigger}` and `{class_word}` are replaced (plain
text replacement, so a user's own braces stay as they are) and runs of spaces folded."""

from __future__ import annotations

import re

PLACEHOLDERS = ("{trigger}", "{class_word}")
_OTHER = re.compile(r"\{[A-Za-z_]\w*\}")


def fill_placeholders(text: str, trigger: str, class_word: str) -> str:
    filled = text.replace("{trigger}", trigger).replace("{class_word}", class_word)
    return " ".join(filled.split())


def unknown_placeholders(template: str) -> list[str]:
    """`{name}` placeholders of a recipe's template other than the two it may use (a typo, say)."""
    return [m for m in _OTHER.findall(template) if m not in PLACEHOLDERS]
