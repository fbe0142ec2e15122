"""Multi-scale momentum (seed document 004, "multi-scale momentum system").

One exponential moving average per time scale s in ``momentum_scales``; the shortest, s = 1, is the
optimizer's ordinary momentum with beta1, and a longer scale s stretches its time constant s times:

    beta_s = 1 - (1 - beta1) / s            (time constant 1/(1 - beta_s) = s / (1 - beta1) steps)
    m_s    = beta_s m_s + (1 - beta_s) x
    M      = sum_s w_s m_s,   w_s = (1/s) / sum_k (1/k)

so the weights favour short scales (seed: "short-term momentum has higher weight"). The seed gives
neither the per-scale coefficients nor the weights; these are the simplest choice that has both
properties and reduces to the plain momentum for ``momentum_scales=[1]``.
"""

from __future__ import annotations

from ..stages import Flag, Stage


def scale_betas(beta1: float, scales) -> list[float]:
    return [1.0 - (1.0 - beta1) / float(s) for s in scales]


def scale_weights(scales) -> list[float]:
    inv = [1.0 / float(s) for s in scales]
    total = sum(inv)
    return [w / total for w in inv]


def state_name(scale) -> str:
    """Flat-state name of a scale's buffer; scale 1 is the ordinary momentum ``exp_avg``."""
    return "exp_avg" if float(scale) == 1.0 else f"exp_avg_s{scale}"


def _valid_scales(scales) -> bool:
    numbers = isinstance(scales, (list, tuple)) and all(isinstance(s, (int, float)) for s in scales)
    return numbers and len(scales) > 0 and all(float(s) >= 1 for s in scales) and len(set(scales)) == len(scales)


MULTISCALE_MOMENTUM = Stage(
    "multi-scale momentum",
    (Flag("momentum_scales", (1, 5, 10, 25), "tuple", "time scales of the momentum EMAs (1: the plain momentum)",
          _valid_scales, "distinct numbers >= 1, e.g. [1, 5, 10, 25]",
          lambda scales: [int(s) if float(s).is_integer() else float(s) for s in scales]),),
    states=lambda group, roles: [(state_name(s), True) for s in group["momentum_scales"]],
)
