"""Automagic_CameAMP: CAME against its equations and came-pytorch, the lr mask, 8-bit state size, options."""

import pytest
import torch
from _hina_cases import workspace_by_model_size

from library.hina import (Automagic_CameAMP, Automagic_CameAMP8bit, Automagic_CameAMP_COptim,
                          Automagic_CameAMP_COptim8bit, automagic)
from library.hina.techniques.multiscale_momentum import scale_betas, scale_weights
from library.hina.techniques.frequency import suppress_high_frequency_
from library.hina.techniques.lowrank import lowrank_residual

PLAIN = dict(use_lr_mask=False, use_alora=False, betas=(0.9, 0.999, 0.9999), eps=(1e-30, 1e-16, 0.0),
             clip_threshold=1.0, confidence_bias_correction=False)


def came_reference(params, grads_per_step, lr, wd, betas, eps1, eps2, d, bias_correction=False):
    """Algorithm 1 of arXiv 2307.02047 written out plainly (2-D and 1-D tensors); ``bias_correction``: the
    confidence EMA divided by (1 - b3^t), our default (techniques/came.py)."""
    b1, b2, b3 = betas
    params = [p.clone() for p in params]
    state = [dict() for _ in params]
    for t, grads in enumerate(grads_per_step, start=1):
        for p, g, s in zip(params, grads, state):
            v = g * g + eps1
            if p.dim() == 2:
                s["r"] = b2 * s.get("r", torch.zeros(p.shape[0])) + (1 - b2) * v.mean(1)
                s["c"] = b2 * s.get("c", torch.zeros(p.shape[1])) + (1 - b2) * v.mean(0)
                vhat = torch.outer(s["r"], s["c"]) / s["r"].mean()
            else:
                s["v"] = b2 * s.get("v", torch.zeros(p.shape)) + (1 - b2) * v
                vhat = s["v"]
            u = g / vhat.sqrt()
            u = u / max(1.0, float(u.pow(2).mean().sqrt()) / d)
            s["m"] = b1 * s.get("m", torch.zeros(p.shape)) + (1 - b1) * u
            if p.dim() == 2:
                res = (u - s["m"]) ** 2 + eps2
                s["R"] = b3 * s.get("R", torch.zeros(p.shape[0])) + (1 - b3) * res.mean(1)
                s["C"] = b3 * s.get("C", torch.zeros(p.shape[1])) + (1 - b3) * res.mean(0)
                shat = torch.outer(s["R"], s["C"]) / s["R"].mean()
                if bias_correction:
                    shat = shat / (1 - b3 ** t)
                update = s["m"] / shat.sqrt()
            else:
                update = s["m"]
            p.mul_(1 - lr * wd).sub_(lr * update)
    return params


def make(seed=0, shapes=((5, 3), (4,), (3, 6))):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) for s in shapes]


def grad_steps(shapes, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g) for s in shapes] for _ in range(steps)]


def test_came_step_matches_the_paper_equations():
    init = make()
    grads = grad_steps([p.shape for p in init], 4)
    params = [torch.nn.Parameter(p.clone()) for p in init]
    opt = Automagic_CameAMP(params, lr=1e-2, weight_decay=0.01, **PLAIN)
    for step in grads:
        for p, g in zip(params, step):
            p.grad = g.clone()
        opt.step()
    expected = came_reference(init, grads, 1e-2, 0.01, PLAIN["betas"], 1e-30, 1e-16, 1.0)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-5, atol=1e-6)


