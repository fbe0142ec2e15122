"""Torque-Aware Momentum (TAM): damp gradients that are misaligned with the momentum.

Malviya et al., "Torque-Aware Momentum", arXiv 2412.18790:

    s_t  = cos(m_{t-1}, g_t)                    (per tensor)
    ŝ_t  = gamma ŝ_{t-1} + (1 - gamma) s_t       (gamma = tam_beta)
    d_t  = (1 + ŝ_t) / 2                          (in [0, 1])
    m_t  = beta m_{t-1} + (eps + d_t) g_t

The paper's SGD form adds the damped gradient without a (1 - beta) factor. Inside an Adam-family step we
keep Adam's (1 - beta1) so that ``lr`` means what it means in AdamW: this module returns the damping
factor ``eps + d_t`` per tensor, and the moment rule multiplies its input by it.
"""

import torch

from ..pack import Segments
from ..stages import Flag, Stage, flag_bool, in_range

EPS = 1e-8


def tam_step(exp_avg: torch.Tensor, grad: torch.Tensor, smoothed: torch.Tensor, tam_beta: float,
             segments: Segments) -> tuple[torch.Tensor, torch.Tensor]:
    """(eps + d, new ŝ) per tensor, functionally: ŝ = tam_beta ŝ + (1 - tam_beta) cos(m, g), d = (1 + ŝ) / 2."""
    m_dot_g = segments.sum(exp_avg * grad)
    m_norm = segments.sum(exp_avg * exp_avg).sqrt()
    g_norm = segments.sum(grad * grad).sqrt()
    cosine = m_dot_g / (m_norm * g_norm).clamp_min(1e-30)
    smoothed = smoothed * tam_beta + cosine * (1.0 - tam_beta)
    return (smoothed + 1.0) * 0.5 + EPS, smoothed


TAM = Stage(
    "TAM",
    (flag_bool("use_tam", False, "Torque-Aware Momentum: damp the moment input (arXiv 2412.18790)"),
     Flag("tam_beta", 0.999, "float", "EMA decay of TAM's smoothed cosine", in_range(0.0, 1.0, high_open=True),
          "0 <= tam_beta < 1", float)),
    vectors=lambda group: ["tam_smoothed"] if group["use_tam"] else [],
)
