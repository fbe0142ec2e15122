"""SVD-based low-rank regularisation for LoRA matrices (seed document 000, "SVD decomposition encourages
low-rank structure"; off by default until the benchmarks say otherwise).

The seed names the idea only. Here it is the gradient of the penalty (lambda/2) ||W - W_k||_F^2, where
W_k is W's best rank-k approximation (Eckart–Young, by truncated SVD):

    W_k = U[:, :k] diag(S[:k]) V[:, :k]^T
    g   = g + lowrank_strength * (W - W_k)

which pulls the spectrum beyond the k-th singular value toward zero. Applied to LoRA/LoKr matrices whose
smaller dimension exceeds k (``lowrank_rank``); conv factors are viewed as (dim0, rest).
"""

from __future__ import annotations

import torch
from ..stages import Flag, Stage, flag_bool, in_range, int_at_least


def lowrank_residual(weight: torch.Tensor, rank: int) -> torch.Tensor:
    """W - W_k for a tensor viewed as (dim0, rest); returned shaped like ``weight``."""
    w = weight.reshape(weight.shape[0], -1).float()
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    approx = (u[:, :rank] * s[:rank]) @ vh[:rank]
    return (w - approx).reshape(weight.shape)


def add_lowrank_penalty_(grad: torch.Tensor, weight: torch.Tensor, rank: int, strength: float) -> None:
    if weight.dim() < 2 or min(weight.shape[0], weight[0].numel()) <= rank:
        return
    grad.add_(lowrank_residual(weight, rank), alpha=strength)


LOWRANK_PENALTY = Stage("low-rank penalty", (
    flag_bool("use_lowrank_reg", False, "SVD low-rank penalty on LoRA/LoKr matrices"),
    Flag("lowrank_rank", 4, "int", "k: the rank the penalty pulls toward", int_at_least(1), "an int >= 1", int),
    Flag("lowrank_strength", 1e-2, "float", "lambda: the penalty's weight", in_range(0.0), "a number >= 0", float),
))