def test_confidence_bias_correction_is_the_default_and_matches_its_equation():
    init = make()
    grads = grad_steps([p.shape for p in init], 5)
    params = [torch.nn.Parameter(p.clone()) for p in init]
    corrected = dict(PLAIN)
    del corrected["confidence_bias_correction"]  # the default: on
    opt = Automagic_CameAMP(params, lr=1e-2, weight_decay=0.01, **corrected)
    assert opt.defaults["confidence_bias_correction"] is True
    for step in grads:
        for p, g in zip(params, step):
            p.grad = g.clone()
        opt.step()
    expected = came_reference(init, grads, 1e-2, 0.01, PLAIN["betas"], 1e-30, 1e-16, 1.0, bias_correction=True)
    paper = came_reference(init, grads, 1e-2, 0.01, PLAIN["betas"], 1e-30, 1e-16, 1.0)
    for p, e, q in zip(params, expected, paper):
        torch.testing.assert_close(p.detach(), e, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(params[0].detach(), paper[0])  # the flag changes the step


def test_first_corrected_step_is_about_the_lr():
    """Seed betas: without the correction the first update is ~8x the lr per element; with it, well below 1x."""
    sizes = {}
    for flag in (False, True):
        p = torch.nn.Parameter(torch.zeros(16, 8))
        opt = Automagic_CameAMP([p], lr=1.0, weight_decay=0.0, use_lr_mask=False, use_alora=False,
                                confidence_bias_correction=flag)
        p.grad = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
        opt.step()
        sizes[flag] = float(p.detach().pow(2).mean().sqrt())
    assert sizes[False] > 5.0 and sizes[True] < 1.0


def test_came_matches_came_pytorch():
    came_pytorch = pytest.importorskip("came_pytorch")
    init = make(shapes=((16, 8), (8,), (8, 16)))
    grads = grad_steps([p.shape for p in init], 10)
    ours = [torch.nn.Parameter(p.clone()) for p in init]
    ref = [torch.nn.Parameter(p.clone()) for p in init]
    opt = Automagic_CameAMP(ours, lr=1e-3, weight_decay=0.01, **PLAIN)
    ref_opt = came_pytorch.CAME(ref, lr=1e-3, weight_decay=0.01, betas=(0.9, 0.999, 0.9999), eps=(1e-30, 1e-16))
    for step in grads:
        for p, q, g in zip(ours, ref, step):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)


def test_eps3_floors_the_confidence():
    """eps3 > 0 caps the confidence amplification; with a steady gradient the update stays bounded."""
    p = torch.nn.Parameter(torch.zeros(8, 8))
    opt = Automagic_CameAMP([p], lr=1.0, weight_decay=0.0, **dict(PLAIN, eps=(1e-30, 1e-16, 1e-2)))
    for _ in range(30):
        before = p.detach().clone()
        p.grad = torch.ones(8, 8)
        opt.step()
    assert float((p.detach() - before).abs().max()) <= 1e-2 ** -0.5 + 1e-4


def test_lr_mask_follows_the_update_sign_relative_to_lr():
    p = torch.nn.Parameter(torch.zeros(6, 4))
    opt = Automagic_CameAMP([p], lr=1e-4, lr_bump=1e-5, min_lr=1e-6, max_lr=1.3e-4, warmup_steps=1,
                            use_alora=False, weight_decay=0.0)
    for _ in range(6):
        p.grad = torch.ones(6, 4)
        opt.step()
    ratio = opt.state[p]["lr_mask"].abs()
    assert torch.allclose(ratio, torch.full_like(ratio, 1.3))  # 1 -> +0.1 per step after warmup, capped at 1.3
    assert (opt.state[p]["lr_mask"] > 0).all()  # the stored sign is the last polarity (positive U)
    p.grad = -torch.ones(6, 4)
    opt.step()
    assert torch.allclose(opt.state[p]["lr_mask"], torch.full((6, 4), -1.2))


def state_bytes(opt):
    return opt.state_nbytes()


@pytest.mark.parametrize("small, large", [(Automagic_CameAMP8bit, Automagic_CameAMP),
                                          (Automagic_CameAMP_COptim8bit, Automagic_CameAMP_COptim)],
                         ids=["CameAMP", "COptim"])
def test_8bit_state_is_at_most_30_percent(small, large):
    """Seed target: the 8-bit state is <= 30% of the 32-bit version's (defaults: blocksize 4096)."""
    shapes = [(320, 64), (64, 320), (640, 64), (64, 640), (256,)]
    sizes = []
    for cls in (small, large):
        params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
        opt = cls(params, lr=1e-4, warmup_steps=0)
        for p in params:
            p.grad = torch.randn(p.shape)
        opt.step()
        sizes.append(state_bytes(opt))
    ratio = sizes[0] / sizes[1]
    print(f"{small.__name__}: {sizes[0]} B vs {sizes[1]} B = {ratio:.3f}")
    assert ratio <= 0.30


