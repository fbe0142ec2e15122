"""library.hina.quant: the plain-torch 8-bit blockwise codec against bitsandbytes and exact nearest rounding."""

import pytest
import torch

bnb_functional = pytest.importorskip("bitsandbytes.functional")

from library.hina import quant  # noqa: E402

BLOCKS = [64, 128, 256, 512, 1024, 2048, 4096]  # every block size bitsandbytes accepts


def _state(kind: str, n: int, signed: bool, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if kind == "normal":
        x = torch.randn(n, generator=generator)
    elif kind == "heavy":  # Cauchy-like tails: a few huge values per block
        x = torch.randn(n, generator=generator) / torch.rand(n, generator=generator).clamp(min=1e-6)
    elif kind == "second_moment":  # squared gradients whose scale spans many decades, like Adam's v
        x = (torch.randn(n, generator=generator) * torch.exp(3 * torch.randn(n, generator=generator))) ** 2
    else:
        raise ValueError(kind)
    return x if signed else x.abs()


def _exact_nearest(x: torch.Tensor, qmap: torch.Tensor, block: int) -> torch.Tensor:
    """Reference: argmin over the whole map of |qmap * absmax - x| (no arithmetic shortcut)."""
    blocks = x.reshape(-1, block)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    candidates = qmap[None, None, :].double() * absmax[..., None].double()
    return (candidates - blocks[..., None].double()).abs().argmin(dim=-1).reshape(x.shape)


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_is_bitsandbytes_map(signed):
    ours = quant.dynamic_map(signed, "cpu")
    assert torch.equal(ours, bnb_functional.create_dynamic_map(signed=signed))
    assert quant.dynamic_map(signed, torch.device("cpu")) is ours  # cached per (signed, device)


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("kind", ["normal", "heavy", "second_moment"])
@pytest.mark.parametrize("block", BLOCKS)
def test_error_no_worse_than_bitsandbytes(signed, kind, block):
    x = _state(kind, block * 16, signed, seed=block)
    qmap = quant.dynamic_map(signed, "cpu")
    codes, absmax = quant.encode(x, qmap, block, signed)
    ours = quant.decode(codes, absmax, qmap, block)
    bnb_codes, bnb_state = bnb_functional.quantize_blockwise(x, code=qmap, blocksize=block)
    theirs = bnb_functional.dequantize_blockwise(bnb_codes, bnb_state)
    assert torch.equal(absmax, bnb_state.absmax)
    our_error, their_error = (ours - x).abs(), (theirs - x).abs()
    # elementwise, except where the unsigned map keeps a positive value off zero (bitsandbytes rounds it to 0)
    zero_point = (x > 0) & (theirs == 0)
    assert not zero_point.any() or not signed
    worse = (our_error > their_error * (1 + 1e-6)) & ~zero_point
    assert not worse.any(), (x[worse][:5], ours[worse][:5], theirs[worse][:5])
    assert our_error.max() <= their_error.max() * (1 + 1e-6)
    assert our_error.mean() <= their_error.mean() * (1 + 1e-6)


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("kind", ["normal", "heavy", "second_moment"])
def test_codes_are_the_exact_nearest(signed, kind):
    block = 64
    x = _state(kind, block * 64, signed, seed=7)
    qmap = quant.dynamic_map(signed, "cpu")
    codes, absmax = quant.encode(x, qmap, block, signed)
    decoded = quant.decode(codes, absmax, qmap, block)
    nearest = _exact_nearest(x, qmap, block)
    best = (qmap[nearest].reshape(-1, block) * absmax[:, None]).reshape(-1)
    kept_off_zero = (x > 0) & (best == 0)  # the unsigned zero-point rule, checked separately below
    assert kept_off_zero.any() or signed or kind != "second_moment"
    close = (decoded - x).abs() <= (best - x).abs() * (1 + 1e-6)
    assert close[~kept_off_zero].all()


def test_every_code_round_trips():
    """Each map value times a block scale encodes back to its own index."""
    for signed in (True, False):
        qmap = quant.dynamic_map(signed, "cpu")
        codes, absmax = quant.encode(qmap * 3.0, qmap, 256, signed)
        assert absmax.item() == 3.0
        assert torch.equal(codes.long(), torch.arange(256))


def test_unsigned_positive_never_decodes_to_zero():
    qmap = quant.dynamic_map(False, "cpu")
    x = torch.zeros(64)
    x[0] = 1.0                  # block maximum
    x[1] = 1e-9                 # 10^-9 of the maximum: bitsandbytes rounds this to 0
    x[2] = 1e-30
    x[3] = 0.0                  # a true zero stays zero
    codes, absmax = quant.encode(x, qmap, 64, signed=False)
    decoded = quant.decode(codes, absmax, qmap, 64)
    smallest_positive = qmap[1].item()
    assert decoded[1].item() == smallest_positive and decoded[2].item() == smallest_positive
    assert decoded[3].item() == 0.0
    # exact nearest rounding (bitsandbytes' CUDA kernel rounds to nearest) would give the zero code here
    assert _exact_nearest(x, qmap, 64)[1].item() == 0
    # why it matters: Adam's m / (sqrt(v) + eps) with v decoded to 0 is m / eps
    m, eps = 1e-6, 1e-8
    assert m / (decoded[1].sqrt().item() + eps) < 1.0 < m / (0.0 + eps)


def test_unsigned_map_negative_input_encodes_to_zero():
    qmap = quant.dynamic_map(False, "cpu")
    x = torch.linspace(-1, 1, 64)
    codes, absmax = quant.encode(x, qmap, 64, signed=False)
    decoded = quant.decode(codes, absmax, qmap, 64)
    assert (decoded[x < 0] == 0).all() and (decoded[x > 0] > 0).all()


@pytest.mark.parametrize("signed", [True, False])
def test_zero_block_encodes_to_zero_absmax_and_decodes_to_zeros(signed):
    qmap = quant.dynamic_map(signed, "cpu")
    x = torch.cat([torch.zeros(128), torch.randn(128).abs()])
    codes, absmax = quant.encode(x, qmap, 128, signed)
    assert absmax[0].item() == 0.0
    decoded = quant.decode(codes, absmax, qmap, 128)
    assert torch.equal(decoded[:128], torch.zeros(128))
    assert torch.isfinite(decoded).all()


@pytest.mark.parametrize("signed", [True, False])
def test_subnormal_block_is_scaled_by_smallest_normal_and_decodes_close(signed):
    """Encoding multiplies by 1 / absmax; a subnormal absmax (1e-40: its reciprocal overflows float32) is stored as
    2^-126, and the block decodes within half the widest code gap of that scale, eager and compiled."""
    qmap = quant.dynamic_map(signed, "cpu")
    tiny = torch.finfo(torch.float32).tiny
    x = torch.linspace(-1e-40 if signed else 0.0, 1e-40, 256)
    for encode in (quant.encode, torch.compile(quant.encode, dynamic=False)):
        codes, absmax = encode(x, qmap, 256, signed)
        assert absmax.tolist() == [tiny]
        decoded = quant.decode(codes, absmax, qmap, 256)
        assert torch.isfinite(decoded).all()
        assert (decoded - x).abs().max().item() <= 0.005 * tiny
        assert len(set(codes.tolist())) > 1  # not every value pushed to the largest code


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_block_shows_in_absmax_and_decodes_non_finite(signed, bad):
    qmap = quant.dynamic_map(signed, "cpu")
    x = torch.randn(192).abs()
    x[70] = bad
    codes, absmax = quant.encode(x, qmap, 64, signed)
    assert torch.isfinite(absmax[[0, 2]]).all()
    assert not torch.isfinite(absmax[1])
    assert torch.isnan(absmax[1]) == (bad != bad)
    assert codes.dtype == torch.uint8
    decoded = quant.decode(codes, absmax, qmap, 64)
    assert not torch.isfinite(decoded[64:128]).any()  # every element of the bad block, never silently finite
    assert torch.isfinite(decoded[:64]).all() and torch.isfinite(decoded[128:]).all()


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("block", [64, 4096])
def test_decodes_bitsandbytes_codes_exactly(signed, block):
    """state_dict compatibility: codes written by bitsandbytes decode as bitsandbytes decodes them."""
    x = _state("heavy", block * 4, signed, seed=3)
    qmap = quant.dynamic_map(signed, "cpu")
    bnb_codes, state = bnb_functional.quantize_blockwise(x, code=qmap, blocksize=block)
    expected = bnb_functional.dequantize_blockwise(bnb_codes, state)
    assert torch.equal(quant.decode(bnb_codes, state.absmax, qmap, block), expected)


def _edge_blocks(signed: bool, block: int) -> torch.Tensor:
    """Blocks that probe the code arithmetic: every map value, and values next to each decade threshold."""
    qmap = quant.dynamic_map(signed, "cpu")
    codes_block = torch.cat([qmap * 3.0, torch.zeros(block - 256)])
    thresholds = torch.tensor([10.0 ** e for e in range(-7, 0)], dtype=torch.float32)
    near = torch.cat([thresholds, torch.nextafter(thresholds, torch.zeros(7)), torch.nextafter(thresholds, torch.ones(7))])
    g = torch.Generator().manual_seed(2)
    log_uniform = torch.pow(10.0, -8 * torch.rand(block - near.numel() - 1, generator=g))
    threshold_block = torch.cat([near, log_uniform, torch.ones(1)])
    if signed:
        threshold_block = threshold_block * torch.where(torch.rand(block, generator=g) < 0.5, -1.0, 1.0)
    return torch.cat([codes_block, threshold_block])


@pytest.mark.parametrize("signed", [True, False])
def test_compiled_equals_eager_bit_for_bit(signed):
    """Compiled, the decade comes from compare/select chains, eager from bucketize: same codes to the bit."""
    block = 256
    x = torch.cat([_edge_blocks(signed, block), _state("second_moment", block * 4, signed, seed=5),
                   torch.zeros(block)])
    qmap = quant.dynamic_map(signed, "cpu")

    def round_trip(values):
        codes, absmax = quant.encode(values, qmap, block, signed)
        return codes, absmax, quant.decode(codes, absmax, qmap, block)

    eager = round_trip(x)
    assert torch.equal(eager[0][:256].long(), torch.arange(256))  # every map value encodes to its own index
    # fullgraph: no graph break, so the codec fuses into the caller's compiled step
    for eager_out, compiled_out in zip(eager, torch.compile(round_trip, dynamic=False, fullgraph=True)(x)):
        assert torch.equal(eager_out, compiled_out)


@pytest.mark.parametrize("signed", [True, False])
def test_codes_next_to_decade_thresholds_are_the_exact_nearest(signed):
    block = 256
    x = _edge_blocks(signed, block)
    qmap = quant.dynamic_map(signed, "cpu")
    codes, absmax = quant.encode(x, qmap, block, signed)
    decoded = quant.decode(codes, absmax, qmap, block)
    nearest = _exact_nearest(x, qmap, block)
    best = (qmap[nearest].reshape(-1, block) * absmax[:, None]).reshape(-1)
    kept_off_zero = (x > 0) & (best == 0)
    assert ((decoded - x).abs() <= (best - x).abs() * (1 + 1e-6))[~kept_off_zero].all()


# encode's arithmetic (a * inverse spacing + offset, float32) may pick the other neighbour only this close to a
# midpoint, in spacings between the two codes: its rounding errors add up to ~4e-5 of a spacing (quant._build_regions)
NEAR_TIE_SPACINGS = 1e-4


def _steps_from(values: torch.Tensor, towards: float, count: int) -> torch.Tensor:
    """``values`` moved by 1..count float32 steps towards ``towards``, (count, n)."""
    out, current = [], values
    for _ in range(count):
        current = torch.nextafter(current, torch.full_like(current, towards))
        out.append(current)
    return torch.stack(out)


def _in_blocks_of_max_one(a: torch.Tensor, block: int = 256) -> torch.Tensor:
    """Values ``a`` in [0, 1] laid out in blocks whose last element is 1.0, so ``|x| / absmax`` is ``a`` exactly."""
    a = torch.cat([a, torch.zeros((-a.numel()) % (block - 1))]).reshape(-1, block - 1)
    return torch.cat([a, torch.ones(a.shape[0], 1)], dim=1).reshape(-1)


@pytest.mark.parametrize("signed", [True, False])
def test_codes_differ_from_exact_nearest_only_at_near_ties(signed):
    """encode rounds arithmetically within a decade, so at a float near-tie it may pick the other neighbour:
    every code is the exact nearest (argmin over the map) except within NEAR_TIE_SPACINGS of the midpoint between
    two codes (in units of their spacing), and there it is one of those two. Probed densely: every midpoint +- 32
    float32 steps and +- 1e-6..1e-3 spacings, every code, and 2^16 log-uniform values over 10^-9..1."""
    qmap = quant.dynamic_map(signed, "cpu")
    mid = quant.midpoints(signed, "cpu")
    spacing = qmap[1:] - qmap[:-1]
    g = torch.Generator().manual_seed(11)
    fractions = torch.logspace(-6, -3, 16)
    near = [mid + sign * f * spacing for f in fractions for sign in (-1.0, 1.0)]
    a = torch.cat([mid, _steps_from(mid, 0.0, 32).reshape(-1), _steps_from(mid, 2.0, 32).reshape(-1), *near,
                   qmap.abs(), torch.pow(10.0, -9 * torch.rand(1 << 16, generator=g))]).clamp(0.0, 1.0)
    x = _in_blocks_of_max_one(a)
    if signed:
        x = x * torch.where(torch.rand(x.numel(), generator=g) < 0.5, -1.0, 1.0)
        x.view(-1, 256)[:, -1] = 1.0
    codes = quant.encode(x, qmap, 256, signed)[0].long()
    exact = (qmap[None, :].double() - x[:, None].double()).abs().argmin(dim=1)  # absmax is 1.0: no scaling
    exact = torch.where((x > 0) & (exact == 0) & (not signed), 1, exact)  # the unsigned no-zero-point rule
    distance = (x.abs()[:, None].double() - mid[None, :].double()).abs()
    nearest_mid = distance.argmin(dim=1)
    spacings_to_midpoint = distance.min(dim=1).values / spacing[nearest_mid].double()
    differs = codes != exact
    assert differs.any(), "the probe should reach some near-ties"
    too_far = spacings_to_midpoint[differs] > NEAR_TIE_SPACINGS
    assert not too_far.any(), (x[differs][too_far], spacings_to_midpoint[differs][too_far])
    assert ((codes - exact).abs() <= 1).all()


@pytest.mark.parametrize("signed", [True, False])
def test_region_thresholds_are_exact(signed):
    """Between decades (and next to 0 and 1.0) encode compares with exact rounding thresholds: a value at
    mid[i] (the largest float32 <= the midpoint of codes i and i + 1) gets code i, the next float32 code i + 1."""
    qmap = quant.dynamic_map(signed, "cpu")
    mid = quant.midpoints(signed, "cpu")
    exact = (qmap[:-1].double() + qmap[1:].double()) / 2
    above = torch.nextafter(mid, torch.full_like(mid, 2.0))
    assert (mid.double() <= exact).all() and (above.double() > exact).all()
    first_codes = [start for start, _ in quant._region_layout(signed)[1:]]
    index = torch.tensor(first_codes) - 1  # the last code of each region but the last one
    codes = quant.encode(_in_blocks_of_max_one(torch.stack([mid[index], above[index]], dim=1).reshape(-1)),
                         qmap, 256, signed)[0].long()
    expected = torch.stack([index, index + 1], dim=1)
    if not signed:  # below the first positive code: the no-zero-point rule gives code 1 (tested above)
        expected = expected.clamp(min=1)
    assert torch.equal(codes[: 2 * len(index)].view(-1, 2), expected)


def test_bad_block_size_is_a_clear_error():
    qmap = quant.dynamic_map(True, "cpu")
    with pytest.raises(ValueError, match="block size 100 .* 256"):
        quant.encode(torch.zeros(256), qmap, 100, True)
    with pytest.raises(ValueError, match="block size 0"):
        quant.decode(torch.zeros(256, dtype=torch.uint8), torch.zeros(1), qmap, 0)


@pytest.mark.parametrize("signed", [True, False])
def test_every_code_decodes_to_its_map_value_eager_and_compiled(signed):
    """decode's unchecked lookup (aten._unsafe_index) gives qmap[code] * absmax to the bit, all 256 codes,
    eager and compiled, including the zero, non-finite and huge absmax blocks."""
    qmap = quant.dynamic_map(signed, "cpu")
    absmax = torch.tensor([1.0, 3.7e-3, 0.0, 1e30, float("inf"), float("nan")])
    codes = torch.arange(256, dtype=torch.uint8).repeat(len(absmax))
    expected = (qmap[torch.arange(256)][None, :] * absmax[:, None]).reshape(-1)
    eager = quant.decode(codes, absmax, qmap, 256)
    compiled = torch.compile(quant.decode, dynamic=False, fullgraph=True)(codes, absmax, qmap, 256)
    for decoded in (eager, compiled):
        assert torch.equal(decoded.view(torch.int32), expected.view(torch.int32))


def test_decode_rejects_codes_or_map_its_lookup_could_overrun():
    qmap = quant.dynamic_map(True, "cpu")
    with pytest.raises(ValueError, match="uint8 codes"):
        quant.decode(torch.zeros(256, dtype=torch.int32), torch.zeros(1), qmap, 256)
    with pytest.raises(ValueError, match="256-entry map"):
        quant.decode(torch.zeros(256, dtype=torch.uint8), torch.zeros(1), qmap[:128], 256)
