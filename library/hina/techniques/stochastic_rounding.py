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

Random bits come from a counter-based integer hash of (seed, element index) (``random_bits16``), in plain
torch, so the rounding compiles into the kernel that computes the value (a ``torch.Generator`` cannot be
used inside a compiled graph, and drawing with one took ~10 ms per million elements on this project's CPU).
The optimizer derives the seed from (seed, step, stream): a run is reproducible, every distributed rank
draws the same numbers, and a resumed run continues to the bit.
"""

from __future__ import annotations

import torch

_LOW_MASK = -65536  # 0xFFFF0000 as int32
_HASH_K = 0x45D9F3B


def random_bits16(index: torch.Tensor, seed) -> torch.Tensor:
    """16 uniformly distributed random bits per element (int32 in [0, 2^16)) from a 32-bit integer hash of
    ``index + seed`` modulo 2^32 (``index`` an integer tensor, ``seed`` an int or a 0-d integer tensor; two
    xorshift-multiply rounds, the "lowbias32"-style mixer):

        h = (index + seed) mod 2^32;  h = ((h >> 16) ^ h) K mod 2^32  (twice);  bits = ((h >> 16) ^ h) mod 2^16

    computed in int32 lanes: a two's-complement sum or product wraps to the same low 32 bits as the exact one, and a
    logical shift is the arithmetic shift masked to 16 bits, so the bits equal the exact hash (tested against it in
    int64). int32 lanes are twice as many per vector as int64: a compiled ``store_bf16`` over 256K elements took
    0.45-0.56 ms with the hash in int64 and 0.32-0.44 ms with this one (1 thread, thread CPU, the two interleaved
    in one process, three runs)."""
    h = index.to(torch.int32) + _wrap32(seed)
    h = (((h >> 16) & 0xFFFF) ^ h) * _HASH_K
    h = (((h >> 16) & 0xFFFF) ^ h) * _HASH_K
    return (((h >> 16) & 0xFFFF) ^ h) & 0xFFFF


def _wrap32(seed):
    """``seed`` modulo 2^32 as a signed 32-bit value (an int, or an int32 tensor)."""
    if isinstance(seed, torch.Tensor):
        return (seed & 0xFFFFFFFF).to(torch.int32) if seed.dtype == torch.int64 else seed.to(torch.int32)
    seed = int(seed) & 0xFFFFFFFF
    return seed - (1 << 32) if seed >= 1 << 31 else seed


def stochastic_round(x: torch.Tensor, seed) -> torch.Tensor:
    """float32 ``x`` rounded stochastically to bf16 values (returned as float32): the 16 random bits are added
    to the low half of the bit pattern, which is then truncated, so x rounds up with probability equal to its
    distance from the lower neighbour in ulps (eq. 2 of arXiv 1502.02551). inf and NaN keep their bits."""
    index = torch.arange(x.numel(), dtype=torch.int32, device=x.device).view(x.shape)
    bits = x.view(torch.int32)
    rounded = (bits + random_bits16(index, seed)).bitwise_and(_LOW_MASK).view(torch.float32)
    return torch.where(torch.isfinite(x), rounded, x)


def store_bf16(value: torch.Tensor, out: torch.Tensor, seed) -> None:
    """Write float32 ``value`` into the bf16 tensor ``out`` with stochastic rounding (exact: the rounded value
    is a bf16 value)."""
    out.copy_(stochastic_round(value, seed))


def compensated_write(weight: torch.Tensor, before: torch.Tensor, shift: torch.Tensor, decay: torch.Tensor,
                      live: torch.Tensor, segments) -> None:
    """Compensated accumulation (module docstring) over a chunk's fp32 buffers (flat or ``(num_blocks, block)``),
    functionally (it compiles): ``before`` holds the bf16 params as they are, ``weight`` the new weights without
    weight decay, ``shift`` the decoded compensation buffer, ``decay`` (slots,) the weight decay due per tensor. With
    delta = (weight - before) - decay * before:

        target = before + shift + delta          weight <- round_to_nearest_bf16(target)
        shift  <- target - weight                (stochastically rounded to bf16 when the caller stores it)

    in place, for the tensors that step (``live``, (slots,) bool); the others keep weight and shift. With
    lr = 0 and no decay, target = before + shift rounds back to before: the weights stay bit-identical."""
    block = segments.block
    live_blocks = segments.expand(live)
    old = before.view(-1, block)
    target = weight.view(-1, block) + shift.view(-1, block) - old * segments.expand(decay)
    rounded = round_to_bf16(target)
    shift.copy_(torch.where(live_blocks, target - rounded, shift.view(-1, block)).view_as(shift))
    weight.copy_(torch.where(live_blocks, rounded, old).view_as(weight))


#: Inductor options a compiled function that calls ``round_to_bf16`` needs: without them inductor treats the
#: float32 -> bfloat16 -> float32 round trip inside a graph as exact and drops the rounding.
ROUND_TRIP_OPTIONS = {"emulate_precision_casts": True}


def round_to_bf16(x: torch.Tensor) -> torch.Tensor:
    """float32 ``x`` rounded to the nearest bf16 value (ties to even), as float32: torch's cast there and back.
    Compiled, only with ``ROUND_TRIP_OPTIONS``. (Done on the bit pattern instead, it cost 4x as much compiled:
    CPU inductor in torch 2.13 moves every lane of a float <-> int32 bit cast through memory one by one; 0.79 vs
    0.19 ms per 512K elements, 1 thread.)"""
    return x.to(torch.bfloat16).to(torch.float32)