def test_8bit_quantises_every_large_state_back():
    params = [torch.nn.Parameter(torch.randn(128, 64))]
    opt = Automagic_CameAMP_COptim8bit(params, lr=1e-4, warmup_steps=0, blocksize=256, min_8bit_size=0)
    params[0].grad = torch.randn(128, 64)
    opt.step()
    state = opt.state[params[0]]
    for key in ("exp_avg", "exp_avg_s5", "exp_avg_s10", "exp_avg_s25", "lr_mask"):
        assert state[key].dtype == torch.uint8 and f"{key}_absmax" in state


def test_fft_suppression_keeps_norm_and_removes_high_frequencies():
    g = torch.Generator().manual_seed(0)
    smooth = torch.outer(torch.linspace(0, 1, 32), torch.linspace(1, 2, 16))
    noise = torch.randn(32, 16, generator=g) * 0.1
    grad = smooth + noise
    filtered = grad.clone()
    suppress_high_frequency_(filtered, cutoff=0.25, strength=1.0)
    torch.testing.assert_close(filtered.norm(), grad.norm())
    spectrum = torch.fft.rfft2(filtered).abs()
    assert spectrum[16, 8] < 1e-4 * spectrum[0, 0]  # the highest frequency is gone
    # switching the option on changes the step
    results = []
    for flag in (False, True):
        p = torch.nn.Parameter(torch.zeros(32, 16))
        opt = Automagic_CameAMP([p], lr=1e-3, use_fft_suppression=flag, fft_cutoff=0.25, fft_strength=1.0,
                                use_alora=False)
        p.grad = grad.clone()
        opt.step()
        results.append(p.detach().clone())
    assert not torch.equal(*results)


def test_lowrank_penalty_is_the_residual_beyond_rank_k():
    g = torch.Generator().manual_seed(0)
    rank2 = torch.randn(12, 2, generator=g) @ torch.randn(2, 9, generator=g)
    assert lowrank_residual(rank2, 2).abs().max() < 1e-5
    full = torch.randn(12, 9, generator=g)
    residual = lowrank_residual(full, 3)
    s = torch.linalg.svdvals(full)
    torch.testing.assert_close(residual.norm(), s[3:].norm(), rtol=1e-4, atol=1e-5)
    named = [("lora_unet_x.lora_down.weight", torch.nn.Parameter(full.clone()))]
    opt = Automagic_CameAMP(named, lr=1e-3, use_lowrank_reg=True, lowrank_rank=3, lowrank_strength=1.0)
    named[0][1].grad = torch.zeros(12, 9)
    opt.step()
    assert not torch.equal(named[0][1].detach(), full)  # a zero gradient still moves toward rank 3


def test_invalid_arguments_are_named():
    p = [torch.nn.Parameter(torch.zeros(3))]
    for cls, kwargs, word in ((Automagic_CameAMP, dict(betas=(0.9, 0.99)), "betas"),
                              (Automagic_CameAMP, dict(min_lr=1e-2, max_lr=1e-3), "min_lr"),
                              (Automagic_CameAMP8bit, dict(blocksize=1000), "block_size"),
                              (Automagic_CameAMP, dict(confidence_bias_correction="yes"), "confidence_bias_correction"),
                              (Automagic_CameAMP_COptim, dict(momentum_scales=[0.5]), "momentum_scales"),
                              (Automagic_CameAMP_COptim, dict(edge_threshold=1.5), "edge_threshold")):
        with pytest.raises(ValueError, match=word):
            cls(p, **kwargs)


# --- the fused chunk step against a plain per-tensor reference ------------------------------------------------
MASKED = dict(lr=1e-2, lr_bump=1e-3, min_lr=1e-3, max_lr=2e-2, warmup_steps=1, weight_decay=0.01, use_alora=False,
              betas=(0.8, 0.99, 0.999), eps=(1e-30, 1e-16, 1e-8), clip_threshold=1.0)
