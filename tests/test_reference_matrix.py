"""HinaAdamW's composed recipe against a plain per-tensor reference, written out from the papers.

optimi's habit: the optimizer under test against an independent, readable implementation over several
steps, shapes, settings and chunk sizes. The reference below loops over tensors one by one, in the order
DESIGN.md gives: ⊥Grad -> AGR -> (ADOPT normalisation) -> TAM damping of the moment input -> m from x,
v from g -> Adam's bias-corrected direction (ADOPT: m) -> Grams -> Cautious -> LoRA+ ratio and ALLoRA rows
-> decoupled weight decay on the dynamic schedule -> SPD with the transformed gradient.
"""

import math

import pytest
import torch

from library.hina import HinaAdamW

NAMES = ["m.lora_down.weight", "m.lora_up.weight", "n.lora_down.weight", "n.lora_up.weight", "base.weight",
         "m.w_norm", "bias"]
SHAPES = [(4, 24), (24, 4), (8, 3, 3, 3), (16, 8, 1, 1), (12, 10), (24,), (1,)]
ROLES = ["lora_a", "lora_b", "lora_a", "lora_b", "other", "w_norm", "other"]


def reference(params, grads, *, lr, betas, eps, weight_decay, use_spd, spd_lambda, use_cautious,
              use_orthogonal_grad, use_adopt_stability, use_grams, use_agr, use_tam, tam_beta, use_alora,
              alora_ratio, dynamic_weight_decay, wd_transition_steps, wd_decay_factor, wd_min_ratio):
    """Plain per-tensor HinaAdamW; returns the weights after len(grads) steps (float64 math)."""
    b1, b2 = betas
    w = [p.detach().double().clone() for p in params]
    p0 = [x.clone() if role == "other" else torch.zeros_like(x) for x, role in zip(w, ROLES)]
    m = [torch.zeros_like(x) for x in w]
    v = [torch.zeros_like(x) for x in w]
    smoothed = [0.0 for _ in w]
    for t, step_grads in enumerate(grads, start=1):
        wd = weight_decay
        if dynamic_weight_decay and t > wd_transition_steps:
            wd *= max(wd_min_ratio, wd_decay_factor ** ((t - wd_transition_steps) / wd_transition_steps))
        for i, (role, raw) in enumerate(zip(ROLES, step_grads)):
            g = raw.double().clone()
            if use_orthogonal_grad:  # ⊥Grad: remove the component along w, restore the norm
                perp = g - (w[i] * g).sum() / ((w[i] * w[i]).sum() + 1e-30) * w[i]
                g = perp * (g.norm() / (perp.norm() + 1e-30))
            if use_agr:  # AGR: g (1 - |g| / sum|g|), the sum floored (an all-zero g stays zero, not 0/0)
                g = g * (1 - g.abs() / g.abs().sum().clamp_min(torch.finfo(torch.float32).tiny))
            if use_adopt_stability and t == 1:  # ADOPT step 0: v = g^2, nothing else
                v[i] = g * g
                continue
            if use_adopt_stability:
                c = max(t - 1, 1) ** 0.25
                x = (g / v[i].sqrt().clamp_min(eps)).clamp(-c, c)
            else:
                x = g
            if use_tam:  # TAM: damp x by the smoothed cosine of (m, x)
                cos = (m[i] * x).sum() / (m[i].norm() * x.norm()).clamp_min(1e-30)
                smoothed[i] = tam_beta * smoothed[i] + (1 - tam_beta) * float(cos)
                x = x * ((1 + smoothed[i]) / 2 + 1e-8)
            m[i] = b1 * m[i] + (1 - b1) * x
            v[i] = b2 * v[i] + (1 - b2) * g * g
            if use_adopt_stability:
                u = m[i].clone()
            else:
                u = (m[i] / (1 - b1 ** t)) / (v[i].sqrt() / math.sqrt(1 - b2 ** t) + eps)
            if use_grams:
                u = u.abs() * g.sign()
            if use_cautious:
                mask = (u * g > 0).double()
                u = u * mask * (u.numel() / (mask.sum() + 1))
            lr_i = lr * (alora_ratio if use_alora and role == "lora_b" else 1.0)
            if use_alora and role in ("lora_a", "lora_b"):  # ALLoRA: rows of the update / sqrt(1 + ||w_row||^2)
                rows = w[i].reshape(w[i].shape[0], -1)
                u = (u.reshape(rows.shape) / (1 + (rows * rows).sum(1, keepdim=True)).sqrt()).reshape(u.shape)
            wd_i = 0.0 if use_alora and role == "w_norm" else wd
            new = w[i] * (1 - lr_i * wd_i) - lr_i * u
            if use_spd:  # SPD: where the step moves away from p0 against the gradient, pull back
                dev, new_dev = w[i] - p0[i], new - p0[i]
                if (g * dev).sum() > 0:
                    r = ((new_dev.norm() - dev.norm()) / new_dev.norm().clamp_min(1e-30)).clamp(0, 1)
                    new = new - spd_lambda * r * new_dev
            w[i] = new
    return w


DEFAULTS = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, use_spd=True, spd_lambda=0.06,
                use_cautious=True, use_orthogonal_grad=False, use_adopt_stability=False, use_grams=True,
                use_agr=True, use_tam=True, tam_beta=0.999, use_alora=True, alora_ratio=16.0,
                dynamic_weight_decay=True, wd_transition_steps=2, wd_decay_factor=0.7, wd_min_ratio=0.1)
VARIANTS = {
    "defaults": {},
    "adopt+orthogonal": dict(use_adopt_stability=True, use_orthogonal_grad=True),
    "no grams (cautious masks)": dict(use_grams=False),
    "all off": dict(use_spd=False, use_cautious=False, use_grams=False, use_agr=False, use_tam=False,
                    use_alora=False, dynamic_weight_decay=False),
    "tam fast, strong spd": dict(tam_beta=0.5, spd_lambda=0.5, lr=5e-2),
}


@pytest.mark.parametrize("chunk", [64, 1 << 20], ids=["tiny-chunks", "one-chunk"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_hina_adamw_recipe_matches_the_plain_reference(variant, chunk):
    settings = {**DEFAULTS, **VARIANTS[variant]}
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=g) * 0.5) for s in SHAPES]
    grads = [[torch.randn(s, generator=g) + 0.3 for s in SHAPES] for _ in range(6)]
    expected = reference(params, grads, **settings)
    opt = HinaAdamW(list(zip(NAMES, params)), optim_bits=32, compile_step=False, **settings)
    opt.chunk_elements = chunk
    roles = opt._pairings()[0].roles()
    assert roles == ROLES
    for step_grads in grads:
        for p, grad in zip(params, step_grads):
            p.grad = grad.clone()
        opt.step()
    for name, p, e in zip(NAMES, params, expected):
        torch.testing.assert_close(p.detach().double(), e, rtol=2e-5, atol=2e-6, msg=name)
