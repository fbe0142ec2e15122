"""AdamWBF16_HinaAdaptive: stochastic rounding, the shift buffer, bf16-only, tracking fp32 AdamW, buffer pool."""

import pytest
import torch

from library.hina import AdamWBF16_HinaAdaptive
from library.hina.pack import FlatPack
from library.hina.techniques.stochastic_rounding import (ROUND_TRIP_OPTIONS, compensated_write, stochastic_round,
                                                        store_bf16)

ALL_OFF = dict(use_spd=False, use_cautious=False, use_adopt_stability=False, use_grams=False, use_agr=False,
               use_tam=False, dynamic_weight_decay=False, use_dynamic_adaptation=False, use_lr_mask=False)


def _step_in_lockstep(opt, ref_opt, ours, ref, *, steps: int, seed: int, mean: float) -> None:
    """Step the bf16 optimizer on ``ours`` and a reference on the fp32 ``ref`` with the same bf16 gradients."""
    for step in range(steps):
        g = torch.Generator().manual_seed(seed + step)
        for p, q in zip(ours, ref):
            grad = (torch.randn(p.shape, generator=g) + mean).bfloat16()
            p.grad, q.grad = grad, grad.float()
        opt.step()
        ref_opt.step()


def test_stochastic_rounding_is_unbiased():
    values = torch.tensor([1.0 + 0.3 * 2 ** -7, -3.0 - 0.71 * 2 ** -6, 1e-3 * 1.37, 250.3])
    x = values.repeat(20000, 1).contiguous()
    rounded = stochastic_round(x, 123)
    assert torch.equal(rounded, rounded.bfloat16().float())  # every result is a bf16 value
    ulp = values.abs() * 2 ** -7
    mean_error = (rounded.double().mean(0) - values.double()).abs()
    assert (mean_error < 0.02 * ulp).all(), mean_error / ulp  # ~ 7 sigma for 20k draws
    nearest_error = (values.bfloat16().float() - values).abs()
    assert (nearest_error > 0.1 * ulp).all()  # round-to-nearest is biased for these values
    assert not torch.equal(stochastic_round(x, 124), rounded)  # another seed, other draws
    assert torch.equal(stochastic_round(x, 123), rounded)  # the same seed, the same draws


def test_random_bits_equal_the_exact_hash_eager_and_compiled():
    """random_bits16 runs in int32 lanes (wrapping) and equals the hash written out in exact int64 arithmetic, for
    seeds around 2^31 and 2^32 (as ints and as int64 tensors), eagerly and compiled."""
    from library.hina.techniques.stochastic_rounding import random_bits16

    def exact(index, seed):
        h = (index.to(torch.int64) + seed) & 0xFFFFFFFF
        h = (((h >> 16) ^ h) * 0x45D9F3B) & 0xFFFFFFFF
        h = (((h >> 16) ^ h) * 0x45D9F3B) & 0xFFFFFFFF
        return (((h >> 16) ^ h) & 0xFFFF).to(torch.int32)

    index = torch.arange(1 << 18, dtype=torch.int32)
    compiled = torch.compile(random_bits16, dynamic=False)
    for seed in (0, 123, (1 << 31) - 1, 1 << 31, 0xDEADBEEF, (1 << 32) - 1):
        expected = exact(index, seed)
        assert torch.equal(random_bits16(index, seed), expected), seed
        assert torch.equal(compiled(index, torch.tensor(seed, dtype=torch.int64)), expected), seed


def test_shift_buffer_keeps_ten_thousand_tiny_updates():
    start, tiny, n = 1.0, 1e-5, 10_000  # 1e-5 is far below half a bf16 ulp at 1.0 (2^-8 = 0.0039)
    plain = torch.full((64,), start, dtype=torch.bfloat16)
    param = plain.clone()
    shift = torch.zeros(64, dtype=torch.bfloat16)
    segments = FlatPack([param], [0], align=64).segments
    live, decay = torch.tensor([True]), torch.zeros(1)
    for step in range(n):
        plain.add_(tiny)
        before, decoded = param.float(), shift.float()
        weight = before + tiny
        compensated_write(weight, before, decoded, decay, live, segments)
        param.copy_(weight)
        store_bf16(decoded, shift, step)
    exact = start + n * tiny  # 1.1
    assert torch.equal(plain, torch.full((64,), start, dtype=torch.bfloat16))  # plain rounding lost them all
    bf16_ulp = 2 ** -7
    assert (param.float() - exact).abs().max() <= bf16_ulp
    assert (param.float() + shift.float() - exact).abs().max() <= bf16_ulp / 2


def test_fp32_params_are_accepted_at_construction_and_checked_at_step():
    """kohya sd-scripts builds the optimizer, then --full_bf16 casts the network (same Parameter objects)."""
    model = torch.nn.Linear(3, 3)
    opt = AdamWBF16_HinaAdaptive(model.parameters())
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    with pytest.raises(TypeError, match=r"--full_bf16.*model\.to\(torch\.bfloat16\)"):
        opt.step()
    model.to(torch.bfloat16)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    assert all(opt.state[p]["step"] == 1 for p in model.parameters())


