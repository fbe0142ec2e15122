"""LoRA-aware learning rates: the LoRA+ ratio for B-side matrices and ALLoRA row-norm scaling.

- LoRA+ (Hayou et al., "LoRA+: Efficient Low Rank Adaptation of Large Models", arXiv 2402.12354): the
  zero-initialised output factor B gets ``ratio`` times the learning rate of A (the paper suggests 2^4).
  For LoKr the zero-initialised factor (``lokr_w2`` or ``lokr_w2_b``, as in LyCORIS) plays B's role.
- ALLoRA (Huang et al., "ALLoRA: Adaptive Learning Rate Mitigates LoRA Fatal Flaws", arXiv 2410.09692)
  scales each row's gradient by a coefficient inversely proportional to the row's norm,
  g_row / sqrt(||w_row||^2 + 1/eta^2) = eta g_row / sqrt(1 + eta^2 ||w_row||^2). Inside an Adam-family
  step a per-row gradient scale cancels in the normalisation, so we apply the coefficient to the
  normalised update instead, with eta = 1 in the units of the weights (lr already sets the step size):
  u_row <- u_row / sqrt(1 + ||w_row||^2). Rows are the first dimension of each LoRA/LoKr matrix.
"""

import torch
from ..stages import Flag, Stage, flag_bool, in_range


def inverse_square_coefficient(rows: torch.Tensor) -> torch.Tensor:
    """1 + ||w_row||^2 of each row of ``rows`` (..., rows, cols), as (..., rows): one over the square of ALLoRA's
    coefficient, the form a step that divides by a square root of its own per-row statistic folds it into."""
    return torch.linalg.vector_norm(rows, dim=-1).square_().add_(1.0)


def coefficient(rows: torch.Tensor) -> torch.Tensor:
    """ALLoRA's coefficient 1 / sqrt(1 + ||w_row||^2) of each row of ``rows`` (..., rows, cols), as (..., rows, 1)."""
    return inverse_square_coefficient(rows).rsqrt_().unsqueeze(-1)


def row_coefficients(weight: torch.Tensor, pack, selected: list[bool], out: torch.Tensor) -> torch.Tensor:
    """ALLoRA's coefficient 1 / sqrt(1 + ||w_row||^2) per element of the flat buffer (1 where not selected),
    written to ``out``; the fused step multiplies its update by it.

    The pack orders tensors by row length (base.py), so a run of adjacent selected tensors with equal row length
    and no padding between them is one (rows, cols) matrix of the flat buffer: its row norms cost one pass,
    whatever the number of tensors."""
    out.fill_(1.0)
    for start, length, cols in _row_runs(pack, selected):
        rows = weight.narrow(0, start, length).view(-1, cols)
        out.narrow(0, start, length).view(-1, cols).copy_(coefficient(rows).expand(-1, cols))
    return out


def _row_runs(pack, selected: list[bool]) -> list[tuple[int, int, int]]:
    """(offset, length, row length) of each maximal run of selected, contiguous, same-row-length tensors."""
    key = tuple(selected)
    cached = getattr(pack, "_alora_runs", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    runs: list[list[int]] = []
    for i, chosen in enumerate(selected):
        shape, numel = pack.shapes[i], pack.numels[i]
        if not chosen or len(shape) < 2 or numel == 0:
            continue
        cols = numel // shape[0]
        start, padded = pack.offsets[i], pack.padded[i]
        last = runs[-1] if runs else None
        if last and last[2] == cols and last[0] + last[1] == start and last[3]:
            last[1] += numel
        else:
            runs.append([start, numel, cols, True])
        runs[-1][3] = padded == numel  # a padded tensor ends its run
    result = [(start, length, cols) for start, length, cols, _ in runs]
    pack._alora_runs = (key, result)
    return result


LORA_PLUS = Stage("LoRA+ / ALLoRA", (
    flag_bool("use_alora", False, "LoRA+ lr ratio for B-side tensors (arXiv 2402.12354), ALLoRA row scaling "
              "(arXiv 2410.09692), no weight decay on norm deltas / DoRA magnitudes"),
    Flag("alora_ratio", 16.0, "float", "LoRA+ ratio of the B side's lr", in_range(0.0, low_open=True), "a number > 0",
         float),
))

ALLORA_ROWS = Stage("ALLoRA", (
    flag_bool("use_alora", True, "ALLoRA row scaling of LoRA/LoKr matrices (arXiv 2410.09692)"),
))
