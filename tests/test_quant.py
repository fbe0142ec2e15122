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


@pytest.mark.parametrize("signed", [True, False])
def test_midpoint_table_is_the_exact_rounding_threshold(signed):
    """encode's one lookup: mid[i] is the largest float32 <= the midpoint of codes i and i + 1, so a value at
    mid[i] rounds down (a tie goes to the lower code) and the next float32 above it rounds up."""
    qmap = quant.dynamic_map(signed, "cpu")
    mid = quant.midpoints(signed, "cpu")[:255]
    exact = (qmap[:-1].double() + qmap[1:].double()) / 2
    above = torch.nextafter(mid, torch.full_like(mid, 2.0))
    assert (mid.double() <= exact).all() and (above.double() > exact).all()
    start = 128 if signed else 1  # positive codes with a positive neighbour above (the mirrored side is tested above)
    index = torch.arange(start, 255)
    x = torch.stack([mid[index], above[index]], dim=1)  # each pair in its own 64-element block of max 1.0
    blocks = torch.cat([x, torch.zeros(len(index), 61), torch.ones(len(index), 1)], dim=1).reshape(-1)
    codes, absmax = quant.encode(blocks, qmap, 64, signed)
    codes = codes.reshape(-1, 64).long()
    assert (absmax == 1.0).all()
    assert torch.equal(codes[:, 0], index) and torch.equal(codes[:, 1], index + 1)


def test_bad_block_size_is_a_clear_error():
    qmap = quant.dynamic_map(True, "cpu")
    with pytest.raises(ValueError, match="block size 100 .* 256"):
        quant.encode(torch.zeros(256), qmap, 100, True)
    with pytest.raises(ValueError, match="block size 0"):
        quant.decode(torch.zeros(256, dtype=torch.uint8), torch.zeros(1), qmap, 0)
