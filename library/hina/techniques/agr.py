"""Adaptive Gradient Regularization (AGR).

Jiang et al., "Adaptive Gradient Regularization: A Faster and Generalizable Optimization Technique for
Deep Neural Networks", arXiv 2407.16944 (reference code ``AGR.py``), per tensor:

    alpha = |g| / sum(|g|)          (sum over the whole tensor)
    g     = g * (1 - alpha)

The reference divides by the sum with no guard; an all-zero gradient gives 0/0 there, so the sum is
floored at the smallest normal float here (the result is the same zero gradient). alpha is a true
division, not |g| times a reciprocal: for a one-element tensor |g| / |g| is exactly 1, so the result is
exactly 0 as the equation says (a reciprocal leaves a 1-ulp residue that Adam's normalisation would blow
up into a step of several percent of lr).
"""

import torch

from ..pack import Segments
from ..stages import Stage, flag_bool


def agr(grad: torch.Tensor, segments: Segments) -> torch.Tensor:
    """g * (1 - |g| / sum|g|) per tensor, over a chunk buffer (flat or ``(num_blocks, block)``, kept)."""
    magnitude = grad.abs()
    total = segments.sum(magnitude).clamp_min(torch.finfo(torch.float32).tiny)
    alpha = magnitude.view(-1, segments.block) / segments.expand(total, fill=1.0)
    return (grad.view(-1, segments.block) * (1.0 - alpha)).view_as(grad)


AGR = Stage("AGR", (flag_bool("use_agr", False, "Adaptive Gradient Regularization (arXiv 2407.16944)"),))
