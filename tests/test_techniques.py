"""Each technique against its paper's equation, written out plainly per tensor on small tensors."""

import math

import pytest
import torch

from library.hina.pack import FlatPack
from library.hina.techniques.adopt import adopt_normalize
from library.hina.techniques.agr import agr
from library.hina.techniques.alora import coefficient, row_coefficients
from library.hina.techniques.cautious import cautious
from library.hina.techniques.grams import grams
from library.hina.techniques.orthogonal import orthogonalize
from library.hina.techniques.spd import spd_ratio
from library.hina.techniques.tam import tam_step
from library.hina.techniques.weight_decay import floor_reached_at, weight_decay_ratio

SHAPES = [(3, 5), (7,), (2, 3, 2, 2)]


def make(seed, align=1):
    g = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(s, generator=g) for s in SHAPES]
    pack = FlatPack(tensors, list(range(len(tensors))), align=align)
    return pack, tensors


def flat(pack, tensors):
    return pack.gather(tensors, pack.zeros())


def test_agr_on_a_one_element_tensor_is_exactly_zero():
    """g (1 - |g| / sum|g|) = 0 for a single element: exactly, for 2000 values (a reciprocal left 1-ulp residues)."""
    values = torch.randn(2000, generator=torch.Generator().manual_seed(0)) * torch.logspace(-6, 6, 2000)
    tensors = [v.reshape(1) for v in values]
    pack = FlatPack(tensors, list(range(len(tensors))), align=64)
    out = agr(pack.gather(tensors, pack.zeros()), pack.segments)
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("align", [1, 64])
def test_agr_matches_equation(align):
    pack, grads = make(0, align)
    buf = agr(flat(pack, grads), pack.segments)
    for got, g in zip(pack.views(buf), grads):
        alpha = g.abs() / g.abs().sum()
        torch.testing.assert_close(got, g * (1 - alpha))


def test_agr_zero_gradient_stays_zero():
    pack, grads = make(0)
    buf = agr(pack.zeros(), pack.segments)
    assert torch.equal(buf, pack.zeros())


@pytest.mark.parametrize("align", [1, 64])
def test_orthogonal_grad_matches_equation(align):
    pack, weights = make(1, align)
    _, grads = make(2, align)
    buf = orthogonalize(flat(pack, grads), flat(pack, weights), pack.segments)
    for got, w, g in zip(pack.views(buf), weights, grads):
        w, g = w.flatten().double(), g.flatten().double()
        perp = g - (w @ g) / (w @ w) * w
        expected = perp * g.norm() / perp.norm()
        torch.testing.assert_close(got.flatten().double(), expected, rtol=1e-5, atol=1e-6)
        assert abs(float(got.flatten().double() @ w)) < 1e-4  # orthogonal to the weight


def test_adopt_normalize_matches_equation():
    g = torch.randn(50) * 10
    v = torch.rand(50) * 1e-3
    v[0] = 0.0  # max(sqrt(v), eps) with v = 0 uses eps
    out = adopt_normalize(g, v, 1e-6, torch.tensor(16.0) ** 0.25)  # after 16 completed steps
    expected = (g / torch.clamp(v.sqrt(), min=1e-6)).clamp(-2.0, 2.0)  # 16 ** 0.25 = 2
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("align", [1, 64])
def test_tam_damping_matches_equation(align):
    pack, momenta = make(3, align)
    _, grads = make(4, align)
    smoothed = torch.tensor([0.2, -0.5, 0.0])
    before = smoothed.clone()
    d, smoothed = tam_step(flat(pack, momenta), flat(pack, grads), smoothed, 0.9, pack.segments)
    for i, (m, g) in enumerate(zip(momenta, grads)):
        cos = float(m.flatten() @ g.flatten() / (m.norm() * g.norm()))
        s = 0.9 * float(before[i]) + 0.1 * cos
        assert float(smoothed[i]) == pytest.approx(s, rel=1e-5)
        assert float(d[i]) == pytest.approx((1 + s) / 2 + 1e-8, rel=1e-5)


def test_grams_matches_equation():
    u = torch.randn(100)
    g = torch.randn(100)
    g[::7] = 0.0
    expected = u.abs() * torch.sign(g)
    assert torch.equal(grams(u, g), expected)


@pytest.mark.parametrize("align", [1, 64])
def test_cautious_matches_equation(align):
    pack, updates = make(5, align)
    _, grads = make(6, align)
    buf = cautious(flat(pack, updates), flat(pack, grads), pack.segments)
    for got, u, g in zip(pack.views(buf), updates, grads):
        phi = (u * g > 0).float()
        torch.testing.assert_close(got, u * phi * (phi.numel() / (phi.sum() + 1)))


