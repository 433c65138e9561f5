"""Prompts as A1111 reads them: `(word:1.2)`, `(word)` = x1.1, `[word]` = /1.1, nesting multiplies,
`\\(` is a literal bracket, `BREAK` starts a new chunk; and prompts of any length, in chunks of 75
tokens, each encoded on its own between start and end tokens and the hidden states put side by side
(A1111's way; a chunk ends at the last comma of its final 20 tokens when there is one, so that a
phrase is not cut in two). Each token's hidden state is multiplied by its weight and the chunk's
mean restored afterwards, as A1111 does, so weights shift emphasis without changing the scale.

A prompt without weights that fits 75 tokens is encoded exactly as diffusers does it.
"""

from __future__ import annotations

import re

import torch

from ..models.family import Conditioning, family_of_pipeline

CHUNK = 75  # tokens per chunk between the start and end tokens (CLIP's 77)
COMMA_LOOKBACK = 20  # how far back a full chunk looks for a comma to end at
ROUND, SQUARE = 1.1, 1 / 1.1
# pipeline arguments of a Conditioning's tensors
PIPELINE_ARGS = {"hidden": "prompt_embeds", "pooled": "pooled_prompt_embeds"}

_TOKEN = re.compile(r"\\[()\[\]\\]|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|\]|[^\\()\[\]:]+|:")
_BREAK = re.compile(r"\s*\bBREAK\b\s*")


def parse_weights(text: str) -> list[tuple[str, float]]:
    """(text, weight) pieces of a prompt, neighbours of equal weight merged; a BREAK is ("BREAK", -1).
    Unclosed brackets still weigh what follows them, as in A1111."""
    pieces: list[list] = []
    round_open, square_open = [], []

    def scale(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= factor

    for match in _TOKEN.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\") and len(token) == 2:
            pieces.append([token[1], 1.0])
        elif token == "(":
            round_open.append(len(pieces))
        elif token == "[":
            square_open.append(len(pieces))
        elif weight is not None and round_open:
            scale(round_open.pop(), float(weight))
        elif token == ")" and round_open:
            scale(round_open.pop(), ROUND)
        elif token == "]" and square_open:
            scale(square_open.pop(), SQUARE)
        else:
            for i, part in enumerate(_BREAK.split(token)):
                if i:
                    pieces.append(["BREAK", -1.0])
                pieces.append([part, 1.0])
    for start in round_open:
        scale(start, ROUND)
    for start in square_open:
        scale(start, SQUARE)
    merged: list[list] = []
    for piece in pieces:
        if not piece[0] and piece[1] != -1:
            continue
        if merged and merged[-1][1] == piece[1] and piece[1] != -1:
            merged[-1][0] += piece[0]
        else:
            merged.append(piece)
    return [(t, w) for t, w in merged] or [("", 1.0)]


def chunks(tokenizer, pieces: list[tuple[str, float]]) -> list[tuple[list[int], list[float]]]:
    """The prompt's tokens and weights in chunks of at most CHUNK (ids without start/end tokens)."""
    comma = tokenizer.convert_tokens_to_ids(",</w>")
    comma = None if comma == tokenizer.unk_token_id else comma  # a vocabulary without a comma token
    out, ids, weights = [], [], []

    def close(at: int | None = None) -> None:
        nonlocal ids, weights
        at = len(ids) if at is None else at
        out.append((ids[:at], weights[:at]))
        ids, weights = ids[at:], weights[at:]

    for text, weight in pieces:
        if weight == -1:  # BREAK
            close()
            continue
        for token in tokenizer(text, add_special_tokens=False, truncation=False, verbose=False).input_ids:
            ids.append(token)
            weights.append(weight)
            if len(ids) == CHUNK:
                last = max((i for i in range(CHUNK - COMMA_LOOKBACK, CHUNK) if comma is not None and ids[i] == comma), default=None)
                close(last + 1 if last is not None else None)
    if ids or not out:
        close()
    return out


def _chunk_ids(tokenizer, ids: list[int]) -> torch.Tensor:
    """[1, 77]: start, the chunk, end, padding: what the tokenizer itself makes of a short prompt."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    row = [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id] + [pad] * (CHUNK - len(ids))
    return torch.tensor([row])


def encode_prompt(pipe, prompt: str, clip_skip: int = 1, n_chunks: int = 0) -> Conditioning:
    """A prompt's conditioning through the pipeline's text encoders: `hidden` [1, 77 x chunks, width]
    and the family's other tensors (SDXL's `pooled`, from the first chunk, as A1111 takes it). At
    least `n_chunks` chunks (empty ones added), so that a prompt and its negative line up."""
    family = family_of_pipeline(pipe)
    pieces = parse_weights(prompt)
    per_tokenizer = [chunks(getattr(pipe, name), pieces) for name in family.tokenizers]
    count = max(n_chunks, *map(len, per_tokenizer))
    per_tokenizer = [c + [([], [])] * (count - len(c)) for c in per_tokenizer]
    encoded = []
    with torch.no_grad():
        for i in range(count):
            tokens = tuple(_chunk_ids(getattr(pipe, name), c[i][0]) for name, c in zip(family.tokenizers, per_tokenizer))
            cond = family.encode(pipe, tokens, clip_skip)
            # one weight per position (the first tokenizer's; CLIP tokenizers of one base split alike)
            weights = torch.tensor([1.0, *per_tokenizer[0][i][1]] + [1.0] * (76 - len(per_tokenizer[0][i][1])))
            hidden = cond["hidden"]
            if not torch.all(weights == 1):
                weighted = hidden * weights.to(hidden)[None, :, None]
                # A1111 restores the mean; a layer norm without bias (a random base) has none to restore
                mean = weighted.mean()
                hidden = weighted * (hidden.mean() / mean) if mean.abs() > 1e-4 * weighted.std() else weighted
            encoded.append(Conditioning({**cond.tensors, "hidden": hidden}))
    first = encoded[0].tensors
    return Conditioning({**first, "hidden": torch.cat([c["hidden"] for c in encoded], dim=1)})


def prompt_arguments(pipe, prompt: str, negative_prompt: str, clip_skip: int | None, rows: int) -> dict:
    """The pipeline's prompt_embeds / negative_prompt_embeds (and pooled ones) for `rows` pictures.
    An empty negative on a pipeline that zeroes it (SDXL's force_zeros_for_empty_prompt) is zeros,
    as diffusers makes it."""
    skip = clip_skip or 1
    positive = encode_prompt(pipe, prompt, skip)
    negative = encode_prompt(pipe, negative_prompt, skip, n_chunks=positive["hidden"].shape[1] // 77)
    if negative["hidden"].shape[1] > positive["hidden"].shape[1]:  # a negative longer than the prompt
        positive = encode_prompt(pipe, prompt, skip, n_chunks=negative["hidden"].shape[1] // 77)
    if not negative_prompt and getattr(pipe.config, "force_zeros_for_empty_prompt", False):
        negative = Conditioning({k: torch.zeros_like(v) for k, v in negative.tensors.items()})
    args = {}
    for key, tensor in positive.tensors.items():
        repeat = (rows,) + (1,) * (tensor.dim() - 1)
        args[PIPELINE_ARGS[key]] = tensor.repeat(*repeat)
        args["negative_" + PIPELINE_ARGS[key]] = negative[key].repeat(*repeat)
    return args
