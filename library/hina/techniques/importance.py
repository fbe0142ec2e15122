"""Per-tensor importance for AdamW_HinaAdaptive (the seed document's "dynamic parameter importance").

The seed (doc 002) names three ingredients: gradient consistency, parameter change rate, and the
parameter's own statistics. It gives no formula; this module defines one, per tensor i of a pack:

    c_i = 1 + cos(g_t, g_{t-1})                          in [0, 2]  (successive gradients, a real cosine)
    q_i = clamp(r_i / mean_j r_j, 0, 2),  r_i = ||u_i|| / (||p_i|| + 1e-12)
                                                          (relative change rate, vs the pack's mean)
    s_i = clamp(rms(p_i) / mean_j rms(p_j), 0, 2)        (parameter scale; 1 when all are zero)
    score_i = (c_i + q_i + s_i) / 3                      in [0, 2], 1 is neutral
    I_i     = d I_i + (1 - d) score_i                    (d = importance_decay, I starts at 1)

and the learning-rate multiplier, bounded to ``MULTIPLIER_BOUNDS``:

    mult_i = clamp(1 + adaptation_strength (I_i - 1), 0.5, 2.0)

Means over j run over the tensors that have a gradient this step. adaptation_strength = 0 disables
the scaling (mult = 1). For a pair found by relationship discovery both tensors use the joint
importance sqrt(I_a I_b), so a LoRA pair's two factors move at one rate.
"""

from __future__ import annotations

import torch

from ..pack import FlatPack
from ..stages import Flag, Stage, flag_bool, in_range

MULTIPLIER_BOUNDS = (0.5, 2.0)
HIGH_IMPORTANCE = 1.2   # get_importance_analysis(): I above this counts as "high"
LOW_IMPORTANCE = 0.8    # and below this as "low"


def successive_cosine(grad: torch.Tensor, prev: torch.Tensor, pack: FlatPack) -> torch.Tensor:
    """Per-tensor cos(g_t, g_{t-1}); 0 where either is zero (no history yet)."""
    dot = pack.dot(grad, prev)
    norms = (pack.dot(grad, grad) * pack.dot(prev, prev)).sqrt_()
    return dot / norms.clamp_min_(1e-30)


def _relative(values: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    mean = (values * active).sum() / active.sum().clamp_min(1.0)
    rel = torch.where(mean > 0, values / mean.clamp_min(1e-30), torch.ones_like(values))
    return rel.clamp_(0.0, 2.0)


def importance_score(cosine: torch.Tensor, update: torch.Tensor | None, weight: torch.Tensor, pack: FlatPack,
                     active: torch.Tensor) -> torch.Tensor:
    """score_i in [0, 2] (see the module docstring). ``update`` None (no step this time): q_i = 1."""
    p_norm = pack.dot(weight, weight).sqrt_()
    if update is None:
        q = torch.ones_like(p_norm)
    else:
        q = _relative(pack.dot(update, update).sqrt_() / (p_norm + 1e-12), active)
    s = _relative(p_norm / pack.numel_tensor.sqrt(), active)
    return (1.0 + cosine + q + s) / 3.0


def importance_multiplier(importance: torch.Tensor, strength: float) -> torch.Tensor:
    low, high = MULTIPLIER_BOUNDS
    return (importance - 1.0).mul_(strength).add_(1.0).clamp_(low, high)


IMPORTANCE = Stage(
    "importance",
    (flag_bool("use_dynamic_adaptation", True, "per-tensor importance and relationship discovery"),
     Flag("adaptation_strength", 1.0, "float", "how strongly importance moves the lr (0: not at all)",
          in_range(0.0), "a number >= 0", float),
     Flag("importance_decay", 0.95, "float", "EMA decay of the importance score", in_range(0.0, 1.0, high_open=True),
          "0 <= decay < 1", float)),
    states=lambda group, roles: [("prev_grad", True)] if group["use_dynamic_adaptation"] else [],
    vectors=lambda group: ["importance"] if group["use_dynamic_adaptation"] else [],
)
