"""Contextual learning-rate multiplier and edge-case detection (the seed's "C-Optim" module, doc 004).

The seed document attributes this to "C-Optim, arXiv 2411.16085", but that paper is the Cautious
optimizer (see ``cautious.py``); the contextual module is the seed's own design, and the seed gives no
formulas. This module defines them. The context is updated on every ``step()`` from what the optimizer
sees (kohya never passes a closure); a loss is used when the trainer reports one (``observe_loss`` or a
closure).

Gradient direction. Each step's (raw) gradient, all groups together, is reduced to a sketch by a fixed
random projection: the flat gradient of a pack is cut into chunks of L elements and each chunk is
projected onto a fixed random +-1 vector (a count sketch with contiguous buckets, seed ``SKETCH_SEED``,
the same on every rank). Sketch inner products are unbiased estimates of gradient inner products, and
identical (opposite) gradients give identical (opposite) sketches.

After each step t, with window W = ``context_window`` (ring buffers, so memory is bounded):

    consistency_t = cos(sketch_t, sketch_{t-1})                (a real cosine; 0 on the first step)
    c_mean        = mean of the last W consistencies
    trend         = (mean recent half - mean older half) / |mean older half|   of the last W losses
                    (0 while fewer than 4 losses were reported)
    edge_t        = consistency_t < -edge_threshold                         (direction reversal)
                    or ||g_t|| > ||g||_mean / (1 - edge_threshold)           (gradient-norm spike)
                    or trend > 1 - edge_threshold                            (loss rising)
    target        = 0.5 if edge_t else clamp((1 + c_mean / 2) (1 - clamp(trend, -1/2, 1/2)), 0.5, 1.5)
    multiplier   <- multiplier + adaptation_rate (target - multiplier)        (starts at 1)

so the multiplier always lies in ``MULTIPLIER_BOUNDS`` = [0.5, 1.5]: consistent directions and a falling
loss raise the lr up to 1.5x, oscillation, spikes and a rising loss lower it to 0.5x. Step t + 1 uses the
multiplier computed after step t. All context is tensors (no host synchronisation on the step) kept in
``optimizer.state`` of the optimizer's first parameter, so ``state_dict()`` carries it.
"""

from __future__ import annotations

import logging
import math

import torch
from ..stages import Flag, Stage, flag_bool, in_range, int_at_least

SKETCH_SEED = 20241125
SKETCH_MIN_BUCKETS = 64     # at least this many buckets per pack (when it has that many elements)
SKETCH_MAX_CHUNK = 65536    # at most this many elements per bucket
MULTIPLIER_BOUNDS = (0.5, 1.5)

logger = logging.getLogger(__name__)

_SIGNS: dict[tuple[int, str], torch.Tensor] = {}


def chunk_length(total: int) -> int:
    return max(1, min(SKETCH_MAX_CHUNK, math.ceil(total / SKETCH_MIN_BUCKETS)))


def sketch_length(total: int) -> int:
    return math.ceil(total / chunk_length(total))


def _signs(length: int, device) -> torch.Tensor:
    key = (length, str(device))
    signs = _SIGNS.get(key)
    if signs is None:
        gen = torch.Generator().manual_seed(SKETCH_SEED)
        signs = (torch.randint(0, 2, (length,), generator=gen).float() * 2.0 - 1.0).to(device)
        if len(_SIGNS) >= 32:  # bounded cache
            _SIGNS.pop(next(iter(_SIGNS)))
        _SIGNS[key] = signs
    return signs


def sketch_signs(total: int, device) -> torch.Tensor:
    """The fixed +-1 vector ``sketch`` uses for a buffer of ``total`` elements."""
    return _signs(chunk_length(total), device)


