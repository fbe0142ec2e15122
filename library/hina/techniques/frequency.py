"""Frequency-aware suppression of high-frequency gradient noise (seed document 000, "FFT analysis,
high-frequency noise suppression"; off by default until the benchmarks say otherwise).

The seed names the idea only. Here, for a gradient viewed as a matrix G (dim0, rest):

    F      = rfft2(G)
    f      = normalised radial frequency of each coefficient, in [0, 1] (1 = Nyquist on both axes)
    F      = F * (1 - strength)   where f > cutoff
    G      = irfft2(F)

``fft_cutoff`` is the fraction of the spectrum kept intact, ``fft_strength`` how much of the rest is
removed (1 = a hard low-pass). The gradient norm is then restored, so only the direction changes and
lr keeps its meaning. 1-D gradients are left alone.
"""

from __future__ import annotations

import torch
from ..stages import Flag, Stage, flag_bool, in_range

_MASKS: dict[tuple, torch.Tensor] = {}
_MAX_MASKS = 64  # bounded cache of frequency masks, keyed by (shape, cutoff, strength, device)


def _mask(rows: int, cols: int, cutoff: float, strength: float, device) -> torch.Tensor:
    key = (rows, cols, cutoff, strength, str(device))
    mask = _MASKS.get(key)
    if mask is None:
        fr = torch.fft.fftfreq(rows, device=device).abs() * 2.0
        fc = torch.fft.rfftfreq(cols, device=device) * 2.0
        radius = torch.sqrt((fr.unsqueeze(1).square() + fc.unsqueeze(0).square()) / 2.0)
        mask = torch.where(radius > cutoff, 1.0 - strength, 1.0).to(torch.float32)
        if len(_MASKS) >= _MAX_MASKS:
            _MASKS.pop(next(iter(_MASKS)))
        _MASKS[key] = mask
    return mask


def suppress_high_frequency_(grad: torch.Tensor, cutoff: float, strength: float) -> None:
    """In place on one tensor's gradient (a view shaped like the parameter)."""
    if grad.dim() < 2 or grad.numel() == 0:
        return
    g = grad.reshape(grad.shape[0], -1)
    norm = g.norm()
    spectrum = torch.fft.rfft2(g)
    spectrum.mul_(_mask(g.shape[0], g.shape[1], cutoff, strength, g.device))
    filtered = torch.fft.irfft2(spectrum, s=g.shape)
    filtered.mul_(norm / filtered.norm().clamp_min(1e-30))
    g.copy_(filtered)


FFT_SUPPRESSION = Stage("FFT suppression", (
    flag_bool("use_fft_suppression", False, "suppress high-frequency gradient components"),
    Flag("fft_cutoff", 0.5, "float", "fraction of the spectrum kept intact", in_range(0.0, 1.0),
         "0..1, fraction of the spectrum kept", float),
    Flag("fft_strength", 0.5, "float", "how much of the rest is removed", in_range(0.0, 1.0), "0..1", float),
))
