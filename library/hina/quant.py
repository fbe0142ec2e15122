"""8-bit blockwise state codec in plain torch, bit-compatible with bitsandbytes' dynamic map.

Implements block-wise dynamic quantisation (Dettmers et al., "8-bit Optimizers via Block-wise
Quantization", arXiv 2110.02861): a flat state of ``n`` elements is cut into blocks of ``block``
elements; each block keeps ``absmax = max |x|`` in float32 and every element the uint8 index of the
code nearest to ``x / absmax`` in the dynamic map (Dettmers, "8-Bit Approximations for Parallelism in
Deep Learning", arXiv 1511.04561). Decoding is ``qmap[code] * absmax``.

The map is the one ``bitsandbytes.functional.create_dynamic_map(signed)`` builds (built here with the
same float32 arithmetic; a test checks it bit for bit), so codes written by
``bitsandbytes.functional.quantize_blockwise`` with the same map and block size decode here exactly as
``dequantize_blockwise`` decodes them, and today's state_dicts stay loadable.

Why not ``torch.bucketize``: it is slow in CPU inductor. The map has a fixed layout, so the code is
computed arithmetically. For ``a = |x| / absmax`` in decade ``i`` (``10^(i-7) <= a < 10^(i-6)``,
``i = 0..6``), the map holds ``k_i = 2^i`` (signed) or ``2^(i+1)`` (unsigned) codes
``10^(i-6) * (0.1 + 0.9 (j + 1/2) / k_i)``, ``j = 0..k_i-1``, at consecutive indices; ``1.0`` is the last
code and ``0`` sits at index 127 (signed, negatives mirrored below it) or 0 (unsigned). The index of the
largest code ``<= a`` is ``start_i + floor((a / 10^(i-6) - 0.1) k_i / 0.9 - 1/2)``; the nearer of that
code and the next one is the result, decided by one lookup in a table of the midpoints between neighbouring
codes (``a`` above the midpoint: the upper code; a tie: the lower). Each midpoint is computed in float64
from the float32 codes (exact) and rounded down to float32, so ``a > midpoint`` is the exact comparison for
every float32 ``a``. Rounding error in the floor arithmetic can move the index by one only when ``a`` lies
next to a code, where both candidate pairs contain that code, so the result is the nearest code (tests
compare with bitsandbytes elementwise). One lookup instead of the two code values halves the gathers,
which CPU inductor cannot vectorise (encode measured 2.2x faster, same codes).

Behaviour at the edges (tested):

- No zero-point blow-up (unsigned map, non-negative states such as Adam's second moment): a positive
  value never encodes to the zero code. bitsandbytes rounds ``a < 1.6e-7`` (half the smallest positive
  code, ``3.25e-7``) to 0, so an element of ``v`` more than ~10^6.8 below its block's maximum decodes
  to exactly 0 and Adam's ``m / (sqrt(v) + eps)`` becomes ``m / eps``: a step thousands of times too
  large. Here such an element gets the smallest positive code (``3.25e-7 * absmax``), an error of at
  most ``3.25e-7 * absmax`` that errs on the safe (smaller-step) side. Negative inputs to the unsigned
  map encode to 0. (If ``absmax`` itself is below ~4e-39 the product underflows; ``sqrt(v)`` is then
  far below any ``eps`` and the step is bounded by ``m / eps`` with ``m`` of the same tiny scale.)
- A block of all zeros encodes with ``absmax = 0`` and the zero code, and decodes to zeros (no 0/0).
- Non-finite input: ``absmax`` of a block holding a NaN is NaN, of a block holding ±inf (and no NaN)
  is inf, so a caller detects a non-finite block from ``absmax`` alone. Codes in such a block are valid
  indices but meaningless, and decoding the block gives non-finite values on every element
  (``code * inf`` is ±inf or NaN, ``code * NaN`` is NaN), never a silently finite state.

All functions are functional (no in-place writes to their inputs), have no host synchronisation and no
Python loop over blocks, so they trace into one fused kernel under ``torch.compile``; compiled and
eager results are bit-identical (tested): the final choice compares exact map values, so a different
rounding of the index arithmetic under compilation cannot change a code.

Measured (``OMP_NUM_THREADS=2 python benchmarks/quant_speed.py [--signed]``; 1M float32 elements, block
2048, this project's 2-core CPU while other jobs loaded it (load average 13-15), so read the ratios within
one run, not nanoseconds), encode + decode per element: unsigned map: compiled 47 ns, bitsandbytes
``quantize_blockwise`` + ``dequantize_blockwise`` 70 ns (0.68x), eager 834 ns; signed map: compiled 46 ns,
bitsandbytes 72 ns (0.63x), eager 708 ns. Compiled, encode and decode fuse into a few vectorised loops;
eager runs ~30 separate ops and is meant only as the fallback. (Those figures predate the one-lookup encode
and the word-wise code reads, each faster in single-thread development measurements; quant_speed.py has
not been re-run since.)
"""

from __future__ import annotations

import sys

import torch