def sketch(flat: torch.Tensor, signs: torch.Tensor | None = None) -> torch.Tensor:
    """Fixed random projection of a flat fp32 buffer to ``sketch_length(flat.numel())`` values.

    ``signs``: ``sketch_signs(flat.numel(), device)``, passed in where the caller is compiled. A chunk buffer viewed
    ``(blocks, block)`` (``Segments.blocks``) whose buckets are whole blocks is summed block row by block row: over
    the flat view, compiled CPU code looked up each lane's block one by one (Automagic_CameAMP_COptim's first stage
    took 3x the plain one's time, SD1.5 r16)."""
    n = flat.numel()
    length = chunk_length(n)
    if signs is None:
        signs = _signs(length, flat.device)
    if flat.dim() == 2 and n % length == 0 and length % flat.shape[1] == 0:
        block = flat.shape[1]
        return (flat.view(n // length, length // block, block) * signs.view(length // block, block)).sum(dim=(1, 2))
    flat = flat.reshape(-1)
    full = n // length
    parts = []
    if full:
        parts.append((flat[:full * length].view(full, length) * signs).sum(dim=1))
    rest = n - full * length
    if rest:
        parts.append((flat[full * length:] * signs[:rest]).sum().reshape(1))
    return torch.cat(parts)


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.dot(a, b) / (a.norm() * b.norm()).clamp_min(1e-30)


class ContextualModule:
    """``optimizer.c_optim``: the context's state lives in ``optimizer.state``; this object reads it."""

    def __init__(self, optimizer, context_window: int, edge_threshold: float, adaptation_rate: float,
                 verbose: bool = False):
        self.optimizer = optimizer
        self.context_window = int(context_window)
        self.edge_threshold = float(edge_threshold)
        self.adaptation_rate = float(adaptation_rate)
        self.verbose = bool(verbose)

    # --- storage -----------------------------------------------------------------------------------------
    @property
    def state(self) -> dict:
        anchor = self.optimizer.param_groups[0]["params"][0]
        state = self.optimizer.state[anchor]
        if "context_count" not in state:
            device, w = anchor.device, self.context_window
            state.update({
                "context_prev_sketch": torch.zeros(0, device=device),
                "context_consistency": torch.zeros(w, device=device),
                "context_grad_norm": torch.zeros(w, device=device),
                "context_loss": torch.full((w,), float("nan"), device=device),
                "context_multiplier": torch.ones((), device=device),
                "context_edge": torch.zeros((), dtype=torch.bool, device=device),
                "context_count": 0,
            })
        return state

    def multiplier_tensor(self) -> torch.Tensor:
        return self.state["context_multiplier"]

    # --- the per-step update -------------------------------------------------------------------------------
    def update(self, current_sketch: torch.Tensor, grad_norm: torch.Tensor, loss: torch.Tensor | None) -> None:
        s = self.state
        w, count = self.context_window, s["context_count"]
        prev = s["context_prev_sketch"]
        if prev.shape == current_sketch.shape:
            consistency = cosine(current_sketch, prev)
        else:  # first step, or the parameter layout changed: no comparable history
            consistency = torch.zeros((), device=current_sketch.device)
        s["context_prev_sketch"] = current_sketch.detach().clone()
        slot = count % w
        previous_norms = self._chronological(s["context_grad_norm"], count)
        s["context_consistency"][slot] = consistency
        s["context_grad_norm"][slot] = grad_norm
        s["context_loss"][slot] = (loss.detach().to(s["context_loss"]) if loss is not None else float("nan"))
        count += 1
        s["context_count"] = count

        c_mean = self._chronological(s["context_consistency"], count).mean()
        trend = self._loss_trend(count)
        edge = consistency < -self.edge_threshold
        if previous_norms.numel() >= 2:
            edge = edge | (grad_norm > previous_norms.mean() / (1.0 - self.edge_threshold))
        edge = edge | (trend > 1.0 - self.edge_threshold)
        low, high = MULTIPLIER_BOUNDS
        target = ((1.0 + 0.5 * c_mean) * (1.0 - trend.clamp(-0.5, 0.5))).clamp(low, high)
        target = torch.where(edge, torch.full_like(target, low), target)
        s["context_multiplier"].add_(target.sub(s["context_multiplier"]).mul_(self.adaptation_rate)).clamp_(low, high)
        s["context_edge"].copy_(edge)
        if self.verbose and bool(edge):
            logger.info("C-Optim: edge case at context step %d (consistency %.3f, multiplier %.3f)", count,
                        float(consistency), float(s["context_multiplier"]))

    @staticmethod
    def _chronological(ring: torch.Tensor, count: int) -> torch.Tensor:
        w = ring.numel()
        if count <= w:
            return ring[:count]
        return torch.roll(ring, -(count % w))

    def _loss_trend(self, count: int) -> torch.Tensor:
        losses = self._chronological(self.state["context_loss"], count)
        device = losses.device
        half = losses.numel() // 2
        if half < 2:
            return torch.zeros((), device=device)
        older, recent = losses[:half].nanmean(), losses[half:].nanmean()
        trend = (recent - older) / older.abs().clamp_min(1e-12)
        return torch.nan_to_num(trend, nan=0.0, posinf=0.0, neginf=0.0)

    # --- the seed's API ------------------------------------------------------------------------------------
    def detect_edge_case(self) -> bool:
        """Whether the last step was an edge case (direction reversal, gradient spike, rising loss)."""
        return bool(self.state["context_edge"])

    def compute_contextual_lr_multiplier(self) -> float:
        """The multiplier the next step applies to every learning rate, in [0.5, 1.5]."""
        return float(self.state["context_multiplier"])

    def compute_gradient_consistency(self) -> float:
        """cos(g_t, g_{t-1}) of the last step's gradient directions (sketched), in [-1, 1]; 0 before 2 steps."""
        s = self.state
        if s["context_count"] == 0:
            return 0.0
        return float(s["context_consistency"][(s["context_count"] - 1) % self.context_window])

    def summary(self) -> dict:
        s = self.state
        return {"steps": s["context_count"], "gradient_consistency": self.compute_gradient_consistency(),
                "lr_multiplier": self.compute_contextual_lr_multiplier(), "edge_case": self.detect_edge_case(),
                "context_window": self.context_window}


#: Optimizer-wide settings of ``optimizer.c_optim`` (not per param group).
CONTEXT = Stage("C-Optim context", (
    Flag("context_window", 100, "int", "steps of history the context keeps", int_at_least(2), "an int >= 2", int,
         group=False, feature=False),
    Flag("edge_threshold", 0.95, "float", "gradient-consistency level that marks an edge of stability",
         in_range(0.0, 1.0, low_open=True, high_open=True), "0 < t < 1", float, group=False, feature=False),
    Flag("adaptation_rate", 0.1, "float", "how fast the contextual multiplier moves",
         in_range(0.0, 1.0, low_open=True), "0 < rate <= 1", float, group=False, feature=False),
    flag_bool("verbose", False, "print the context's decisions", group=False, feature=False),
))
