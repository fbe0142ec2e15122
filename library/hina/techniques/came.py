"""CAME: Confidence-guided Adaptive Memory Efficient optimisation.

Luo et al., "CAME: Confidence-guided Adaptive Memory Efficient Optimization", arXiv 2307.02047,
Algorithm 1 (reference code yangluo7/CAME, pip ``came-pytorch``). For a matrix gradient G (n x m):

    V      = G^2 + eps1
    r      = b2 r + (1 - b2) mean_cols(V)            c = b2 c + (1 - b2) mean_rows(V)
    U      = G / sqrt(r c^T / mean(r))               (factored second moment, as Adafactor)
    U      = U / max(1, RMS(U) / d)                  (d = clip_threshold)
    m      = b1 m + (1 - b1) U
    Res    = (U - m)^2 + eps2                          (instability of the update: the "confidence")
    R      = b3 R + (1 - b3) mean_cols(Res)          C = b3 C + (1 - b3) mean_rows(Res)
    S      = R C^T / mean(R)
    update = m / sqrt(S)

1-D tensors keep a full second moment v (U = G / sqrt(v)) and use update = m (no confidence), as the
reference does. Weight decay is decoupled (p -= lr wd p), done by the optimizer core.

Differences from the reference, documented:

- Tensors with more than two dimensions (conv kernels) are factored as the matrix (dim0, rest), the
  layout a LoRA conv factor has; the reference factors the last two dimensions. Identical for 2-D.
- ``eps3`` (the seed's third eps, not in the paper) floors S before the square root: update =
  m / sqrt(max(S, eps3)). With eps2 = 1e-16 the paper lets an element whose update is perfectly stable be
  amplified by up to 1e8; the floor caps that at eps3^-1/2. eps3 = 0 gives the paper's update exactly.
- Confidence bias correction (``confidence_bias_correction``, on by default): S is divided by (1 - b3^t), t
  the tensor's step count (1 at its first step), as Adam corrects its EMAs:

      S_hat  = S / (1 - b3^t)            update = m / sqrt(max(S_hat, eps3))

  Neither the paper (Algorithm 1) nor the reference code corrects R and C, which start at zero: at the first
  step S holds only (1 - b3) of one residual, so with the seed's betas (0.8, 0.99, 0.999) the update is
  m / sqrt(0.001 Res) = 0.2 / sqrt(0.001 * 0.64), about 8 per element, and it stays several times 1 for the
  first ~30 steps. Measured (benchmarks/automagic_probe.py, pretrained MiniLM LoRA task ``minilm_cls``, lr 1e-3,
  500 steps, seed 0): held-out loss 0.957 without the correction (update RMS over the first 10 steps 6.05 x lr)
  vs 0.742 with it (0.42 x lr); torch AdamW8bit at the same lr: 0.734. ``confidence_bias_correction=False``
  gives the paper's update exactly (tested against came-pytorch).

The factored states are O(n + m) per tensor and live in ``optimizer.state[p]`` directly; m (and the
full v of 1-D tensors) are flat states kept by the optimizer's codec.
"""

from __future__ import annotations

import torch


def matrix_view(t: torch.Tensor) -> torch.Tensor:
    # explicit column count: reshape(rows, -1) is ambiguous for a zero-size tensor (e.g. shape (0, 4))
    cols = 1
    for n in t.shape[1:]:
        cols *= n
    return t.reshape(t.shape[0], cols)


def is_factored(shape) -> bool:
    return len(shape) >= 2


def factored_states(shape, device) -> dict[str, torch.Tensor]:
    rows, cols = shape[0], 1
    for d in shape[1:]:
        cols *= d
    z = lambda n: torch.zeros(n, dtype=torch.float32, device=device)  # noqa: E731
    return {"exp_avg_sq_row": z(rows), "exp_avg_sq_col": z(cols),
            "exp_avg_res_row": z(rows), "exp_avg_res_col": z(cols)}


def _factored_rsqrt(row: torch.Tensor, col: torch.Tensor, floor: float = 0.0) -> torch.Tensor:
    """1 / sqrt(row col^T / mean(row)) as an (n, m) tensor, optionally floored before the root."""
    approx = torch.outer(row / row.mean(), col)
    if floor > 0.0:
        approx.clamp_min_(floor)
    return approx.rsqrt_()


def normalize_(grad: torch.Tensor, out: torch.Tensor, state: dict, beta2: float, eps1: float) -> None:
    """U = G / sqrt(V_hat) for one tensor (views shaped like the parameter); updates r, c or v."""
    if is_factored(grad.shape):
        g = matrix_view(grad)
        sq = g.square().add_(eps1)
        state["exp_avg_sq_row"].mul_(beta2).add_(sq.mean(dim=1), alpha=1.0 - beta2)
        state["exp_avg_sq_col"].mul_(beta2).add_(sq.mean(dim=0), alpha=1.0 - beta2)
        torch.mul(g, _factored_rsqrt(state["exp_avg_sq_row"], state["exp_avg_sq_col"]), out=matrix_view(out))
    else:
        v = state["exp_avg_sq"]
        v.mul_(beta2).add_(grad.square().add_(eps1), alpha=1.0 - beta2)
        torch.mul(grad, v.rsqrt(), out=out)


def confidence_(exp_avg: torch.Tensor, normalized: torch.Tensor, out: torch.Tensor, state: dict, beta3: float,
                eps2: float, eps3: float, correction: float = 1.0) -> None:
    """update = m / sqrt(S * correction) for a factored tensor (``correction``: 1 / (1 - b3^t) with the bias
    correction, 1 without); m for a 1-D one (views shaped like the parameter)."""
    if not is_factored(exp_avg.shape):
        out.copy_(exp_avg)
        return
    m, u = matrix_view(exp_avg), matrix_view(normalized)
    res = (u - m).square_().add_(eps2)
    state["exp_avg_res_row"].mul_(beta3).add_(res.mean(dim=1), alpha=1.0 - beta3)
    state["exp_avg_res_col"].mul_(beta3).add_(res.mean(dim=0), alpha=1.0 - beta3)
    # the correction scales the column factor: row / mean(row) would cancel it on the row factor
    torch.mul(m, _factored_rsqrt(state["exp_avg_res_row"], state["exp_avg_res_col"] * correction, eps3),
              out=matrix_view(out))


def confidence_correction(beta3: float, step: int, enabled: bool) -> float:
    """1 / (1 - b3^t) for a tensor at its t-th step (t >= 1); 1.0 when the correction is off."""
    return 1.0 / (1.0 - beta3 ** step) if enabled else 1.0


def clip_factor(normalized: torch.Tensor, pack, clip_threshold: float) -> torch.Tensor:
    """Per tensor 1 / max(1, RMS(U) / clip_threshold)."""
    rms = (pack.dot(normalized, normalized) / pack.numel_tensor).sqrt_()
    return (rms / clip_threshold).clamp_min_(1.0).reciprocal_()