FUSED_SHAPES = ((24, 8), (8, 24), (40,), (4, 3, 3, 3), (300, 4))


def _roundtrip_8bit(x: torch.Tensor, block: int) -> torch.Tensor:
    """x through bitsandbytes' blockwise quantiser and back (the 8-bit classes' signed states)."""
    F = pytest.importorskip("bitsandbytes.functional")
    code = F.create_dynamic_map(signed=True)
    q, qstate = F.quantize_blockwise(x.flatten().contiguous(), code=code, blocksize=block)
    return F.dequantize_blockwise(q, qstate).reshape(x.shape)


def automagic_reference(init, grads_per_step, multipliers, *, lr, lr_bump, min_lr, max_lr, warmup_steps,
                        weight_decay, betas, eps, clip_threshold, scales=(1,), block=None, row_scaled=None, **_):
    """Automagic_CameAMP's recipe written out per tensor: CAME (arXiv 2307.02047) with the confidence EMA
    bias-corrected, momentum (multi-scale for C-Optim), the Automagic lr mask relative to lr, the context
    multiplier of each step, ALLoRA's row coefficient c = 1 / sqrt(1 + ||w_row||^2) (arXiv 2410.09692) on the
    tensors ``row_scaled`` names (m c / sqrt(S) with eps3 flooring S / c^2), decoupled weight decay; ``block``:
    momentum and mask through bitsandbytes' 8-bit."""
    b1, b2, b3 = betas
    eps1, eps2, eps3 = eps
    params = [p.clone() for p in init]
    state = [dict() for _ in params]
    lo, hi = min_lr / lr, max_lr / lr
    row_scaled = row_scaled or [False] * len(params)
    for t, (grads, mult) in enumerate(zip(grads_per_step, multipliers), start=1):
        for p, g, s, scaled in zip(params, grads, state, row_scaled):
            factored = p.dim() >= 2
            g2 = g.reshape(p.shape[0], -1) if factored else g
            v = g2 * g2 + eps1
            if factored:
                s["r"] = b2 * s.get("r", 0.0) + (1 - b2) * v.mean(1)
                s["c"] = b2 * s.get("c", 0.0) + (1 - b2) * v.mean(0)
                vhat = torch.outer(s["r"], s["c"]) / s["r"].mean()
            else:
                s["v"] = b2 * s.get("v", 0.0) + (1 - b2) * v
                vhat = s["v"]
            u = g2 / vhat.sqrt()
            u = u / max(1.0, float(u.pow(2).mean().sqrt()) / clip_threshold)
            ms = s.get("m", [torch.zeros_like(u) for _ in scales])
            ms = [beta * m + (1 - beta) * u for m, beta in zip(ms, scale_betas(b1, scales))]
            m = sum(w * m for w, m in zip(scale_weights(scales), ms))
            if factored:
                res = (u - m) ** 2 + eps2
                s["R"] = b3 * s.get("R", 0.0) + (1 - b3) * res.mean(1)
                s["C"] = b3 * s.get("C", 0.0) + (1 - b3) * res.mean(0)
                shat = torch.outer(s["R"], s["C"]) / s["R"].mean() / (1 - b3 ** t)
                if scaled:  # ALLoRA: m c / sqrt(S), c = 1 / sqrt(1 + ||w_row||^2), the floor on S / c^2
                    rows = p.reshape(p.shape[0], -1)
                    shat = shat * (1.0 + (rows * rows).sum(1, keepdim=True))
                update = m / shat.clamp_min(eps3).sqrt()
            else:
                update = m
            if t == 1:
                ratio = torch.full_like(u, min(max(1.0, lo), hi))
            elif t > warmup_steps:
                agree = (u > 0) == (s["mask"] > 0)
                ratio = torch.where(agree, s["mask"].abs() + lr_bump / lr, s["mask"].abs() - lr_bump / lr).clamp(lo, hi)
            else:
                ratio = s["mask"].abs()
            s["mask"] = torch.where(u > 0, ratio, -ratio)
            if block:
                ms = [_roundtrip_8bit(m, block) for m in ms]
                s["mask"] = _roundtrip_8bit(s["mask"], block)
            s["m"] = ms
            p.mul_(1 - lr * weight_decay).sub_(lr * mult * (ratio * update).reshape(p.shape))
    return params


