"""A textual-inversion embedding inside a text encoder: new token ids read from a small trained
[n, dim] parameter, every other id from the frozen embedding matrix, which is never written (so
every other row, and every other text-encoder weight, stays bit-identical, and weight decay
reaches nothing but the vectors)."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ..errors import RecipeError


def init_vectors(tokenizer, matrix: torch.Tensor, init_word: str, vectors: int) -> torch.Tensor:
    """[n, dim] starting values: the init word's token embeddings laid across the vectors as A1111
    does (vector i starts from token i*k//n of its k tokens)."""
    ids = tokenizer(init_word, add_special_tokens=False).input_ids
    if not ids:
        raise RecipeError(f"textual_inversion.init_word = {init_word!r} has no tokens; give a word such as 'object'.")
    k = len(ids)
    if k > vectors:
        warnings.warn(
            f"textual_inversion.init_word = {init_word!r} is {k} tokens {tokenizer.convert_ids_to_tokens(ids)} but the "
            f"embedding has {vectors} vector(s): the vectors start from tokens "
            f"{[i * k // vectors for i in range(vectors)]} only. Use a one-token init word, or vectors = {k}.",
            UserWarning, stacklevel=3)
    return torch.stack([matrix[ids[i * k // vectors]] for i in range(vectors)]).detach().float().clone()


class TriggerEmbedding(nn.Module):
    """A token embedding that reads ids first..first+n-1 from `vectors` (trained) and every other id
    from the frozen embedding (never written)."""

    def __init__(self, frozen: nn.Embedding, first_id: int, vectors: torch.Tensor):
        super().__init__()
        self.frozen = frozen
        self.first_id = first_id
        self.vectors = nn.Parameter(vectors.to(frozen.weight.device))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        offset = input_ids - self.first_id
        new = (offset >= 0) & (offset < len(self.vectors))
        old = self.frozen(input_ids.masked_fill(new, 0))
        # Always in the graph (zero gradient when no trigger is present): DDP sees every parameter used.
        rows = self.vectors.to(old.dtype)[offset.clamp(0, len(self.vectors) - 1)]
        return torch.where(new.unsqueeze(-1), rows, old)

    def matrix(self) -> torch.Tensor:
        """The embedding matrix as a model with this embedding loaded has it (diffusers' layout)."""
        return torch.cat([self.frozen.weight[:self.first_id].float(), self.vectors.detach().float()])


def install_embedding(tokenizer, text_encoder, names: list[str], start: torch.Tensor) -> TriggerEmbedding:
    """Add `names` to the tokenizer and their vectors (starting at `start`) to the text encoder."""
    tokenizer.add_tokens(names)
    ids = tokenizer.convert_tokens_to_ids(names)
    if ids != list(range(ids[0], ids[0] + len(ids))) or ids[0] != len(tokenizer) - len(ids):
        raise RuntimeError(f"the tokenizer gave the new tokens ids {ids}, not the last consecutive ones")
    embedding = TriggerEmbedding(text_encoder.get_input_embeddings(), ids[0], start)
    text_encoder.set_input_embeddings(embedding)
    return embedding
