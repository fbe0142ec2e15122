"""C-Optim context: a real gradient cosine, bounded multiplier, edge cases, loss trend, multi-scale momentum."""

import copy

import pytest
import torch

from library.hina import Automagic_CameAMP_COptim, Automagic_CameAMP_COptim8bit
from library.hina.techniques.contextual import MULTIPLIER_BOUNDS, sketch
from library.hina.techniques.multiscale_momentum import scale_betas, scale_weights

CLASSES = [Automagic_CameAMP_COptim, Automagic_CameAMP_COptim8bit]


def make(cls, **kwargs):
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in ((64, 32), (32,), (16, 64))]
    extra = dict(blocksize=256, min_8bit_size=0) if "8bit" in cls.__name__ else {}
    return params, cls(params, lr=1e-3, warmup_steps=0, **extra, **kwargs)


def step_with(opt, params, grads):
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt.step()


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_consistency_is_a_real_cosine(cls):
    params, opt = make(cls)
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(p.shape, generator=g) for p in params]
    assert opt.c_optim.compute_gradient_consistency() == 0.0
    step_with(opt, params, grads)
    step_with(opt, params, grads)  # identical successive gradients
    assert opt.c_optim.compute_gradient_consistency() == pytest.approx(1.0, abs=1e-6)
    step_with(opt, params, [-x for x in grads])  # opposite
    assert opt.c_optim.compute_gradient_consistency() == pytest.approx(-1.0, abs=1e-6)
    step_with(opt, params, [2.0 * x for x in grads])  # scale does not matter, only direction
    assert opt.c_optim.compute_gradient_consistency() == pytest.approx(-1.0, abs=1e-6)
    other = [torch.randn(p.shape, generator=g) for p in params]
    step_with(opt, params, other)  # independent directions: near 0
    assert abs(opt.c_optim.compute_gradient_consistency()) < 0.3


def test_sketch_is_a_linear_projection_preserving_inner_products_on_average():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(100_000, generator=g), torch.randn(100_000, generator=g)
    torch.testing.assert_close(sketch(a + 2 * b), sketch(a) + 2 * sketch(b), rtol=1e-4, atol=1e-4)
    c = a + 0.5 * b  # true cosine(a, c) = 1 / sqrt(1.25) = 0.894
    sa, sc = sketch(a), sketch(c)
    cos = float(torch.dot(sa, sc) / (sa.norm() * sc.norm()))
    assert abs(cos - 0.894) < 0.1


