"""Dynamic weight decay schedule (from the HinaAdamW seed document, "動態權重衰減").

    ratio(t) = 1                                          for t <= T
    ratio(t) = max(wd_min_ratio, wd_decay_factor ** ((t - T) / T))   for t > T

with T = ``wd_transition_steps``. With the seed defaults (T=1000, factor 0.7, min 0.1) this gives
1500 -> 0.837, 2000 -> 0.70, 3000 -> 0.49, as the seed's table says. The seed's last row, "5000+: 10%",
does not follow from its own formula: 0.7 ** 4 = 0.24 at step 5000, and the floor of 0.1 is reached only
after t = T * (1 + log(0.1) / log(0.7)) ~ 7456 steps. We implement the formula, not that row.
Decay is decoupled, as in AdamW (Loshchilov & Hutter, arXiv 1711.05101): p <- p * (1 - lr * wd * ratio).
"""

import math
from ..stages import Flag, Stage, flag_bool, in_range, int_at_least


def weight_decay_ratio(step: int, transition_steps: int, decay_factor: float, min_ratio: float) -> float:
    if step <= transition_steps:
        return 1.0
    return max(min_ratio, decay_factor ** ((step - transition_steps) / transition_steps))


def floor_reached_at(transition_steps: int, decay_factor: float, min_ratio: float) -> float:
    """The step from which the ratio sits at ``min_ratio`` (for docs and tests)."""
    return transition_steps * (1.0 + math.log(min_ratio) / math.log(decay_factor))


DECOUPLED_WEIGHT_DECAY = Stage("decoupled weight decay", (
    Flag("weight_decay", 1e-2, "float", "decoupled weight decay, p <- p (1 - lr wd) (arXiv 1711.05101)",
         in_range(0.0), "a number >= 0", feature=False),
))

WEIGHT_DECAY_SCHEDULE = Stage("dynamic weight decay", (
    flag_bool("dynamic_weight_decay", True, "weight decay on the schedule above"),
    Flag("wd_transition_steps", 1000, "int", "T: steps at full weight decay", int_at_least(1), "an int >= 1", int),
    Flag("wd_decay_factor", 0.7, "float", "the ratio's decay per T steps after T", in_range(0.0, 1.0, low_open=True),
         "0 < factor <= 1", float),
    Flag("wd_min_ratio", 0.1, "float", "floor of the ratio", in_range(0.0, 1.0), "0 <= ratio <= 1", float),
))
