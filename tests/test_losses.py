"""Noise and loss options against their equations written out plainly on small tensors."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from library.hina_train import losses, noise
from library.hina_train.model_loading import noise_scheduler


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# --- loss types and the Huber schedules (arXiv 2403.16728) ---------------------------------------------
def test_loss_types_match_their_formulas():
    pred = torch.tensor([[0.5, -1.0, 2.0]])
    target = torch.tensor([[0.0, 1.0, 2.5]])
    c = torch.tensor([0.3])
    d = [0.5, -2.0, -0.5]
    expected = {
        "l2": [x * x for x in d],
        "l1": [abs(x) for x in d],
        "huber": [2 * 0.3 * (math.sqrt(x * x + 0.09) - 0.3) for x in d],
        "smooth_l1": [2 * (math.sqrt(x * x + 0.09) - 0.3) for x in d],
    }
    for loss_type, values in expected.items():
        got = losses.elementwise_loss(pred, target, loss_type, c)
        assert torch.allclose(got, torch.tensor([values]), atol=1e-6), loss_type


def test_huber_per_sample_c_broadcasts_over_the_sample():
    pred = torch.ones(2, 1, 2, 2)
    target = torch.zeros(2, 1, 2, 2)
    got = losses.elementwise_loss(pred, target, "huber", torch.tensor([0.1, 1.0]))
    assert torch.allclose(got[0], torch.full((1, 2, 2), 2 * 0.1 * (math.sqrt(1.01) - 0.1)))
    assert torch.allclose(got[1], torch.full((1, 2, 2), 2 * 1.0 * (math.sqrt(2.0) - 1.0)))


def test_huber_schedules():
    sched = noise_scheduler()
    ac = sched.alphas_cumprod
    t = torch.tensor([0, 500, 999])
    const = losses.huber_c(t, ac, "constant", 0.1, 2.0, 1000)
    assert torch.allclose(const, torch.full((3,), 0.2))
    expo = losses.huber_c(t, ac, "exponential", 0.1, 1.0, 1000)
    alpha = -math.log(0.1) / 1000
    assert torch.allclose(expo, torch.tensor([math.exp(-alpha * x) for x in (0, 500, 999)]))
    assert expo[0] == pytest.approx(1.0) and expo[-1] == pytest.approx(0.1, rel=0.01)
    snr_c = losses.huber_c(t, ac, "snr", 0.1, 1.0, 1000)
    for k, step in enumerate((0, 500, 999)):
        a = float(ac[step])
        sigma = math.sqrt((1 - a) / a)
        assert float(snr_c[k]) == pytest.approx((1 - 0.1) / (1 + sigma) ** 2 + 0.1, rel=1e-5)


# --- weightings ----------------------------------------------------------------------------------------
def test_debiased_estimation_weights():
    ac = noise_scheduler().alphas_cumprod
    t = torch.tensor([0, 10, 500, 999])
    got = losses.debiased_weights(t, ac, v_prediction=False)
    got_v = losses.debiased_weights(t, ac, v_prediction=True)
    for k, step in enumerate(t.tolist()):
        snr = min(float(ac[step]) / (1 - float(ac[step])), 1000.0)
        assert float(got[k]) == pytest.approx(1 / math.sqrt(snr), rel=1e-5)
        assert float(got_v[k]) == pytest.approx(1 / (snr + 1), rel=1e-5)


def test_prior_loss_weight_applies_to_regularisation_images_only():
    reg = SimpleNamespace(subset=SimpleNamespace(is_reg=True))
    train = SimpleNamespace(subset=SimpleNamespace(is_reg=False))
    assert losses.prior_weights([train, reg, reg], 0.25).tolist() == [1.0, 0.25, 0.25]


# --- max-norm regularisation (kohya's apply_max_norm_regularization) -----------------------------------
class _TwoLoras(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.big = torch.nn.Module()
        self.big.lora_down = torch.nn.Linear(3, 2, bias=False)
        self.big.lora_up = torch.nn.Linear(2, 4, bias=False)
        self.big.register_buffer("alpha", torch.tensor(1.0))
        self.small = torch.nn.Module()
        self.small.lora_down = torch.nn.Linear(3, 2, bias=False)
        self.small.lora_up = torch.nn.Linear(2, 4, bias=False)
        self.small.register_buffer("alpha", torch.tensor(2.0))
        with torch.no_grad():
            self.big.lora_down.weight.copy_(torch.arange(6.0).view(2, 3))
            self.big.lora_up.weight.copy_(torch.arange(8.0).view(4, 2))
            self.small.lora_down.weight.fill_(0.01)
            self.small.lora_up.weight.fill_(0.01)


def test_max_norm_scales_only_modules_above_the_norm():
    net = _TwoLoras()
    big_delta = (net.big.lora_up.weight @ net.big.lora_down.weight).detach() * (1.0 / 2)
    big_norm = float(big_delta.norm())
    small_norm = float((net.small.lora_up.weight @ net.small.lora_down.weight).detach().norm()) * (2.0 / 2)
    small_before = net.small.lora_up.weight.clone()
    scaled, mean_norm, max_norm = losses.apply_max_norm(net, 1.0)
    assert big_norm > 1.0 > small_norm and scaled == 1
    after = float((net.big.lora_up.weight @ net.big.lora_down.weight).detach().norm()) / 2
    assert after == pytest.approx(1.0, rel=1e-5)  # ‖ΔW‖ brought to the max norm
    ratio = math.sqrt(1.0 / big_norm)  # up and down each scaled by sqrt(m / ‖ΔW‖)
    assert torch.allclose(net.big.lora_down.weight, torch.arange(6.0).view(2, 3) * ratio)
    assert torch.equal(net.small.lora_up.weight, small_before)
    assert max_norm == pytest.approx(1.0, rel=1e-5)
    assert mean_norm == pytest.approx((1.0 + small_norm) / 2, rel=1e-5)


# --- noise ---------------------------------------------------------------------------------------------
def test_offset_noise_adds_one_value_per_channel():
    base = torch.zeros(2, 3, 4, 4)
    g = _gen(1)
    got = noise.offset_noise(base, 0.5, False, g)
    expected = 0.5 * torch.randn((2, 3, 1, 1), generator=_gen(1))
    assert torch.allclose(got, expected.expand(2, 3, 4, 4))
    g = _gen(2)
    got = noise.offset_noise(base, 0.5, True, g)
    g2 = _gen(2)
    strength = float(torch.rand(1, generator=g2)) * 0.5
    assert torch.allclose(got, (strength * torch.randn((2, 3, 1, 1), generator=g2)).expand(2, 3, 4, 4))


def test_pyramid_noise_written_out():
    base = torch.randn(1, 2, 8, 8, generator=_gen(3))
    got = noise.pyramid_noise(base, iterations=3, discount=0.5, generator=_gen(4))
    g = _gen(4)
    expected = base.clone()
    for i in range(3):
        r = float(torch.rand((), generator=g)) * 2 + 2
        hn, wn = max(1, int(8 / r**i)), max(1, int(8 / r**i))
        low = torch.randn((1, 2, hn, wn), generator=g)
        expected += torch.nn.functional.interpolate(low, size=(8, 8), mode="bilinear") * 0.5**i
        if hn == 1 or wn == 1:
            break
    expected /= expected.std()
    assert torch.allclose(got, expected, atol=1e-6)
    assert float(got.std()) == pytest.approx(1.0, rel=1e-5)


def test_input_perturbation_changes_the_input_noise_only():
    eps = torch.randn(2, 4, 3, 3, generator=_gen(5))
    args = SimpleNamespace(ip_noise_gamma=0.1, ip_noise_gamma_random_strength=False)
    got = noise.input_noise(eps, args, _gen(6))
    assert torch.allclose(got, eps + 0.1 * torch.randn(eps.shape, generator=_gen(6)))
    args = SimpleNamespace(ip_noise_gamma=0.1, ip_noise_gamma_random_strength=True)
    g = _gen(7)
    gamma = float(torch.rand(1, generator=g)) * 0.1
    assert torch.allclose(noise.input_noise(eps, args, _gen(7)), eps + gamma * torch.randn(eps.shape, generator=g))
    assert noise.input_noise(eps, SimpleNamespace(ip_noise_gamma=None), _gen(0)) is eps


def test_zero_terminal_snr_rescale():
    betas = torch.linspace(0.0001, 0.02, 10, dtype=torch.float64)
    new = noise.zero_terminal_snr_betas(betas)
    old_sqrt = torch.cumprod(1 - betas, 0).sqrt()
    new_sqrt = torch.cumprod(1 - new, 0).sqrt()
    expected = (old_sqrt - old_sqrt[-1]) * old_sqrt[0] / (old_sqrt[0] - old_sqrt[-1])
    assert torch.allclose(new_sqrt, expected, atol=1e-12)
    assert float(new_sqrt[-1]) == pytest.approx(0.0, abs=1e-12)  # SNR_T = 0
    assert float(new_sqrt[0]) == pytest.approx(float(old_sqrt[0]))
    sched = noise_scheduler()
    noise.apply_zero_terminal_snr(sched)
    assert float(sched.alphas_cumprod[-1]) == pytest.approx(0.0, abs=1e-7)
    assert torch.allclose(sched.alphas_cumprod, torch.cumprod(1 - sched.betas, 0))


def test_adaptive_noise_scale_adds_the_latent_mean_to_the_offset():
    base = torch.zeros(2, 3, 4, 4)
    latents = torch.randn(2, 3, 4, 4, generator=_gen(8)) + torch.tensor([1.0, -2.0, 0.0]).view(1, 3, 1, 1)
    got = noise.offset_noise(base, 0.1, False, _gen(9), latents, adaptive_scale=0.5)
    offset = torch.empty(2, 3, 1, 1)
    for b in range(2):
        for c in range(3):  # o_bc = max(0, o + s·|mean over h, w|), written out
            offset[b, c] = max(0.0, 0.1 + 0.5 * abs(float(latents[b, c].mean())))
    expected = offset * torch.randn((2, 3, 1, 1), generator=_gen(9))
    assert torch.allclose(got, expected.expand(2, 3, 4, 4), atol=1e-6)
    negative = noise.offset_noise(base, 0.1, False, _gen(9), latents, adaptive_scale=-10.0)
    assert torch.equal(negative, torch.zeros_like(base))  # clamped at 0, as kohya


def test_snr_scale_and_v_pred_like_loss_written_out():
    ac = noise_scheduler().alphas_cumprod
    t = torch.tensor([0, 10, 500, 999])
    scale = losses.snr_scale(t, ac)
    for k, step in enumerate(t.tolist()):
        snr_t = min(float(ac[step]) / (1 - float(ac[step])), 1000.0)  # capped at 1000 (t=0 is ~10^4)
        assert float(scale[k]) == pytest.approx(snr_t / (snr_t + 1), rel=1e-5)
    loss = torch.tensor([0.2, 0.4, 0.6, 0.8])
    got = losses.v_pred_like_loss(loss, t, ac, 0.3)
    assert torch.allclose(got, loss + 0.3 * loss / scale)
