"""Cautious mask: keep only the update components whose sign agrees with the gradient.

Liang et al., "Cautious Optimizers: Improving Training with One Line of Code", arXiv 2411.16085
(reference code kyleliang919/C-Optim, the paper's form kept there as "original implementation"):

    phi = (u * g > 0)
    u   = u * phi * numel / (sum(phi) + 1)      (per tensor)

Order: Cautious runs after Grams. Grams already gives u the sign of g, so every component with g != 0
survives the mask and Cautious then only rescales by numel / (kept + 1), which is about 1.
"""

import torch

from ..pack import Segments
from ..stages import Stage, flag_bool


def cautious(update: torch.Tensor, grad: torch.Tensor, segments: Segments) -> torch.Tensor:
    mask = (update * grad > 0).to(update.dtype)
    scale = segments.numel_tensor / (segments.sum(mask) + 1.0)
    return ((update * mask).view(-1, segments.block) * segments.expand(scale)).view_as(update)


CAUTIOUS = Stage("Cautious", (flag_bool("use_cautious", False, "Cautious mask, after Grams (arXiv 2411.16085)"),))
