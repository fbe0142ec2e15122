"""Automagic learning-rate mask: a per-element learning rate bumped up where the update keeps its sign.

Source: ostris ai-toolkit, ``toolkit/optimizers/automagic.py`` (the "Automagic" optimizer), per element:

    polarity = (u > 0)                                  (u: this step's normalised update)
    agree    = (polarity == last_polarity)
    lr_mask  = clamp(where(agree, lr_mask + lr_bump, lr_mask - lr_bump), min_lr, max_lr)
    p        = p - lr_mask * u

Differences from the reference (deliberate, DESIGN.md "lr_mask tied to the constructor lr"):

- The mask is stored *relative* to the group's base learning rate lr0 (``group['lr_mask_base_lr']``: the
  group's ``initial_lr`` when a scheduler set one, else its lr at construction): ratio = lr_mask / lr0,
  bumped by ``lr_bump / lr0`` within ``[min_lr / lr0, max_lr / lr0]``. The effective per-element lr is
  ``group['lr'] * ratio``, so a scheduler that halves ``group['lr']`` halves every element's lr; with a
  constant lr this is exactly the reference's mask in ``[min_lr, max_lr]``.
- The last polarity is stored as the *sign* of the stored ratio (the ratio is always >= min_lr/lr0 > 0),
  so it costs no extra state and quantises with the mask in 8-bit mode.
- ``max_lr=None`` (AdamW_HinaAdaptive's default) bounds the ratio at ``DEFAULT_MAX_RATIO`` (10x the base lr)
  instead of an absolute value: with an absolute bound below the base lr the mask would cap every element's
  lr at max_lr, so a higher lr would silently have no effect (measured: lr 3e-3 trained exactly like 1e-3 with
  max_lr=1e-3). An absolute max_lr below the base lr still works as asked, with a warning.
- Warmup (``warmup_steps``): while the group's step count is <= warmup_steps the mask is frozen (no bump;
  the scheduler's warmup drives the lr) and only the polarity is tracked. The reference instead adapts
  the mask from the first step.
"""

from __future__ import annotations

import warnings

import torch
from ..stages import Flag, Stage, flag_bool, in_range, int_at_least

DEFAULT_MAX_RATIO = 10.0  # max_lr=None: the mask may raise an element's lr up to 10x the group's base lr


def base_lr(group: dict) -> float:
    """The group's base lr lr0 (set at the mask's first step, with a warning when it is at or above max_lr: the mask
    then starts at its ceiling and can only lower lrs; Automagic_CameAMP at lr = max_lr = 1e-3 trailed AdamW8bit by
    5-7 % at 1,500 steps on the three tiny tasks; with max_lr = 1e-2 and lr 3e-3 it was 2.8-7.1 % better, within
    2.4 % of AdamW8bit, 5 seeds, docs/convergence_long_max_lr.json)."""
    if "lr_mask_base_lr" not in group:
        base = group["lr_mask_base_lr"] = float(group.get("initial_lr", group["lr"]))
        if group["max_lr"] is not None and base >= group["max_lr"]:
            warnings.warn(f"lr={base:g} is at or above max_lr={group['max_lr']:g}: the lr mask caps every element's lr "
                          "at max_lr, so it can only lower lrs and an lr beyond it has no effect; raise max_lr (10x the "
                          f"lr is typical; max_lr=None gives {DEFAULT_MAX_RATIO:g}x the lr) or set use_lr_mask=False",
                          stacklevel=5)
    base = group["lr_mask_base_lr"]
    if not base > 0.0:
        raise ValueError(f"lr_mask needs a positive base learning rate, the group has lr={base!r}; "
                         "set lr > 0 or use_lr_mask=False")
    return base


def step_constants(group: dict) -> tuple[float, float, float, float, float]:
    """(adapt, bump, min ratio, max ratio, start ratio) of this step, host floats: adapt is 1.0 once the
    group's step count is past ``warmup_steps``; a tensor's first step starts its ratio at 1, within bounds."""
    base = base_lr(group)
    min_ratio, max_ratio = bounds(group, base)
    adapt = float(group.get("global_step", 0) > group["warmup_steps"])
    return adapt, group["lr_bump"] / base, min_ratio, max_ratio, min(max(1.0, min_ratio), max_ratio)


def mask_step(signed_mask: torch.Tensor, direction: torch.Tensor, first: torch.Tensor, adapt: torch.Tensor,
              bump: torch.Tensor, min_ratio: torch.Tensor, max_ratio: torch.Tensor, start: torch.Tensor):
    """One step of the signed mask over a flat buffer (the module docstring's rule; a tensor's first step starts its
    ratio at ``start`` with the direction's polarity): every argument after ``direction`` broadcasts against it
    (per-block columns or 0-d). Returns (ratio, new mask)."""
    polarity = direction > 0
    ratio = signed_mask.abs()
    bumped = torch.where(polarity == (signed_mask > 0), ratio + bump, ratio - bump)
    ratio = torch.where(adapt > 0, torch.minimum(torch.maximum(bumped, min_ratio), max_ratio), ratio)
    ratio = torch.where(first > 0, start, ratio)
    return ratio, torch.where(polarity, ratio, -ratio)


def bounds(group: dict, base: float) -> tuple[float, float]:
    """(min, max) of the lr ratio: the absolute min_lr/max_lr over the base lr; max_lr=None -> DEFAULT_MAX_RATIO."""
    max_ratio = DEFAULT_MAX_RATIO if group["max_lr"] is None else group["max_lr"] / base
    return group["min_lr"] / base, max_ratio


def _check_bounds(settings: dict) -> None:
    """min_lr <= max_lr, and a positive lr for the mask to be relative to."""
    min_lr, max_lr = settings["min_lr"], settings["max_lr"]
    if max_lr is not None and not min_lr <= max_lr:
        raise ValueError(f"Invalid min_lr/max_lr: {min_lr!r}/{max_lr!r} (need 0 < min_lr <= max_lr, or max_lr=None "
                         f"for {DEFAULT_MAX_RATIO:g}x the base lr)")
    if settings["use_lr_mask"] and not settings["lr"] > 0.0:
        raise ValueError(f"Invalid learning rate: {settings['lr']!r} (the lr mask is relative to lr, which must be "
                         "> 0; or use_lr_mask=False)")


LR_MASK = Stage(
    "Automagic lr mask",
    (flag_bool("use_lr_mask", True, "per-element lr mask, relative to the group lr"),
     Flag("lr_bump", 3e-6, "float", "the mask's step per agreeing sign (absolute at the base lr)", in_range(0.0),
          "a number >= 0", float),
     Flag("min_lr", 1e-7, "float", "the mask's floor (absolute at the base lr)", in_range(0.0, low_open=True),
          "a number > 0", float),
     Flag("max_lr", None, "float | None", f"the mask's ceiling (absolute at the base lr; None: {DEFAULT_MAX_RATIO:g}x "
          "the base lr)", lambda v: v is None or in_range(0.0, low_open=True)(v), "a number > 0, or None", float),
     Flag("warmup_steps", 500, "int", "steps during which the mask is frozen (polarity tracked)", int_at_least(0),
          "an int >= 0", int)),
    states=lambda group, roles: [("lr_mask", True)] if group["use_lr_mask"] else [],  # |value|: ratio, sign: polarity
    check=_check_bounds,
)
