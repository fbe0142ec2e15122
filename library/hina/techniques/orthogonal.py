"""⊥Grad: remove the gradient component parallel to the weight, then restore the gradient norm.

Prieto et al., "Grokking at the Edge of Numerical Stability", arXiv 2501.04697 (reference code
``orthograd.py``), per tensor w, g (flattened):

    g_perp = g - (<w, g> / (<w, w> + eps)) w
    g_out  = g_perp * ||g|| / (||g_perp|| + eps),      eps = 1e-30
"""

import torch

from ..pack import Segments
from ..stages import Stage, flag_bool

EPS = 1e-30


def orthogonalize(grad: torch.Tensor, weight: torch.Tensor, segments: Segments) -> torch.Tensor:
    """``grad`` with its per-tensor component along ``weight`` removed, norm restored (chunk buffers, flat or
    ``(num_blocks, block)``; the shape is kept)."""
    block = segments.block
    projection = segments.sum(weight * grad) / (segments.sum(weight * weight) + EPS)
    g_norm = segments.sum(grad * grad).sqrt()
    perp = grad.view(-1, block) - weight.view(-1, block) * segments.expand(projection)
    perp_norm = segments.sum(perp * perp).sqrt()
    return (perp * segments.expand(g_norm / (perp_norm + EPS))).view_as(grad)


ORTHOGONAL_GRAD = Stage("⊥Grad", (flag_bool("use_orthogonal_grad", False, "⊥Grad (arXiv 2501.04697)"),))