_MAX_EXPONENT = 7  # decades 10^-7..10^0 of bitsandbytes' default dynamic map (max_exponent_bits=7)
_DYNAMIC_MAPS: dict[tuple[bool, torch.device], torch.Tensor] = {}


def _build_dynamic_map(signed: bool) -> torch.Tensor:
    """The 256 codes of ``bitsandbytes.functional.create_dynamic_map(signed)``, same float32 arithmetic."""
    values: list[torch.Tensor] = []
    for decade in range(_MAX_EXPONENT):
        items = 2 ** decade if signed else 2 ** (decade + 1)
        boundaries = torch.linspace(0.1, 1, items + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        scale = 10 ** (-(_MAX_EXPONENT - 1) + decade)
        values.append(scale * means)
        if signed:
            values.append(-scale * means)
    values.append(torch.tensor([0.0, 1.0], dtype=torch.float32))
    qmap = torch.cat(values)
    assert qmap.numel() == 256, qmap.numel()
    return qmap.sort().values


def _decade_constants(signed: bool) -> list[tuple[float, float]]:
    """Per decade i = 0..6 of the map: (slope, offset) with floor index = floor(a * slope + offset)."""
    zero_index, first_items = (127, 1) if signed else (0, 2)
    constants = []
    for decade in range(_MAX_EXPONENT):
        items = first_items * 2 ** decade                # codes in this decade
        start = zero_index + 1 + items - first_items     # index of its first code
        scale = 10.0 ** (decade - (_MAX_EXPONENT - 1))   # its codes are scale * (0.1 .. 1)
        constants.append((items / (0.9 * scale), start - 0.1 * items / 0.9 - 0.5))
    return constants


_DECADE_THRESHOLDS = [10.0 ** exponent for exponent in range(-(_MAX_EXPONENT - 1), 0)]  # 1e-6 .. 1e-1
_DECADE_CONSTANTS = {signed: _decade_constants(signed) for signed in (True, False)}


def _build_midpoints(qmap: torch.Tensor) -> torch.Tensor:
    """float32[256]: entry ``i`` is the largest float32 ``<=`` the midpoint of codes ``i`` and ``i + 1`` (so, for
    a float32 ``a``, ``a > mid[i]`` exactly when ``a`` is nearer code ``i + 1``); the last entry is never read
    (the index is clamped to 254) and is 2.0."""
    exact = (qmap[:-1].double() + qmap[1:].double()) / 2.0  # exact: float32 sums fit in float64
    rounded = exact.float()
    rounded = torch.where(rounded.double() > exact, torch.nextafter(rounded, torch.full_like(rounded, -1.0)), rounded)
    return torch.cat([rounded, torch.full((1,), 2.0)])


_MIDPOINTS: dict[tuple[bool, torch.device], torch.Tensor] = {}


def midpoints(signed: bool, device) -> torch.Tensor:
    """The rounding thresholds between neighbouring codes of ``dynamic_map(signed, device)``, cached.

    ``dynamic_map`` fills this cache for its device, outside any compiled region, so ``encode`` only reads it.
    """
    key = (bool(signed), torch.device(device))
    if key not in _MIDPOINTS:
        _MIDPOINTS[key] = _build_midpoints(_build_dynamic_map(bool(signed))).to(key[1])
    return _MIDPOINTS[key]


def dynamic_map(signed: bool, device) -> torch.Tensor:
    """bitsandbytes' 8-bit dynamic map (float32[256], sorted), cached per ``(signed, device)``.

    ``signed=True`` for states of either sign (first moments), ``False`` for non-negative ones
    (second moments): the unsigned map spends the sign bit on one more fraction bit per decade.
    """
    key = (bool(signed), torch.device(device))
    if key not in _DYNAMIC_MAPS:
        _DYNAMIC_MAPS[key] = _build_dynamic_map(bool(signed)).to(key[1])
        midpoints(*key)  # encode's rounding table, built here (eagerly) rather than while tracing
        _BYTE_SHIFTS.setdefault(key[1], _byte_shifts(key[1]))
    return _DYNAMIC_MAPS[key]


_DECADE_TABLES: dict[tuple[bool, torch.device], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def _decade_slope_offset(a: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per element of ``a`` in [0, 1]: its decade's (slope, offset), floor index = floor(a * slope + offset).

    Decade i holds 10^(i-7) <= a < 10^(i-6), clamped to 0..6 (below 10^-7 the floor index clamps to the zero
    code). Compiled, six comparisons and selects (``torch.bucketize`` is slow in CPU inductor); eager, one
    ``bucketize`` and two lookups in 7-entry tables, several times fewer passes over memory. Both pick the
    same decade (``a >= threshold`` counted either way) and the same float32 constants.
    """
    constants = _DECADE_CONSTANTS[signed]
    if torch.compiler.is_compiling():
        slope, offset = torch.full_like(a, constants[0][0]), torch.full_like(a, constants[0][1])
        for threshold, (decade_slope, decade_offset) in zip(_DECADE_THRESHOLDS, constants[1:]):
            in_decade = a >= threshold
            slope = torch.where(in_decade, decade_slope, slope)
            offset = torch.where(in_decade, decade_offset, offset)
        return slope, offset
    key = (signed, a.device)
    if key not in _DECADE_TABLES:
        table = torch.tensor(constants, dtype=torch.float32, device=a.device)
        thresholds = torch.tensor(_DECADE_THRESHOLDS, dtype=torch.float32, device=a.device)
        _DECADE_TABLES[key] = (thresholds, table[:, 0].contiguous(), table[:, 1].contiguous())
    thresholds, slopes, offsets = _DECADE_TABLES[key]
    decade = torch.bucketize(a, thresholds, right=True)  # number of thresholds <= a
    return slopes[decade], offsets[decade]


def _check_block(n: int, block: int) -> None:
    if block <= 0 or n % block:
        raise ValueError(f"block size {block} must be positive and divide the number of elements {n}")


def encode(x: torch.Tensor, qmap: torch.Tensor, block: int, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise flat float32 ``x`` (``n`` a multiple of ``block``) to ``(codes uint8[n], absmax float32[n // block])``.

    ``qmap`` must be ``dynamic_map(signed, x.device)``: the code arithmetic assumes its layout.
    """
    codes, absmax = encode_int32(x, qmap, block, signed)
    return codes.to(torch.uint8).reshape(x.shape), absmax


def encode_int32(x: torch.Tensor, qmap: torch.Tensor, block: int, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``encode`` with the codes as int32 ``(n // block, block)``, for a caller that selects among codes before
    storing them (CPU inductor vectorises selects on uint8 lane by lane: measured 2x slower)."""
    _check_block(x.numel(), block)
    blocks = x.reshape(-1, block).to(torch.float32)
    absmax = blocks.abs().amax(dim=1)  # NaN if the block holds a NaN, inf if it holds ±inf
    safe_absmax = torch.where(absmax > 0, absmax, torch.ones_like(absmax))  # all-zero block: divide by 1
    y = blocks / safe_absmax[:, None]  # in [-1, 1] when the block is finite (|x| <= absmax)
    y = torch.where(y == y, y, 0.0).clamp(-1.0, 1.0)  # non-finite block: any valid index (absmax tells)
    a = y.abs() if signed else y.clamp(min=0.0)

    slope, offset = _decade_slope_offset(a, bool(signed))
    zero_index = 127 if signed else 0
    floor_index = torch.floor(a * slope + offset)  # may round differently from eager to compiled: harmless
    low = floor_index.clamp(zero_index, 254).to(torch.int32)
    code = low + (a > midpoints(signed, x.device)[low]).to(torch.int32)  # the nearer of codes low, low + 1
    if signed:
        # negatives mirror the positive side (no -1.0 code: index 254 is the largest magnitude there)
        code = torch.where(y < 0, 254 - code.clamp(max=254), code)
    else:
        # no zero-point: a positive value gets at least the smallest positive code
        code = torch.where((a > 0) & (code == 0), torch.ones_like(code), code)
    return code, absmax


def decode(codes: torch.Tensor, absmax: torch.Tensor, qmap: torch.Tensor, block: int) -> torch.Tensor:
    """Dequantise: ``qmap[codes] * absmax`` per block, float32[n] (same as bitsandbytes' dequantize_blockwise)."""
    _check_block(codes.numel(), block)
    values = qmap[code_indices(codes).reshape(-1, block)]
    return (values * absmax[:, None]).reshape(codes.shape)


_BYTE_SHIFTS: dict[torch.device, torch.Tensor] = {}


def _byte_shifts(device) -> torch.Tensor:
    return torch.tensor([0, 8, 16, 24], dtype=torch.int32, device=device)


def code_indices(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes as int32 indices. A contiguous, 4-byte aligned buffer is read as int32 words and split with
    shifts (little-endian byte order): CPU inductor loads 8 uint8 lanes through a zeroed 32-byte buffer, and
    reading words measured 1.35x faster per decode. Anything else is converted element by element.

    While tracing, ``storage_offset`` is not readable without a graph break: the codes are taken to start at a
    word boundary, as every codec buffer does (a view of them that does not makes ``view(int32)`` fail at
    compile time, and the step then runs eagerly, where the offset is checked)."""
    aligned = (sys.byteorder == "little" and codes.dtype == torch.uint8 and codes.is_contiguous()
               and codes.numel() % 4 == 0
               and (torch.compiler.is_compiling() or codes.storage_offset() % 4 == 0))
    if not aligned:
        return codes.reshape(-1).to(torch.int32)
    shifts = _BYTE_SHIFTS.get(codes.device)
    if shifts is None:  # dynamic_map fills the cache eagerly; never store a tensor made while tracing
        shifts = _byte_shifts(codes.device)
        if not torch.compiler.is_compiling():
            _BYTE_SHIFTS[codes.device] = shifts
    words = codes.reshape(-1).view(torch.int32).view(-1, 1)
    return ((words >> shifts) & 255).view(-1)