def test_lr_zero_leaves_bf16_weights_bit_identical():
    """With lr = 0 the weights stay exactly as they are (the compensation is not re-rounded into them)."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).bfloat16()) for s in ((64, 32), (32,))]
    before = [p.detach().clone() for p in params]
    opt = AdamWBF16_HinaAdaptive(params, lr=0.0, use_lr_mask=False)
    for _ in range(10):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).bfloat16()
        opt.step()
    for p, b in zip(params, before):
        assert torch.equal(p, b)


def test_tracks_fp32_adamw_over_200_steps():
    """Stated tolerance: after 200 steps the bf16 weights (p + shift) are within 2% (relative, in norm) of
    torch.optim.AdamW's fp32 displacement; the bf16 weights alone add bf16's own rounding of the result."""
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen).bfloat16().float() for s in ((32, 32), (32,), (16, 32))]
    ours = [torch.nn.Parameter(t.bfloat16()) for t in init]
    ref = [torch.nn.Parameter(t.clone()) for t in init]
    opt = AdamWBF16_HinaAdaptive(ours, lr=1e-3, weight_decay=1e-2, **ALL_OFF)
    ref_opt = torch.optim.AdamW(ref, lr=1e-3, weight_decay=1e-2)
    _step_in_lockstep(opt, ref_opt, ours, ref, steps=200, seed=1000, mean=0.5)
    for p, q, p0 in zip(ours, ref, init):
        held = p.float() + opt.state[p]["shift"].float()
        moved = (q.detach() - p0).norm()
        assert (held - q.detach()).norm() <= 0.02 * moved
        # the bf16 weights alone: the same, plus bf16's own rounding of the reference (half an ulp, 2^-8)
        assert (p.float() - q.detach()).norm() <= 0.02 * moved + 2 ** -8 * q.detach().norm()


def test_delayed_weight_decay_applies_at_the_threshold():
    p = torch.nn.Parameter(torch.full((8,), 4.0, dtype=torch.bfloat16))
    # lr * wd = 1e-5 per step; threshold 1e-4: nothing for 9 steps, the whole 1e-4 on the 10th
    opt = AdamWBF16_HinaAdaptive([p], lr=1e-3, weight_decay=1e-2, delayed_wd_threshold=1e-4, **ALL_OFF)
    for step in range(10):
        p.grad = torch.zeros(8, dtype=torch.bfloat16)
        opt.step()
        held = p.float() + opt.state[p]["shift"].float()
        if step < 9:
            assert torch.equal(held, torch.full((8,), 4.0))
    assert torch.allclose(held, torch.full((8,), 4.0 * (1 - 1e-4)), rtol=0, atol=1e-4)  # SR of the shift buffer: < 1 ulp of 0.016


def test_buffer_pool_reports_and_clears_the_work_pool():
    p = torch.nn.Parameter(torch.zeros(16, 16, dtype=torch.bfloat16))
    opt = AdamWBF16_HinaAdaptive([p])
    p.grad = torch.ones(16, 16, dtype=torch.bfloat16)
    opt.step()
    stats = opt.get_buffer_pool_stats()
    assert {"total_buffer_types", "buffer_details", "total_buffers", "estimated_memory_mb"} <= set(stats)
    assert stats["total_buffers"] >= 1
    assert stats["estimated_memory_mb"] * 2 ** 20 == opt.get_optimization_info()["training_stats"]["workspace_bytes"]
    opt.clear_buffer_pool()
    assert opt.get_buffer_pool_stats()["total_buffers"] == 0
    p.grad = torch.ones(16, 16, dtype=torch.bfloat16)
    opt.step()  # the buffers come back
    assert opt.get_buffer_pool_stats()["total_buffers"] == stats["total_buffers"]


NAMES = ("a.lora_down.weight", "a.lora_up.weight", "b.alpha", "c.lora_down.weight", "c.lora_up.weight")
SHAPES = ((8, 40), (40, 8), (7,), (8, 24), (24, 8))


def test_fused_chunk_step_tracks_the_fp32_recipe():
    """The bf16 chunk step (every default technique on, several chunks) runs AdamW_HinaAdaptive's recipe: after
    30 steps p + shift is within 5 % (relative, in norm, over the displacement) of AdamW_HinaAdaptive with fp32
    states on the same bf16-valued start; bf16 states and stochastic rounding are the only difference (weight
    decay 0: the bf16 class delays it)."""
    from library.hina import AdamW_HinaAdaptive

    gen = torch.Generator().manual_seed(3)
    init = [(torch.randn(s, generator=gen) * 0.5).bfloat16().float() for s in SHAPES]
    ours = [torch.nn.Parameter(t.bfloat16()) for t in init]
    ref = [torch.nn.Parameter(t.clone()) for t in init]
    kwargs = dict(lr=1e-3, weight_decay=0.0, warmup_steps=5, relationship_discovery_interval=10, compile_step=False)
    opt = AdamWBF16_HinaAdaptive(list(zip(NAMES, ours)), **kwargs)
    ref_opt = AdamW_HinaAdaptive(list(zip(NAMES, ref)), optim_bits=32, **kwargs)
    opt.chunk_elements = ref_opt.chunk_elements = 512
    _step_in_lockstep(opt, ref_opt, ours, ref, steps=30, seed=100, mean=0.3)
    assert len(opt._layouts[0].chunks) >= 2
    for p, q, p0 in zip(ours, ref, init):
        held = p.float() + opt.state[p]["shift"].float()
        moved = (q.detach() - p0).norm()
        assert moved > 0
        assert (held - q.detach()).norm() <= 0.05 * moved, float((held - q.detach()).norm() / moved)


def test_compensated_write_compiled_matches_eager_and_keeps_skipped_tensors():
    """compensated_write: p + shift + delta rounded to nearest into the weights, the rest into shift, for the
    tensors that step; compiled and eager give the same bits."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen).bfloat16() for s in ((64,), (128,))]
    pack = FlatPack(params, [0, 1], align=64)
    before = pack.gather([p.float() for p in params], torch.empty(pack.total))
    shift = (torch.randn(pack.total, generator=gen) * 1e-4).bfloat16().float()
    delta = torch.randn(pack.total, generator=gen) * 1e-3
    live = torch.tensor([True, False])
    decay = torch.tensor([1e-2, 1e-2])
    results = []
    for fn in (compensated_write, torch.compile(compensated_write, dynamic=False, options=ROUND_TRIP_OPTIONS)):
        w, s = before + delta, shift.clone()
        fn(w, before, s, decay, live, pack.segments)
        results.append((w, s))
    (w, s), (wc, sc) = results
    assert torch.equal(w, wc) and torch.equal(s, sc)
    target = before[:64] + shift[:64] + delta[:64] - 1e-2 * before[:64]
    assert torch.equal(w[:64], target.bfloat16().float())
    torch.testing.assert_close(w[:64] + s[:64], target, rtol=0, atol=1e-7)
    assert torch.equal(w[64:], before[64:]) and torch.equal(s[64:], shift[64:])  # skipped: unchanged


