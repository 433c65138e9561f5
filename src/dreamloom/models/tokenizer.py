"""A CLIP BPE tokenizer built in code, so that no base ever needs a tokenizer download.

It follows CLIP's construction exactly (byte-level alphabet, `</w>` word ends, merges ranked in
order, start/end tokens last) over a small English caption vocabulary. Words outside it are
spelled in pieces, which is what a rare trigger word like "sks" should be anyway.
"""

from __future__ import annotations

from functools import lru_cache

from transformers import CLIPTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"

# Whole-word tokens: words common in captions and prompts, and class words users pick.
CAPTION_WORDS = """
a an the of in on at with and or by for from to is are this that photo photograph picture
image painting drawing illustration render art style portrait close up closeup shot view
dog cat person man woman boy girl child face toy car house tree flower bird horse cup
bottle shoe bag hat shirt chair table room street city forest beach mountain sky water
red green blue yellow white black orange purple pink brown gray grey gold silver
small large big little old new young happy sad cute beautiful detailed high quality
best good bad low blurry sharp bright dark light background foreground sitting standing
running lying wearing holding looking front side back top bottom left right center
circle square triangle star cross heart diamond shape object product character logo
one two three four five six seven eight nine ten
""".split()


def _bytes_to_unicode() -> list[str]:
    """CLIP's reversible byte -> printable character table, in CLIP's order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def _apply_merges(pieces: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE on one word: merge the best-ranked pair everywhere, until none applies."""
    while len(pieces) > 1:
        pairs = {(a, b) for a, b in zip(pieces, pieces[1:]) if (a, b) in ranks}
        if not pairs:
            break
        best = min(pairs, key=ranks.__getitem__)
        merged, i = [], 0
        while i < len(pieces):
            if i + 1 < len(pieces) and (pieces[i], pieces[i + 1]) == best:
                merged.append(pieces[i] + pieces[i + 1])
                i += 2
            else:
                merged.append(pieces[i])
                i += 1
        pieces = merged
    return pieces


@lru_cache(maxsize=1)
def _vocab_and_merges() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    alphabet = _bytes_to_unicode()
    tokens = alphabet + [c + "</w>" for c in alphabet]
    ranks: dict[tuple[str, str], int] = {}
    for word in dict.fromkeys(CAPTION_WORDS):
        # Continue from what the merges so far make of the word, so that every listed word
        # ends as one token under the full merge table (later merges rank lower).
        pieces = _apply_merges(list(word[:-1]) + [word[-1] + "</w>"], ranks)
        while len(pieces) > 1:
            ranks[(pieces[0], pieces[1])] = len(ranks)
            tokens.append(pieces[0] + pieces[1])
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
    tokens += [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    return vocab, tuple(ranks)


def build_tokenizer(model_max_length: int = 77) -> CLIPTokenizer:
    """The built-in tokenizer; identical on every machine (ids depend only on this file)."""
    vocab, merges = _vocab_and_merges()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=model_max_length)


def builtin_vocab_size() -> int:
    return len(_vocab_and_merges()[0])