def test_sketch_of_a_block_view_is_the_same_projection():
    """A chunk buffer viewed (blocks, block) is sketched block row by block row: the same projection as the flat
    buffer's, sum_j x[i L + j] signs[j] for bucket i, written out here (only the order of the sums differs)."""
    from library.hina.techniques.contextual import chunk_length, sketch_signs

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1 << 16, generator=g)
    length, signs = chunk_length(x.numel()), sketch_signs(x.numel(), x.device)
    expected = torch.stack([(x[i * length:(i + 1) * length].double() * signs.double()).sum()
                            for i in range(x.numel() // length)]).float()
    for view in (x, x.view(-1, 64), x.view(-1, 256)):
        torch.testing.assert_close(sketch(view), expected, rtol=1e-5, atol=1e-4)
    odd = torch.randn(1000, generator=g)  # buckets that are not whole blocks: the flat form
    torch.testing.assert_close(sketch(odd.view(-1, 8)), sketch(odd), rtol=0, atol=0)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_multiplier_is_bounded_and_edge_cases_detected(cls):
    params, opt = make(cls, context_window=8, adaptation_rate=0.5)
    g = torch.Generator().manual_seed(2)
    base = [torch.randn(p.shape, generator=g) for p in params]
    for _ in range(6):  # consistent direction: the multiplier rises above 1
        step_with(opt, params, base)
    high = opt.c_optim.compute_contextual_lr_multiplier()
    assert 1.0 < high <= MULTIPLIER_BOUNDS[1]
    assert not opt.c_optim.detect_edge_case()
    step_with(opt, params, [100.0 * x for x in base])  # gradient-norm spike
    assert opt.c_optim.detect_edge_case()
    assert opt.c_optim.compute_contextual_lr_multiplier() < high
    for i in range(1, 7):  # oscillation: each gradient reverses the last
        step_with(opt, params, [(-1) ** i * x for x in base])
        assert opt.c_optim.detect_edge_case()
        m = opt.c_optim.compute_contextual_lr_multiplier()
        assert MULTIPLIER_BOUNDS[0] <= m <= MULTIPLIER_BOUNDS[1]
    assert m < 0.6


def test_observed_loss_trend_is_used():
    params, opt = make(Automagic_CameAMP_COptim, context_window=8)
    g = torch.Generator().manual_seed(3)
    for i in range(8):
        opt.observe_loss(torch.tensor(1.0 + 0.5 * i))  # a rising loss
        step_with(opt, params, [torch.randn(p.shape, generator=g) for p in params])
    assert opt.c_optim.detect_edge_case()
    params, opt = make(Automagic_CameAMP_COptim, context_window=8)
    g = torch.Generator().manual_seed(3)
    for i in range(8):  # a closure's loss is observed too, and a falling loss raises the multiplier
        def closure(i=i):
            return torch.tensor(4.0 - 0.4 * i)
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step(closure)
    assert not opt.c_optim.detect_edge_case()
    assert opt.c_optim.compute_contextual_lr_multiplier() > 1.0


def test_multiplier_scales_the_step():
    params, opt = make(Automagic_CameAMP_COptim, context_window=8, adaptation_rate=1.0)
    g = torch.Generator().manual_seed(4)
    grads = [torch.randn(p.shape, generator=g) for p in params]
    for _ in range(3):
        step_with(opt, params, grads)
    twin_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    twin = Automagic_CameAMP_COptim(twin_params, lr=1e-3, warmup_steps=0, context_window=8, adaptation_rate=1.0)
    twin.load_state_dict(copy.deepcopy(opt.state_dict()))
    anchor = twin.param_groups[0]["params"][0]
    twin.state[anchor]["context_multiplier"].fill_(1.0)
    before = [p.detach().clone() for p in params]
    m = opt.c_optim.compute_contextual_lr_multiplier()
    assert m != 1.0
    step_with(opt, params, grads)
    step_with(twin, twin_params, grads)
    d_opt = torch.cat([(p.detach() - b).reshape(-1) for p, b in zip(params, before)])
    d_twin = torch.cat([(p.detach() - b).reshape(-1) for p, b in zip(twin_params, before)])
    # weight decay (lr * wd * p) is not scaled by the multiplier: compare without it
    wd = [b * 1e-3 * 5e-4 for b in before]
    d_opt += torch.cat([w.reshape(-1) for w in wd])
    d_twin += torch.cat([w.reshape(-1) for w in wd])
    torch.testing.assert_close(d_opt, m * d_twin, rtol=1e-4, atol=1e-6)  # fp32 rounding of p ~ 1


def test_context_lives_in_the_state_dict():
    params, opt = make(Automagic_CameAMP_COptim)
    step_with(opt, params, [torch.ones(p.shape) for p in params])
    saved = opt.state_dict()["state"][0]
    for key in ("context_prev_sketch", "context_consistency", "context_grad_norm", "context_loss",
                "context_multiplier", "context_edge", "context_count"):
        assert key in saved


def test_multiscale_weights_favour_short_scales_and_reduce_to_momentum():
    w = scale_weights([1, 5, 10, 25])
    assert abs(sum(w) - 1.0) < 1e-12 and w == sorted(w, reverse=True)
    assert scale_betas(0.8, [1]) == [0.8]  # scale 1 alone: m = beta1 m + (1 - beta1) x
    assert scale_betas(0.8, [1, 5]) == pytest.approx([0.8, 0.96])  # beta_5 = 1 - 0.2 / 5
