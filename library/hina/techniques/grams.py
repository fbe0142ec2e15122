"""Grams: take the update's magnitude from Adam and its direction from the current gradient.

Cao et al., "Grams: Gradient Descent with Adaptive Momentum Scaling", arXiv 2412.17107 (reference code
``grams.py``):  u = |u_adam| * sign(g). Where g == 0, sign(g) == 0 and there is no update.
"""

import torch
from ..stages import Stage, flag_bool


def grams(update: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    return update.abs() * torch.sign(grad)


GRAMS = Stage("Grams", (flag_bool("use_grams", False, "Grams update direction: |u| sign(g) (arXiv 2412.17107)"),))