@pytest.mark.parametrize("cls", [Automagic_CameAMP, Automagic_CameAMP8bit, Automagic_CameAMP_COptim,
                                 Automagic_CameAMP_COptim8bit], ids=lambda c: c.__name__)
def test_fused_chunk_step_matches_the_plain_reference(cls):
    """Several chunks (chunk_elements 512), five steps: the whole fused step (CAME, lr mask, C-Optim's
    multi-scale momentum and multiplier, 8-bit momentum and mask) equals the recipe written out per tensor."""
    init = make(seed=3, shapes=FUSED_SHAPES)
    grads = grad_steps(FUSED_SHAPES, 5, seed=4)
    params = [torch.nn.Parameter(p.clone()) for p in init]
    eight_bit = cls in (Automagic_CameAMP8bit, Automagic_CameAMP_COptim8bit)
    kwargs = dict(MASKED, compile_step=False, **(dict(block_size=256, min_8bit_size=0) if eight_bit else {}))
    opt = cls(params, **kwargs)
    opt.chunk_elements = 512
    multipliers = []
    for step in grads:
        multipliers.append(opt.c_optim.compute_contextual_lr_multiplier() if cls.contextual else 1.0)
        for p, g in zip(params, step):
            p.grad = g.clone()
        opt.step()
    assert len(opt._layouts[0].chunks) >= 3
    expected = automagic_reference(init, grads, multipliers, **MASKED, block=256 if eight_bit else None,
                                   scales=opt.defaults.get("momentum_scales", (1,)))
    if cls.contextual:
        assert multipliers[-1] != 1.0  # the context moved the lr, and the reference followed it
    for p, e in zip(params, expected):
        if eight_bit:  # a state near a rounding tie may take the neighbouring code: compare almost everywhere
            close = torch.isclose(p.detach(), e, rtol=1e-4, atol=1e-6)
            assert close.float().mean() >= 0.99, float((p.detach() - e).abs().max())
            assert float((p.detach() - e).abs().max()) < 0.05 * MASKED["lr"]
        else:
            torch.testing.assert_close(p.detach(), e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("eps3", [1e-8, 300.0], ids=["floor-idle", "floor-binds"])
def test_alora_row_coefficient_matches_the_reference(eps3):
    """ALLoRA (on by default) in the fused step: the update rows of LoRA matrices (roles from names) scaled by
    1 / sqrt(1 + ||w_row||^2) of the weights before the step; other tensors unscaled. With a large eps3 the floor
    binds on part of the rows: it applies to S / c^2 (the whole multiplier c / sqrt(S))."""
    names = ["unet.a.lora_down.weight", "unet.a.lora_up.weight", "unet.a.alpha_like", "unet.b.lora_down.weight",
             "unet.b.lora_up.weight"]
    shapes = ((4, 24), (24, 4), (40,), (4, 24), (24, 4))
    init = [p * 20 for p in make(seed=7, shapes=shapes)]  # row norms well above 1: the coefficient matters
    grads = grad_steps(shapes, 4, seed=8)
    params = [torch.nn.Parameter(p.clone()) for p in init]
    kwargs = dict(MASKED, use_alora=True, compile_step=False, eps=MASKED["eps"][:2] + (eps3,))
    opt = Automagic_CameAMP(list(zip(names, params)), **kwargs)
    for step in grads:
        for p, g in zip(params, step):
            p.grad = g.clone()
        opt.step()
    expected = automagic_reference(init, grads, [1.0] * len(grads), **kwargs,
                                   row_scaled=[True, True, False, True, True])
    plain = automagic_reference(init, grads, [1.0] * len(grads), **kwargs)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(params[0].detach(), plain[0])


def test_compiled_chunk_step_matches_eager():
    """The one-function chunk step (decode, CAME, lr mask, apply, encode) compiled and eager agree."""
    results = []
    for compile_step in (False, True):
        params = [torch.nn.Parameter(p.clone()) for p in make(seed=5, shapes=FUSED_SHAPES)]
        opt = Automagic_CameAMP8bit(params, compile_step=compile_step, **dict(MASKED, block_size=256, min_8bit_size=0))
        before = automagic._moments.compiled_calls
        for step in grad_steps(FUSED_SHAPES, 3, seed=6):
            for p, g in zip(params, step):
                p.grad = g
            opt.step()
        if compile_step and automagic._moments.failed:
            pytest.skip(f"torch.compile is not usable here: {automagic._moments.failed[:200]}")
        assert (automagic._moments.compiled_calls > before) == compile_step
        results.append([p.detach().clone() for p in params])
    for eager, compiled in zip(*results):
        close = torch.isclose(eager, compiled, rtol=1e-4, atol=1e-6)
        assert close.float().mean() >= 0.99


def test_work_memory_is_bounded_by_the_chunk_not_the_model():
    """Automagic_CameAMP8bit at 0.5M and 4M elements with 64K-element chunks: the same work pool (a few
    chunk-sized buffers, CAME's side vector included), whatever the model size."""
    workspace = workspace_by_model_size(Automagic_CameAMP8bit)
    assert workspace[500_000] == workspace[4_000_000]
    assert 0 < workspace[4_000_000] <= 8 * 4 * (1 << 16)  # at most 8 fp32 chunk-sized buffers


def test_lr_at_max_lr_warns_that_the_mask_can_only_lower_lrs():
    """lr = max_lr (Automagic_CameAMP's max_lr default is 1e-3): the mask starts at its ceiling, so it can only lower
    lrs (at 1,500 steps this cost 6-8 % against AdamW8bit, docs/convergence_long.json): said once, at the first
    step; below max_lr nothing is said."""
    import warnings

    def warnings_of_first_step(lr):
        p = torch.nn.Parameter(torch.zeros(4, 4))
        opt = Automagic_CameAMP([p], lr=lr)
        p.grad = torch.ones(4, 4)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt.step()
        return [str(w.message) for w in caught if "max_lr" in str(w.message)]

    assert any("lr=0.001 is at or above max_lr=0.001" in m and "can only lower lrs" in m
               for m in warnings_of_first_step(1e-3))
    assert warnings_of_first_step(1e-4) == []


def test_came_ema_over_all_live_cpu_tensors_skips_the_select_and_matches_it_bit_for_bit():
    """live_entries: None for a CPU chunk whose tensors all step (the EMAs then update every side entry without a
    per-entry select), the flags otherwise; both forms give the same bits, and a dead tensor's entries stay."""
    from library.hina.pack import FlatPack
    from library.hina.techniques import came

    shapes = ((6, 4), (6, 4), (5,), (3, 7))
    pack = FlatPack([torch.zeros(s) for s in shapes], list(range(len(shapes))), align=8, slots=8)
    layout = came.side_layout(pack)
    g = torch.Generator().manual_seed(0)
    side, means = torch.rand(layout.used, generator=g), torch.rand(layout.used, generator=g)
    all_live = torch.tensor([True] * len(shapes) + [False] * (pack.slots - len(shapes)))
    assert came.live_entries(layout, all_live) is None
    span = slice(0, layout.used)
    fast, selected = side.clone(), side.clone()
    came._ema_(fast, means, None, span, 0.9)
    came._ema_(selected, means, torch.ones(layout.used, dtype=torch.bool), span, 0.9)
    assert torch.equal(fast, selected)
    assert torch.equal(fast, side * 0.9 + means * (1.0 - 0.9))

    one_dead = all_live.clone()
    one_dead[1] = False
    entries = came.live_entries(layout, one_dead)
    assert entries is not None and int((~entries).sum()) == 6 + 4 + 6 + 4  # r, c, R, C of the (6, 4) tensor
    partial = side.clone()
    came._ema_(partial, means, entries, span, 0.9)
    assert torch.equal(partial[~entries], side[~entries]) and torch.equal(partial[entries], fast[entries])
