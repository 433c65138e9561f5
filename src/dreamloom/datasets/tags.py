"""Tag captions ("sks, 1girl, red hair, smiling"), as kohya's trainers treat them: the kept tags
stay where they are, the others are shuffled and dropped out at every step, so that no tag's
position or company is learned as part of the subject."""

from __future__ import annotations

import torch


def vary_tags(caption: str, generator: torch.Generator, *, shuffle: bool, keep_tokens: int = 0,
              keep_separator: str = "", dropout: float = 0.0, separator: str = ",") -> str:
    """One step's version of a caption. With `keep_separator` in it, what comes before stays in front
    (and what follows a second one stays at the end); else the first `keep_tokens` tags stay."""
    head, tail = "", ""
    if keep_separator and keep_separator in caption:
        head, caption = caption.split(keep_separator, 1)
        if keep_separator in caption:
            caption, tail = caption.split(keep_separator, 1)
        kept, flexible = _tags(head, separator), _tags(caption, separator)
    else:
        tags = _tags(caption, separator)
        kept, flexible = tags[:keep_tokens], tags[keep_tokens:]
    if dropout:
        chance = torch.rand(len(flexible), generator=generator).tolist()
        flexible = [tag for tag, p in zip(flexible, chance) if p >= dropout]
    if shuffle:
        flexible = [flexible[i] for i in torch.randperm(len(flexible), generator=generator).tolist()]
    return f"{separator} ".join(kept + flexible + _tags(tail, separator))


def _tags(text: str, separator: str) -> list[str]:
    return [tag.strip() for tag in text.split(separator) if tag.strip()]