def test_cautious_after_grams_keeps_every_component_with_a_gradient():
    u, g = torch.randn(64), torch.randn(64)
    pack = FlatPack([u], [0])
    u = grams(u, g)
    before = u.clone()
    u = cautious(u, g, pack.segments)
    # Every sign agrees, so Cautious only rescales by numel / (kept + 1).
    torch.testing.assert_close(u, before * (64 / 65))


def test_spd_ratio_matches_equation():
    p0 = torch.zeros(10)
    p = torch.randn(10)
    g = torch.randn(10)
    p_new = p - 0.1 * torch.randn(10)
    c = -float(g @ (p - p0))
    old, new = (p - p0).norm(), (p_new - p0).norm()
    r = min(max(float((new - old) / new), 0.0), 1.0)
    expected = 0.06 * r if c < 0 else 0.0
    got = spd_ratio(torch.tensor([float(g @ (p - p0))]), old.reshape(1), new.reshape(1), 0.06)
    assert float(got[0]) == pytest.approx(expected, abs=1e-7)


def test_spd_ratio_is_zero_when_the_gradient_points_toward_the_anchor():
    got = spd_ratio(torch.tensor([-1.0]), torch.tensor([1.0]), torch.tensor([2.0]), 0.5)
    assert float(got[0]) == 0.0


def test_alora_row_coefficient_matches_equation():
    w = torch.randn(4, 6)
    torch.testing.assert_close(coefficient(w), 1 / torch.sqrt(1 + (w ** 2).sum(1, keepdim=True)))


def test_dynamic_weight_decay_reproduces_the_seed_table():
    ratio = lambda t: weight_decay_ratio(t, 1000, 0.7, 0.1)  # noqa: E731
    assert ratio(0) == ratio(1000) == 1.0
    assert ratio(1500) == pytest.approx(0.84, abs=0.005)
    assert ratio(2000) == pytest.approx(0.70, abs=1e-9)
    assert ratio(3000) == pytest.approx(0.49, abs=1e-9)
    # The seed's "5000+: 10%" row does not follow from the formula (documented in weight_decay.py).
    assert ratio(5000) == pytest.approx(0.7 ** 4)
    assert ratio(100_000) == 0.1
    assert floor_reached_at(1000, 0.7, 0.1) == pytest.approx(1000 * (1 + math.log(0.1) / math.log(0.7)))


@pytest.mark.parametrize("align", [1, 64])
def test_alora_row_coefficients_on_the_flat_pack_match_per_tensor(align):
    """u_row / sqrt(1 + ||w_row||^2) for selected tensors of two dimensions or more, written out per tensor."""
    shapes = [(4, 32), (8, 32), (3, 5), (6, 5), (7,), (2, 3, 3, 3)]
    g = torch.Generator().manual_seed(7)
    weights = [torch.randn(s, generator=g) for s in shapes]
    updates = [torch.randn(s, generator=g) for s in shapes]
    pack = FlatPack(weights, list(range(len(shapes))), align=align)
    selected = [True, True, True, False, True, True]
    flat_update = flat(pack, updates) * row_coefficients(flat(pack, weights), pack, selected, torch.empty(pack.total))
    for got, u, w, chosen in zip(pack.views(flat_update), updates, weights, selected):
        expected = u.clone()
        if chosen and w.dim() >= 2:
            rows = w.reshape(w.shape[0], -1)
            expected = (u.reshape(rows.shape) / torch.sqrt(1 + (rows ** 2).sum(1, keepdim=True))).reshape(u.shape)
        torch.testing.assert_close(got, expected)


def test_chunk_math_keeps_the_block_shape_and_its_values():
    """The fused steps compute in ``Segments.blocks``' (num_blocks, block) shape, so that inductor fuses a chunk's
    step into one loop: every technique applied to a chunk buffer returns the shape it was given, with the same
    values either way (flat in, flat out)."""
    from library.hina.base import decoupled_update

    pack, _ = make(3, align=4)
    _, other = make(4, align=4)
    segments, block = pack.segments, pack.segments.block
    g, w = flat(pack, make(5, align=4)[1]), flat(pack, other)
    per_tensor = torch.tensor([0.5, 0.25, 2.0])
    cases = {
        "agr": lambda g, w: agr(g, segments),
        "orthogonalize": lambda g, w: orthogonalize(g, w, segments),
        "cautious": lambda g, w: cautious(g, w, segments),
        "adopt": lambda g, w: adopt_normalize(g, w.abs(), 1e-8, torch.tensor(2.0), block),
        "decoupled_update+spd": lambda g, w: decoupled_update(w, g, g, None, segments, per_tensor, 1 - per_tensor,
                                                              0.06, spd=True),
    }
    for name, fn in cases.items():
        on_flat, on_blocks = fn(g, w), fn(segments.blocks(g), segments.blocks(w))
        assert on_flat.shape == g.shape and on_blocks.shape == (g.numel() // block, block), name
        assert torch.equal(on_blocks.reshape(-1), on_flat), name