def test_round_to_bf16_is_torchs_cast():
    from library.hina.techniques.stochastic_rounding import round_to_bf16

    gen = torch.Generator().manual_seed(0)
    scales = 10.0 ** torch.randint(-30, 30, (10000,), generator=gen)
    edges = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 3.3895e38, 1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8])
    x = torch.cat([torch.randn(10000, generator=gen) * scales, edges])  # ties at 1 + 2^-8 and 1 + 3 2^-8 too
    assert torch.equal(round_to_bf16(x), x.bfloat16().float())


def test_chunks_keep_no_float32_copy_of_the_bf16_states():
    """The bf16 states are built as bf16 from the start: no chunk keeps a float32 buffer beyond the shared work
    pool (building fp32 states first and swapping them kept them alive through the chunk's cached views: 20 B per
    parameter at SD1.5 r16)."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(64, 300).bfloat16()) for _ in range(6)]
    for p in params:
        p.grad = torch.randn(p.shape).bfloat16()
    opt = AdamWBF16_HinaAdaptive(params, lr=1e-3, compile_step=False)
    opt.chunk_elements = 40_000  # several chunks
    opt.step()
    pool = {t.untyped_storage().data_ptr() for t in opt._work._buffers.values()}
    chunks = [chunk for layout in opt._layouts.values() for chunk in layout.chunks]
    assert len(chunks) > 1
    for chunk in chunks:
        assert all(t.dtype == torch.bfloat16 for t in chunk.codec.flat.values())
        held = [flat for flat, _ in chunk._view_cache.values()] + list(chunk._workspace.values())
        stray = [tuple(t.shape) for t in held if t.dtype == torch.float32 and t.untyped_storage().data_ptr() not in pool]
        assert not stray, stray


def test_write_back_runs_eagerly_where_inductor_cannot_keep_the_rounding(monkeypatch):
    """Compiled without ``emulate_precision_casts`` inductor would drop the round trip to bf16 (the compensation
    would silently be lost), so on a torch that does not know the option the write-back runs eagerly."""
    from library.hina import bf16, compiled
    from library.hina.techniques.stochastic_rounding import ROUND_TRIP_OPTIONS

    assert compiled.options_known(ROUND_TRIP_OPTIONS)  # this torch (2.13) knows it
    assert not compiled.options_known({"no_such_inductor_option": True})
    monkeypatch.setattr(compiled, "options_known", lambda options: False)
    params = [torch.nn.Parameter(torch.randn(64, 64).bfloat16())]
    params[0].grad = torch.randn(64, 64).bfloat16()
    opt = AdamWBF16_HinaAdaptive(params, lr=1e-3, compile_step=True)
    before = bf16._write_back.eager_calls
    opt.step()
    assert bf16._write_back.eager_calls == before + 1
