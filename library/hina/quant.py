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

Why not ``torch.bucketize`` or a table lookup: CPU inductor compiles ``bucketize`` slowly and scalarises
gathers. The map has a fixed layout, so the code is computed arithmetically. (Decoding stays a lookup: an
arithmetic decode measured slower inside the fused step, see ``decode``.) For ``a = |x| / absmax``,
the positive codes fall into 9 regions of evenly spaced codes: the zero code, decades ``i = 0..6``
(``10^(i-7) <= code < 10^(i-6)``) holding ``k_i = 2^i`` (signed) or ``2^(i+1)`` (unsigned) codes
``10^(i-6) * (0.1 + 0.9 (j + 1/2) / k_i)``, ``j = 0..k_i-1``, at consecutive indices, and the code ``1.0``;
``0`` sits at index 127 (signed, negatives mirrored below it) or 0 (unsigned). The region of ``a`` is found
by comparing ``a`` with the exact rounding thresholds between regions (the largest float32 ``<=`` the
midpoint of one region's last code and the next one's first, computed in float64 from the float32 codes), so
a value between two decades goes to the nearer code, ties to the lower. Within the region the code is
``min(round(a * inverse_spacing + offset), last)`` with ``offset = start - first * inverse_spacing`` (``start``:
the index of the region's first code ``first``): ``a`` lies at most 0.36 spacings below the region's first code
(the rounding never goes below it) but up to 1.5 spacings above its last, hence the ``min``. All constants come
from one compare/select chain on scalars (no tensor indexing). The float32 codes are not exactly evenly spaced
and the arithmetic rounds (``a * inverse_spacing`` is up to ~142 code units, so its rounding is up to ~1e-5 of a
spacing), so within a decade the code can be the other neighbour of the exact nearest one, only where ``a`` lies
within a small fraction of a spacing of the midpoint between them (measured: at most 2.5e-5 of a spacing;
tested: at most 1e-4). The decoded error that adds is that fraction of a spacing, against quantisation errors of
up to half a spacing.

Behaviour at the edges (tested):

- No zero-point blow-up (unsigned map, non-negative states such as Adam's second moment): a positive
  value never encodes to the zero code. bitsandbytes rounds ``a < 1.6e-7`` (half the smallest positive
  code, ``3.25e-7``) to 0, so an element of ``v`` more than ~10^6.8 below its block's maximum decodes
  to exactly 0 and Adam's ``m / (sqrt(v) + eps)`` becomes ``m / eps``: a step thousands of times too
  large. Here such an element gets the smallest positive code (``3.25e-7 * absmax``), an error of at
  most ``3.25e-7 * absmax`` that errs on the safe (smaller-step) side. Negative inputs to the unsigned
  map encode to 0.
- A block whose largest magnitude is subnormal (below 2^-126, about 1.2e-38) is stored with ``absmax =
  2^-126``: encoding multiplies by ``1 / absmax`` (not a division per element), and a subnormal's reciprocal can
  overflow. Its values are then coded relative to 2^-126 and decode with an absolute error under 0.5 % of
  2^-126 (half the widest gap between neighbouring codes); such a state is far below any ``eps`` it meets.
- A block of all zeros encodes with ``absmax = 0`` and the zero code, and decodes to zeros (no 0/0).
- Non-finite input: ``absmax`` of a block holding a NaN is NaN, of a block holding ±inf (and no NaN)
  is inf, so a caller detects a non-finite block from ``absmax`` alone. Codes in such a block are valid
  indices but meaningless, and decoding the block gives non-finite values on every element
  (``code * inf`` is ±inf or NaN, ``code * NaN`` is NaN), never a silently finite state.

All functions are functional (no in-place writes to their inputs), have no host synchronisation and no
Python loop over blocks, so they trace into one fused kernel under ``torch.compile``; on CPU compiled and
eager results are bit-identical (tested): both pick the region by the same comparisons and take the same
float32 constants, and inductor compiles its C++ with ``-ffp-contract=off``, so ``a * inverse_spacing + offset``
is not contracted into a fused multiply-add. (A GPU compiler that contracts it may pick the other neighbour at
a near-tie, within 1e-4 of a spacing; not tested here: no GPU.)

Measured (``OMP_NUM_THREADS=1 python benchmarks/quant_speed.py --threads 1 --encode-only [--signed]``; 1M
float32 elements, block 2048, 1 thread, this project's 2-core CPU while other jobs loaded it (load average
~6), so read the ratios within one run, not nanoseconds): compiled encode 1.8 ns/element unsigned, 1.5
signed, bitsandbytes ``quantize_blockwise`` 9.6 / 5.7 (0.19x / 0.27x); the previous encode (one lookup in a
table of all 255 midpoints after a floor estimate) measured 6.7 / 6.7 vs bitsandbytes 12.9 / 13.4 (0.52x /
0.50x) in the same conditions. Same process, interleaved runs, thread CPU time, 1 thread: 3.4 -> 1.9 ms per
1M-element encode (unsigned), 3.3 -> 1.8 (signed); a whole HinaAdamW 8-bit defaults step on the SD1.5 r16
set, 1 thread: 145 -> 127 ms thread CPU time. Eager (~30 separate ops) is meant only as the fallback.
"""

from __future__ import annotations

import torch

_MAX_EXPONENT = 7  # decades 10^-7..10^0 of bitsandbytes' default dynamic map (max_exponent_bits=7)
_SMALLEST_NORMAL = torch.finfo(torch.float32).tiny  # 2^-126: its reciprocal is finite, a subnormal's may not be
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


def _build_midpoints(qmap: torch.Tensor) -> torch.Tensor:
    """float32[255]: entry ``i`` is the largest float32 ``<=`` the midpoint of codes ``i`` and ``i + 1``, so for a
    float32 ``a``, ``a > mid[i]`` exactly when ``a`` is nearer code ``i + 1`` (a tie goes to code ``i``)."""
    exact = (qmap[:-1].double() + qmap[1:].double()) / 2.0  # exact: float32 sums fit in float64
    rounded = exact.float()
    return torch.where(rounded.double() > exact, torch.nextafter(rounded, torch.full_like(rounded, -1.0)), rounded)


def _region_layout(signed: bool) -> list[tuple[int, int]]:
    """``(index of its first code, number of codes)`` of each run of evenly spaced codes in ``a`` = |x| / absmax:
    the zero code, the 7 decades, the code 1.0, in increasing order."""
    zero_index, first_items = (127, 1) if signed else (0, 2)
    layout, start = [(zero_index, 1)], zero_index + 1
    for decade in range(_MAX_EXPONENT):
        items = first_items * 2 ** decade
        layout.append((start, items))
        start += items
    assert start == 255, start
    return layout + [(255, 1)]


def _build_regions(signed: bool) -> list[tuple[float, float, float, float]]:
    """Per region of ``_region_layout``: ``(threshold, inverse spacing, offset, last)`` as float32 values.

    A value ``a`` lies in the last region whose ``threshold < a`` (the first region's threshold is -inf); the
    threshold is the rounding threshold between the previous region's last code and this one's first, so the
    region holds exactly the values whose nearest code is one of its own. The code is then
    ``min(round(a * inverse spacing + offset), last)``, ``offset = start - first * inverse spacing`` (start: the
    index of the region's first code ``first``): one product and one sum, and one constant fewer to select per
    element than ``start + round((a - first) * inverse spacing)`` (measured: 0.97x the HinaAdamW 8-bit step).
    """
    qmap = _build_dynamic_map(signed)
    mid = _build_midpoints(qmap)
    regions = []
    for start, items in _region_layout(signed):
        first, last = qmap[start].item(), qmap[start + items - 1].item()
        inverse_spacing = _float32((items - 1) / (last - first) if items > 1 else 0.0)
        threshold = float("-inf") if not regions else mid[start - 1].item()
        offset = _float32(start - first * inverse_spacing)
        regions.append((threshold, inverse_spacing, offset, float(start + items - 1)))
    return regions


def _float32(value: float) -> float:
    """``value`` rounded to the nearest float32 (as a Python float)."""
    return torch.tensor(value, dtype=torch.float32).item()


_REGIONS = {signed: _build_regions(signed) for signed in (True, False)}
_MIDPOINTS: dict[tuple[bool, torch.device], torch.Tensor] = {}


def midpoints(signed: bool, device) -> torch.Tensor:
    """The exact rounding thresholds between neighbouring codes of ``dynamic_map(signed, device)`` (float32[255],
    see ``_build_midpoints``), cached. ``encode`` reads only the ones between regions; tests use them all."""
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
    return _DYNAMIC_MAPS[key]


_REGION_TABLES: dict[tuple[bool, torch.device], tuple[torch.Tensor, ...]] = {}


def _region_constants(a: torch.Tensor, signed: bool) -> tuple[torch.Tensor, ...]:
    """Per element of ``a`` in [0, 1]: its region's ``(inverse spacing, offset, last)`` (``_build_regions``).

    Compiled, a chain of comparisons and selects on scalar constants (no tensor indexing: CPU inductor
    scalarises gathers); eager, one ``bucketize`` and three lookups in 9-entry tables, several times fewer
    passes over memory. Both pick the same region (thresholds ``< a`` counted either way) and the same float32
    constants, so compiled and eager codes are identical.
    """
    regions = _REGIONS[signed]
    if torch.compiler.is_compiling():
        constants = [torch.full_like(a, value) for value in regions[0][1:]]
        for threshold, *values in regions[1:]:
            in_region = a > threshold
            constants = [torch.where(in_region, value, current) for value, current in zip(values, constants)]
        return tuple(constants)
    key = (signed, a.device)
    if key not in _REGION_TABLES:
        table = torch.tensor(regions, dtype=torch.float32, device=a.device)
        _REGION_TABLES[key] = (table[1:, 0].contiguous(),) + tuple(table[:, i].contiguous() for i in range(1, 4))
    thresholds, *tables = _REGION_TABLES[key]
    region = torch.bucketize(a, thresholds)  # number of thresholds < a
    return tuple(table[region] for table in tables)


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
    storing them (CPU inductor vectorises selects on uint8 lane by lane: measured 2x slower).

    Inside a fused 8-bit step this is the largest cost: HinaAdamW 8-bit defaults, SD1.5 r16, 1 thread, thread CPU
    per step with the encode swapped step by step in one process: a trivial stand-in encode (wrong codes) 0.52x
    the step; this same arithmetic rewritten so every intermediate is used once (same codes; meant to keep inductor
    from writing the float codes to a buffer and reading them back) 1.04x, so that rewrite is not kept."""
    _check_block(x.numel(), block)
    blocks = x.reshape(-1, block).to(torch.float32)
    absmax = blocks.abs().amax(dim=1)  # NaN if the block holds a NaN, inf if it holds ±inf
    # A block whose largest value is subnormal is scaled by the smallest normal float instead, whose reciprocal
    # is finite (the block's codes are then relative to it, and decoding with it gives the values back).
    absmax = torch.where(absmax > 0, absmax.clamp(min=_SMALLEST_NORMAL), absmax)
    inverse = 1.0 / torch.where(absmax > 0, absmax, torch.ones_like(absmax))  # all-zero block: scale 1
    # a product, not a division per element (as bitsandbytes' kernels do): a vector division is several times
    # the cost of a product (measured: 0.97x the whole HinaAdamW 8-bit step, see the module doc)
    y = blocks * inverse[:, None]  # in [-1, 1] when the block is finite (|x| <= absmax)
    y = torch.where(y == y, y, 0.0).clamp(-1.0, 1.0)  # non-finite block: any valid index (absmax tells)
    a = y.abs() if signed else y.clamp(min=0.0)

    inverse_spacing, offset, last = _region_constants(a, bool(signed))
    code = torch.minimum(torch.round(a * inverse_spacing + offset), last).to(torch.int32)
    if signed:
        # negatives mirror the positive side (no -1.0 code: index 254 is the largest magnitude there)
        code = torch.where(y < 0, 254 - code.clamp(max=254), code)
    else:
        # no zero-point: a positive value gets at least the smallest positive code
        code = torch.where((a > 0) & (code == 0), torch.ones_like(code), code)
    return code, absmax


def decode(codes: torch.Tensor, absmax: torch.Tensor, qmap: torch.Tensor, block: int) -> torch.Tensor:
    """Dequantise: ``qmap[codes] * absmax`` per block, float32[n] (same as bitsandbytes' dequantize_blockwise).

    The lookup is ``aten._unsafe_index``, the same values as ``qmap[codes]`` eager and compiled (tested on all
    256 codes): uint8 codes cannot leave a 256-entry map (both checked here, on dtype and shape only), while
    plain indexing made CPU inductor check every lane's index against the map's size inside the fused chunk
    step. Measured, 1 thread, thread CPU per step with this decode and the plain-indexing one swapped step by
    step in one process (median of the paired ratios, 16-30 pairs): HinaAdamW 8-bit defaults 0.97x at SD1.5
    r16, 0.95x at SDXL r32; all-off 8-bit 0.96x, Automagic_CameAMP8bit 0.94x (SD1.5).

    The lookup is still a scalar gather (CPU inductor emits no vector gather). An arithmetic decode does not
    beat it inside the fused step: the map's float32 values carry ``torch.linspace``'s roundings, so an exact
    formula needs a per-code correction on top of a per-decade select chain, and inexact chains alone (no
    correction, 25-30 vector operations per 16 lanes) measured 0.99x and 1.03x the plain-indexing step (SD1.5,
    same method), against 0.80-0.84x for a decode with no lookup at all.
    """
    _check_block(codes.numel(), block)
    if codes.dtype != torch.uint8 or qmap.shape != (256,):
        raise ValueError(f"decode needs uint8 codes and a 256-entry map, got {codes.dtype} and {tuple(qmap.shape)}")
    values = torch.ops.aten._unsafe_index(qmap, [code_indices(codes).reshape(-1, block)])
    return (values * absmax[:, None]).reshape(codes.shape)


def code_indices(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes as flat int32 indices, element by element.

    (Reading the codes as int32 words split by shifts was faster in a decode alone, but inside a fused chunk
    step CPU inductor loads each lane's word and shift one by one: HinaAdamW 8-bit defaults, SD1.5 r16, 1
    thread, 126-134 -> 88-92 ms thread CPU per step with this plain conversion.)"""
    return codes.reshape(-1).to(torch.int32)
