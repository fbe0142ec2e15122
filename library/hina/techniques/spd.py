"""Selective Projection Decay (SPD): decay toward the anchor only where the step moves away from it.

Tian et al., "Rethinking Weight Decay for Robust Fine-Tuning of Foundation Models", arXiv 2411.01713
(reference code ``adamSPD.py``), per tensor, after the optimizer's candidate step p -> p_new:

    c = -<g, p - p0>                                   (with the step's gradient and the old p)
    if c < 0:
        r     = clamp((||p_new - p0|| - ||p - p0||) / ||p_new - p0||, 0, 1)
        p_new = p_new - lambda * r * (p_new - p0)

lambda (``spd_lambda``) multiplies the decay directly, without the learning rate, as in the reference.
The anchor p0 is the pretrained weight; for adapter parameters (LoRA, LoKr, DoRA) the reference passes
no anchor, i.e. p0 = 0, which is also where the adapter leaves the pretrained model unchanged, so no
anchor copy is stored for them. The reference divides by ||p_new - p0|| unguarded; it is floored here.
"""

import torch
from .. import naming
from ..stages import Flag, Stage, flag_bool, in_range


def spd_ratio(grad_dot_dev: torch.Tensor, old_dev_norm: torch.Tensor, new_dev_norm: torch.Tensor,
              spd_lambda: float) -> torch.Tensor:
    """Per-tensor factor ``lambda * r`` (0 where the condition does not hold)."""
    ratio = ((new_dev_norm - old_dev_norm) / new_dev_norm.clamp_min(1e-30)).clamp_(0.0, 1.0)
    selected = (grad_dot_dev > 0).to(ratio.dtype)      # c = -<g, p - p0> < 0
    return ratio.mul_(selected).mul_(spd_lambda)


#: Roles whose SPD anchor is zero (adapter deltas: zero is where they leave the pretrained model as it is).
ZERO_ANCHOR_ROLES = ("lora_a", "lora_b", *naming.LOKR_NAMES, *naming.NORM_ROLES)

SPD = Stage(
    "SPD",
    (flag_bool("use_spd", False, "Selective Projection Decay toward the anchor (arXiv 2411.01713)"),
     Flag("spd_lambda", 0.06, "float", "SPD's strength lambda", in_range(0.0), "a number >= 0", float)),
    # the anchor p0: a copy of the first weights, kept only for tensors whose anchor is not zero
    states=lambda group, roles: ([("spd_anchor", True)] if group["use_spd"]
                                 and any(role not in ZERO_ANCHOR_ROLES for role in roles) else []),
)
