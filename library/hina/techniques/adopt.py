"""ADOPT: normalise the gradient by the *previous* second moment before it enters the momentum.

Taniguchi et al., "ADOPT: Modified Adam Can Converge with Any beta2 with the Optimal Rate",
arXiv 2411.02853 (reference code ``adopt.py``):

    step 0:  v = g^2, no parameter update
    step t:  x = clip(g / max(sqrt(v), eps), t^(1/4))
             m = b1 m + (1 - b1) x
             p = p - lr m                     (no bias correction)
             v = b2 v + (1 - b2) g^2          (after the update)
"""

import torch
from ..stages import Stage, flag_bool


def adopt_normalize(grad: torch.Tensor, exp_avg_sq: torch.Tensor, eps: float, clip: torch.Tensor,
                    block: int = 1) -> torch.Tensor:
    """x = clip(g / max(sqrt(v), eps), c) over a chunk's buffers (flat or ``(num_blocks, block)``, kept), with
    c = t^(1/4) (t: completed steps).

    ``clip`` is a 0-d tensor, or a per-block column (``(num_blocks, 1)``, blocks of ``block`` elements)
    when the tensors of a pack are at different steps.
    """
    x = (grad / exp_avg_sq.sqrt().clamp_min(eps)).view(-1, block)
    return torch.maximum(torch.minimum(x, clip), -clip).view_as(grad)


ADOPT = Stage("ADOPT", (flag_bool("use_adopt_stability", False, "ADOPT moment rule in place of Adam's "
                                  "(arXiv 2411.02853)"),))
