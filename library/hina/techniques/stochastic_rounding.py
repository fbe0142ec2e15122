"""Stochastic rounding to bfloat16 and compensated (shift-buffer) accumulation for bf16 weights.

- Stochastic rounding (Gupta et al., "Deep Learning with Limited Numerical Precision", arXiv 1502.02551,
  eq. 2): round x to one of its two neighbouring bf16 values with probability proportional to proximity,
  so E[round(x)] = x. A bf16 number is the top 16 bits of a float32; adding a uniform random integer in
  [0, 2^16) to the float32's bit pattern and truncating the low 16 bits does exactly this (the sign bit
  is untouched, so negative values round symmetrically).
- Compensated accumulation (Kahan summation, as in arogozhnikov/adamw_bfloat16's "shift" buffer and the
  optimi library's Kahan mode): the part of an update that the bf16 weight cannot represent is kept in a
  bf16 compensation buffer and added back on the next write:

      target = p + shift + delta          (in float32)
      p      = round_to_nearest_bf16(target)
      shift  = stochastic_round_bf16(target - p)

  so many updates smaller than half a bf16 ulp of p still add up, and delta = 0 leaves p as it is.

Random numbers come from a ``torch.Generator`` seeded from (seed, step, stream), so a run is reproducible,
every distributed rank draws the same numbers, and a resumed run continues to the bit.
"""

from __future__ import annotations

import torch

_LOW_MASK = -65536  # 0xFFFF0000 as int32


def generator_for(device: torch.device, seed: int) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed) & 0x7FFF_FFFF_FFFF_FFFF)
    return gen


def stochastic_round_(x: torch.Tensor, generator: torch.Generator, noise: torch.Tensor | None = None) -> torch.Tensor:
    """Round float32 ``x`` in place to values exactly representable in bf16 (stochastically); returns x.

    ``noise`` is an optional int32 scratch tensor of x's shape (e.g. from a buffer pool).
    """
    if x.dtype != torch.float32:
        raise TypeError(f"stochastic_round_ expects float32, got {x.dtype}")
    bits = x.view(torch.int32)
    if noise is None:
        noise = torch.empty_like(bits)
    noise.random_(0, 65536, generator=generator)
    finite = torch.isfinite(x)
    rounded = bits.add(noise).bitwise_and_(_LOW_MASK)
    # inf/nan keep their bit pattern (adding noise would turn inf into nan)
    bits.copy_(torch.where(finite, rounded, bits))
    return x


def to_bf16_stochastic(x: torch.Tensor, out: torch.Tensor, generator: torch.Generator,
                       noise: torch.Tensor | None = None) -> torch.Tensor:
    """Write float32 ``x`` (not modified) into the bf16 tensor ``out`` with stochastic rounding."""
    tmp = x.to(torch.float32, copy=True)
    stochastic_round_(tmp, generator, noise)
    out.copy_(tmp)  # exact: tmp's low 16 bits are zero
    return out


def compensated_add_(param: torch.Tensor, shift: torch.Tensor, delta: torch.Tensor, generator: torch.Generator,
                     noise: torch.Tensor | None = None) -> None:
    """param (bf16) += delta (float32) through the shift (bf16) compensation buffer; both in place.

    Kahan summation as optimi's low-precision AdamW does it: the parameter takes ``p + shift + delta`` rounded
    to nearest, and the shift buffer keeps what that rounding lost (itself stochastically rounded, so tiny
    residuals add up without bias). With delta = 0 nothing moves: the rounding to nearest of ``p + shift``
    is p again (the shift is below half an ulp of p), so lr = 0 leaves the weights bit-identical.
    """
    target = param.float().add_(shift.float()).add_(delta)
    param.copy_(target)  # round to nearest
    to_bf16_stochastic(target.sub_(param.float()), shift, generator, noise)


def compensated_write(weight: torch.Tensor, before: torch.Tensor, shift: torch.Tensor, decay: torch.Tensor,
                      live: torch.Tensor, segments) -> None:
    """``compensated_add_`` over a chunk's flat fp32 buffers, functionally (it compiles): ``before`` holds the
    bf16 params as they are, ``weight`` the new weights without weight decay, ``shift`` the decoded compensation
    buffer, ``decay`` (slots,) the weight decay due per tensor. With delta = (weight - before) - decay * before:

        target = before + shift + delta          weight <- round_to_nearest_bf16(target)
        shift  <- target - weight                (stochastically rounded to bf16 when the caller stores it)

    in place, for the tensors that step (``live``, (slots,) bool); the others keep weight and shift. With
    lr = 0 and no decay, target = before + shift rounds back to before: the weights stay bit-identical."""
    block = segments.block
    live_blocks = segments.expand(live)
    old = before.view(-1, block)
    target = weight.view(-1, block) + shift.view(-1, block) - old * segments.expand(decay)
    rounded = round_to_bf16(target)
    shift.copy_(torch.where(live_blocks, target - rounded, shift.view(-1, block)).view(-1))
    weight.copy_(torch.where(live_blocks, rounded, old).view(-1))


def round_to_bf16(x: torch.Tensor) -> torch.Tensor:
    """float32 ``x`` rounded to the nearest bf16 value (ties to even, as torch's float32 -> bfloat16 cast), as
    float32. On the bit pattern, so that a compiled graph cannot drop the rounding (inductor treats a
    float32 -> bfloat16 -> float32 round trip inside a graph as exact unless it emulates precision casts)."""
    bits = x.view(torch.int32)
    rounded = (bits + (0x7FFF + ((bits >> 16) & 1))).bitwise_and(_LOW_MASK).view(torch.float32)
    return torch.where(torch.isfinite(x), rounded, x)
