"""A layer's weight difference as a kohya LoRA pair by SVD, at a fixed rank or at the smallest rank
that keeps a share of the squared singular values (the "energy")."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Pair:
    down: torch.Tensor  # [r, in] or conv [r, in, kh, kw]
    up: torch.Tensor    # [out, r] or conv [out, r, 1, 1]
    rank: int
    error: float        # |dW - up @ down| / |dW| (Frobenius), before any alpha scaling


def rank_for_energy(singular: torch.Tensor, energy: float) -> int:
    """Smallest r whose first r squared singular values hold `energy` of their sum."""
    squares = singular.double() ** 2
    share = torch.cumsum(squares, 0) / squares.sum().clamp_min(1e-300)
    return int(torch.searchsorted(share, torch.tensor(energy - 1e-12, dtype=share.dtype)).item()) + 1


def factor(delta: torch.Tensor, rank: int | None = None, energy: float | None = None) -> Pair:
    """up @ down ~ delta (conv kernels flattened into the input side, as LoCon stores them)."""
    matrix = delta.detach().float().reshape(delta.shape[0], -1)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    r = rank_for_energy(s, energy) if energy is not None else rank
    r = max(1, min(r, s.numel()))
    # split the singular values evenly between the factors, so both stay in a sane range for fp16
    root = s[:r].sqrt()
    up, down = u[:, :r] * root, root[:, None] * vh[:r]
    approx = up @ down
    norm = matrix.norm()
    error = float((matrix - approx).norm() / norm) if norm > 0 else 0.0
    if delta.dim() == 4:
        down = down.reshape(r, *delta.shape[1:])
        up = up.reshape(delta.shape[0], r, 1, 1)
    return Pair(down.contiguous(), up.contiguous(), r, error)


def product(down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """up @ down in the layer's weight shape (the inverse of `factor`)."""
    flat = up.float().reshape(up.shape[0], -1) @ down.float().reshape(down.shape[0], -1)
    return flat.reshape(up.shape[0], *down.shape[1:]) if down.dim() == 4 else flat
