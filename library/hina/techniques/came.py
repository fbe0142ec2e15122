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
  amplified by up to 1e8; the floor caps that at eps3^-1/2. eps3 = 0 gives the paper's update exactly. With
  ALLoRA's row coefficient c (Automagic_CameAMP, automagic.py) the update m c / sqrt(S) is computed as
  m / sqrt(max(S / c^2, eps3)): the floor caps the whole multiplier c / sqrt(S).
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
vector, ``SideLayout``: [r of every tensor | c of the factored ones | R of the factored ones | C of the
factored ones], so that each of the two EMAs (r, c with beta2; R, C with beta3) updates one contiguous slice. A 1-D
tensor of n elements is a column (n rows of one element), so its r is its full v.
The chunk orders tensors by shape (base.py), so a chunk is a few *runs* of adjacent tensors of one shape
(``ShapeRun``; a LoRA chunk has a handful): a run's data is a batched (k, rows, cols) view of the flat buffer
and its r, c, R, C are (k, rows) and (k, cols) views of the side vector, so the row and column means are
plain reductions over a dimension (no scatter, no per-element index) and the second-moment factor
r c^T / mean(r) is one batched outer product per run. ``second_moment_factor`` and ``confidence_factor``
write that factor into a flat buffer; the elementwise rest of the step (U = G / sqrt(factor), momentum,
update = m / sqrt(max(factor, eps3))) runs over the flat buffers in the optimizer's compiled chunk
functions (``automagic.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from ..stages import Flag, Stage, flag_bool, float_tuple, in_range, tuple_of


def is_factored(shape) -> bool:
    return len(shape) >= 2


def confidence_correction(beta3: float, step: int, enabled: bool) -> float:
    """1 / (1 - b3^t) for a tensor at its t-th step (t >= 1); 1.0 when the correction is off."""
    return 1.0 / (1.0 - beta3 ** step) if enabled else 1.0


# --- the chunk form ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShapeRun:
    """``count`` adjacent tensors of one shape in a chunk, from slot ``slot`` on: their flat data and their
    side entries as batched views. A tensor is the matrix (rows, cols) = (dim0, rest), a 1-D one (n, 1)."""

    slot: int
    count: int
    offset: int        # flat offset of the first tensor
    stride: int        # padded size of each tensor (all equal: one shape, one alignment)
    rows: int
    cols: int
    factored: bool
    row_base: int      # side offsets of the first tensor's r (v), R, c, C; a run's entries are contiguous
    res_base: int
    col_base: int
    res_col_base: int

    def data(self, flat: torch.Tensor) -> torch.Tensor:
        """(count, rows, cols) view of the run's tensors in a flat chunk buffer (padding excluded)."""
        per_tensor = flat.narrow(0, self.offset, self.count * self.stride).view(self.count, self.stride)
        return per_tensor.narrow(1, 0, self.rows * self.cols).view(self.count, self.rows, self.cols)

    def side(self, side: torch.Tensor, base: int, length: int) -> torch.Tensor:
        """(count, length) view of the run's entries starting at ``base`` of a side-shaped vector."""
        return side.narrow(0, base, self.count * length).view(self.count, length)


@dataclass
class SideLayout:
    """Where each tensor of a chunk keeps its statistics in the chunk's flat side vector, and its runs.

    ``used``: side entries; ``moment_entries``: how many of them (the r and c regions, at the start) belong to the
    second moment, the rest (R, C) to the confidence. ``entry_counts`` (4 n,) int64: how many entries each of the
    n tensors has in each of the four regions r, c, R, C (region-major, as the vector is laid out), so a per-tensor
    flag becomes a flag per entry with one ``repeat_interleave`` (``live_entries``), without a per-entry index kept
    in memory; ``factored`` (slots,) float 1/0;
    ``block_valid`` (blocks,) int32: real (unpadded) elements in each block of the chunk.
    """

    used: int
    moment_entries: int
    runs: list[ShapeRun]
    entry_counts: torch.Tensor
    factored: torch.Tensor
    block_valid: torch.Tensor
    rows: list[int]
    cols: list[int]
    row_base: list[int]
    res_base: list[int]
    col_base: list[int]
    res_col_base: list[int]
    _cache: dict = field(default_factory=dict)

    def data_views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """``ShapeRun.data`` of every run, cached per buffer (the pool hands out the same buffer objects)."""
        return self._cached(flat, "data", lambda: [run.data(flat) for run in self.runs])

    def side_views(self, side: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
        """Per run, its (r, c, R, C) views of a side-shaped vector (c, R, C are None for a 1-D run), cached."""
        return self._cached(side, "side", lambda: [
            (run.side(side, run.row_base, run.rows),) + ((run.side(side, run.col_base, run.cols),
                                                          run.side(side, run.res_base, run.rows),
                                                          run.side(side, run.res_col_base, run.cols))
                                                         if run.factored else (None, None, None))
            for run in self.runs])

    def _cached(self, tensor: torch.Tensor, kind: str, build):
        hit = self._cache.get((id(tensor), kind))
        if hit is not None and hit[0] is tensor:
            return hit[1]
        if len(self._cache) >= 16:  # bounded: a chunk sees a handful of long-lived buffers
            self._cache.clear()
        views = build()
        self._cache[(id(tensor), kind)] = (tensor, views)
        return views


def side_layout(pack) -> SideLayout:
    """The side layout and shape runs of a chunk (a ``FlatPack`` whose equal shapes are adjacent)."""
    shapes, numels, slots = pack.shapes, pack.numels, pack.slots
    rows, cols, factored = [], [], []
    for shape, n in zip(shapes, numels):
        if n == 0:
            rows.append(0), cols.append(1), factored.append(False)
        elif is_factored(shape):
            rows.append(shape[0]), cols.append(n // shape[0]), factored.append(True)
        else:
            rows.append(n), cols.append(1), factored.append(False)
    rows_total = sum(rows)
    res_total = sum(r for r, f in zip(rows, factored) if f)
    cols_total = sum(c for c, f in zip(cols, factored) if f)
    row_base, res_base, col_base, res_col_base = [], [], [], []
    at_row, at_col, at_res = 0, rows_total, rows_total + cols_total
    for r, c, f in zip(rows, cols, factored):
        row_base.append(at_row)
        col_base.append(at_col if f else 0)
        res_base.append(at_res if f else 0)
        res_col_base.append(at_col + cols_total + res_total if f else 0)
        at_row += r
        at_col += c if f else 0
        at_res += r if f else 0
    runs: list[ShapeRun] = []
    for i, shape in enumerate(shapes):
        if numels[i] == 0:
            continue
        last = runs[-1] if runs else None
        if (last is not None and last.slot + last.count == i and tuple(shapes[last.slot]) == tuple(shape)
                and pack.padded[i] == last.stride and pack.offsets[i] == last.offset + last.count * last.stride):
            runs[-1] = ShapeRun(last.slot, last.count + 1, *_run_tail(last))
        else:
            runs.append(ShapeRun(i, 1, pack.offsets[i], pack.padded[i], rows[i], cols[i], factored[i], row_base[i],
                                 res_base[i], col_base[i], res_col_base[i]))
    device = pack.device
    blocks = pack.total // pack.align
    valid = [0] * blocks
    for off, n in zip(pack.offsets, numels):
        for b in range(off // pack.align, off // pack.align + -(-n // pack.align)):
            valid[b] = min(pack.align, off + n - b * pack.align)
    factored_rows = [r if f else 0 for r, f in zip(rows, factored)]
    factored_cols = [c if f else 0 for c, f in zip(cols, factored)]
    counts = torch.tensor(rows + factored_cols + factored_rows + factored_cols, dtype=torch.int64, device=device)
    return SideLayout(rows_total + res_total + 2 * cols_total, rows_total + cols_total, runs, counts,
                      torch.tensor([float(f) for f in factored] + [0.0] * (slots - len(shapes)), device=device),
                      torch.tensor(valid, dtype=torch.int32, device=device),
                      rows, cols, row_base, res_base, col_base, res_col_base)


def _run_tail(run: ShapeRun) -> tuple:
    return (run.offset, run.stride, run.rows, run.cols, run.factored, run.row_base, run.res_base, run.col_base,
            run.res_col_base)


def live_entries(layout: SideLayout, live: torch.Tensor) -> torch.Tensor | None:
    """(used,) bool: whether each side entry's tensor is ``live`` ((slots,) bool). Computed once per chunk step and
    shared by both EMAs (``second_moment_factor``, ``confidence_factor``).

    None when every tensor of a CPU chunk is live (the usual step): there the device is the host, so reading the
    flags costs no synchronisation, and the EMAs update every entry without a per-entry select. (On a GPU the
    flags stay on the device.) Measured (SDXL r32, Automagic_CameAMP, 2 threads): building the per-entry flags
    and selecting with them took ~5 % of the step."""
    n = layout.entry_counts.numel() // 4
    if live.device.type == "cpu" and bool(live[:n].all()):
        return None
    return torch.repeat_interleave(live[:n].repeat(4), layout.entry_counts, output_size=layout.used)


def _ema_(side: torch.Tensor, means: torch.Tensor, entries: torch.Tensor | None, span: slice, beta: float) -> None:
    """side <- beta side + (1 - beta) means on the ``span`` of side entries, where ``entries`` (``live_entries``)
    is set (everywhere when None); in place."""
    s = side[span]
    if entries is None:
        s.mul_(beta).add_(means[span] * (1.0 - beta))  # the same roundings as the select's first branch
    else:
        torch.where(entries[span], s * beta + means[span] * (1.0 - beta), s, out=s)


def second_moment_factor(square: torch.Tensor, out: torch.Tensor, side: torch.Tensor, means: torch.Tensor,
                         layout: SideLayout, entries: torch.Tensor | None, beta2: float) -> None:
    """CAME's factored second moment over a chunk: r, c (v for a 1-D tensor) <- EMA of the row and column
    means of ``square`` = V = G^2 + eps1 for live tensors (``entries``: ``live_entries``); writes
    V_hat = r c^T / mean(r) (v) into ``out``, so that U = G / sqrt(out). ``means`` (side-sized) is scratch for the
    means."""
    for run, v, (r, c, _, _) in zip(layout.runs, layout.data_views(square), layout.side_views(means)):
        if run.factored:
            torch.mean(v, 2, out=r)
            torch.mean(v, 1, out=c)
        else:
            r.copy_(v.view(run.count, run.rows))
    _ema_(side, means, entries, slice(0, layout.moment_entries), beta2)
    for run, target, (r, c, _, _) in zip(layout.runs, layout.data_views(out), layout.side_views(side)):
        if run.factored:
            torch.mul((r / r.mean(1, keepdim=True)).unsqueeze(2), c.unsqueeze(1), out=target)
        else:
            target.copy_(r.unsqueeze(2))


def confidence_factor(res: torch.Tensor, out: torch.Tensor, side: torch.Tensor, means: torch.Tensor,
                      layout: SideLayout, entries: torch.Tensor | None, correction: torch.Tensor, beta3: float,
                      row_scales: list | None = None) -> None:
    """CAME's confidence over a chunk: R, C <- EMA of the row and column means of ``res`` = (U - m)^2 + eps2
    for live factored tensors (``entries``: ``live_entries``); writes S = R C^T / mean(R) times ``correction``
    ((slots,): 1 / (1 - b3^t), or 1) into ``out`` for factored tensors, so that update = m / sqrt(max(out, eps3)).
    ``row_scales``: per run, None or a (count, rows) factor of each row of S (ALLoRA's, automagic.py). 1-D tensors:
    untouched (their update is m)."""
    for run, rv, (_, _, big_r, big_c) in zip(layout.runs, layout.data_views(res), layout.side_views(means)):
        if run.factored:
            torch.mean(rv, 2, out=big_r)
            torch.mean(rv, 1, out=big_c)
    _ema_(side, means, entries, slice(layout.moment_entries, layout.used), beta3)
    row_scales = row_scales or [None] * len(layout.runs)
    for run, target, (_, _, big_r, big_c), row_scale in zip(layout.runs, layout.data_views(out),
                                                             layout.side_views(side), row_scales):
        if run.factored:
            big_c = big_c * correction.narrow(0, run.slot, run.count).unsqueeze(1)
            rows = big_r / big_r.mean(1, keepdim=True)
            if row_scale is not None:
                rows = rows * row_scale
            torch.mul(rows.unsqueeze(2), big_c.unsqueeze(1), out=target)


#: CAME's normalisation, clipping and confidence; its factored statistics live in the chunk's side vector, not in
#: the codec (O(rows + cols) per tensor, fp32).
CAME = Stage("CAME", (
    Flag("betas", (0.8, 0.99, 0.999), "tuple[float, float, float]", "(beta1, beta2, beta3): momentum, second "
         "moment, confidence", tuple_of(3, "betas", 0.0, 1.0), "three values 0 <= beta < 1", float_tuple,
         feature=False),
    Flag("eps", (1e-30, 1e-16, 1e-8), "tuple[float, float, float]", "(eps1, eps2, eps3): CAME's two epsilons and the "
         "confidence floor", tuple_of(3, "eps", 0.0), "three values >= 0", float_tuple, feature=False),
    Flag("clip_threshold", 1.0, "float", "CAME's update clipping d", in_range(0.0, low_open=True), "a number > 0",
         float),
    flag_bool("confidence_bias_correction", True, "divide the confidence EMA S by (1 - b3^t) (False: the paper)"),
))

#: CAME's momentum m (beta1), a flat state kept by the codec; C-Optim replaces it with the multi-scale momentum.
CAME_MOMENTUM = Stage("CAME momentum", states=lambda group, roles: [("exp_avg", True)])
