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

The factored states are O(n + m) per tensor; m is a flat state kept by the optimizer's codec.

Over a chunk (many tensors in one flat buffer, base.py) the statistics of all tensors are one flat "side"
vector, ``SideLayout``: [r of every tensor | R of the factored ones | c of the factored ones | C of the
factored ones | one spare]. A 1-D tensor of n elements is a column (n rows of one element), so its r is its
full v. Each element finds its row and column entries by arithmetic on its position (``element_ids``), the
row and column means are two scatter-adds over the chunk, and ``normalize`` / ``confidence`` are pure
functions of flat buffers: no per-tensor Python loop, and the whole step compiles (``automagic.py``).
The per-tensor functions ``normalize_`` / ``confidence_`` below are the plain form of the same equations.
"""

from __future__ import annotations

from dataclasses import dataclass

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


# --- the chunk form ------------------------------------------------------------------------------------------
@dataclass
class SideLayout:
    """Where each tensor of a chunk keeps its statistics in the chunk's flat side vector.

    ``slot_ints``: (7, slots) int64 per tensor: offset in the flat buffer, numel, row length (cols), and the
    bases of its r, R, c and C entries; ``factored``: (slots,) float 1/0. ``used``: side entries, the
    spare (where padding and 1-D tensors' missing entries point) last.
    """

    slot_ints: torch.Tensor
    factored: torch.Tensor
    used: int
    rows: list[int]
    cols: list[int]
    row_base: list[int]
    res_base: list[int]
    col_base: list[int]
    cols_total: int


def side_layout(shapes, numels, offsets, slots: int, device) -> SideLayout:
    """The side layout of a chunk whose tensors have ``shapes`` (see ``SideLayout``)."""
    rows, cols, factored = [], [], []
    for shape, n in zip(shapes, numels):
        if n == 0:
            rows.append(0), cols.append(1), factored.append(False)
        elif is_factored(shape):
            rows.append(shape[0]), cols.append(n // shape[0]), factored.append(True)
        else:
            rows.append(n), cols.append(1), factored.append(False)
    row_base, res_base, col_base = [], [], []
    rows_total = sum(rows)
    res_total = sum(r for r, f in zip(rows, factored) if f)
    cols_total = sum(c for c, f in zip(cols, factored) if f)
    at_row, at_res, at_col = 0, rows_total, rows_total + res_total
    for r, c, f in zip(rows, cols, factored):
        row_base.append(at_row)
        res_base.append(at_res if f else 0)
        col_base.append(at_col if f else 0)
        at_row += r
        at_res += r if f else 0
        at_col += c if f else 0
    used = rows_total + res_total + 2 * cols_total + 1
    spare = slots - len(shapes)
    res_col_base = [b + cols_total if f else 0 for b, f in zip(col_base, factored)]
    ints = torch.tensor([list(offsets) + [0] * spare, list(numels) + [0] * spare, cols + [1] * spare,
                         row_base + [0] * spare, res_base + [0] * spare, col_base + [0] * spare,
                         res_col_base + [0] * spare], dtype=torch.int64, device=device)
    fact = torch.tensor([float(f) for f in factored] + [0.0] * spare, device=device)
    return SideLayout(ints, fact, used, rows, cols, row_base, res_base, col_base, cols_total)


def element_ids(segments, slot_ints: torch.Tensor, factored: torch.Tensor, spare: int):
    """Per element of the chunk (as (blocks, block)): valid (a real element, not padding), factored, and the
    side indices of its r, R, c and C entries (``spare`` where it has none)."""
    offset, numel, cols, row_base, res_base, col_base, res_col_base = slot_ints.unbind(0)
    expand = segments.expand
    total = segments.block_ids.numel() * segments.block
    pos = torch.arange(total, device=slot_ints.device).view(-1, segments.block)
    local = pos - expand(offset)
    valid = local < expand(numel)                      # padding blocks: numel 0
    fact = valid & (expand(factored) > 0)
    row = torch.div(local, expand(cols, 1), rounding_mode="floor")
    col = local - row * expand(cols, 1)
    row_id = torch.where(valid, expand(row_base) + row, spare)
    res_row_id = torch.where(fact, expand(res_base) + row, spare)
    col_id = torch.where(fact, expand(col_base) + col, spare)
    res_col_id = torch.where(fact, expand(res_col_base) + col, spare)
    return valid, fact, row_id, res_row_id, col_id, res_col_id


def _ema_means(side, ids, values, weights, beta: float):
    """side[k] <- beta side[k] + (1 - beta) mean of ``values`` scattered to k (k with a weight only)."""
    sums = torch.zeros_like(side)
    counts = torch.zeros_like(side)
    for index in ids:
        sums = sums.index_add(0, index.reshape(-1), values.reshape(-1))
        counts = counts.index_add(0, index.reshape(-1), weights.reshape(-1))
    mean = sums / counts.clamp_min(1.0)
    return torch.where(counts > 0, side * beta + mean * (1.0 - beta), side)


def normalize(g, side, ids, live, segments, beta2: float, eps1: float):
    """U = G / sqrt(V_hat) over a chunk: r, c (v for 1-D) updated from G^2 + eps1 for ``live`` elements
    ((blocks, 1) bool per tensor). Returns (U flat, new side)."""
    valid, fact, row_id, _, col_id, _ = ids
    block = segments.block
    g = g.view(-1, block)
    stepping = (valid & live).to(g.dtype)
    v = (g * g + eps1) * stepping
    side = _ema_means(side, (row_id, col_id), v, stepping, beta2)
    r = side[row_id]
    mean_r = segments.sum((r * valid).view(-1)) / segments.numel_tensor
    vhat = torch.where(fact, r / segments.expand(mean_r, 1.0) * side[col_id], r)
    u = torch.where(valid, g * vhat.rsqrt(), 0.0)
    return u.view(-1), side


def confidence(m, u, side, ids, live, segments, correction, beta3: float, eps2: float, eps3: float):
    """update = m / sqrt(max(S * correction, eps3)) for factored tensors, m for 1-D ones, over a chunk; R, C
    updated from (U - m)^2 + eps2 for ``live`` factored elements. ``correction`` (slots,): 1 / (1 - b3^t) or 1.
    Returns (update flat, new side)."""
    valid, fact, _, res_row_id, _, res_col_id = ids
    block = segments.block
    m, u = m.view(-1, block), u.view(-1, block)
    stepping = (fact & live).to(m.dtype)
    res = ((u - m).square() + eps2) * stepping
    side = _ema_means(side, (res_row_id, res_col_id), res, stepping, beta3)
    big_r = side[res_row_id]
    mean_big_r = segments.sum((big_r * fact).view(-1)) / segments.numel_tensor
    approx = big_r / segments.expand(mean_big_r, 1.0) * (side[res_col_id] * segments.expand(correction, 1.0))
    if eps3 > 0.0:
        approx = approx.clamp_min(eps3)
    update = torch.where(fact, m * approx.rsqrt(), torch.where(valid, m, 0.0))
    return update.view(-1), side
