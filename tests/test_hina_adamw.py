"""HinaAdamW: AdamW equivalence, 8-bit closeness, state_dict round trip, skipped params, lr, errors."""

import io
import json

import pytest
import torch

from library.hina import HinaAdamW

ALL_OFF = dict(use_spd=False, use_cautious=False, use_orthogonal_grad=False, use_adopt_stability=False,
               use_grams=False, use_agr=False, use_tam=False, use_alora=False, dynamic_weight_decay=False)
SHAPES = [(64,), (16, 96), (96, 16), (8, 4, 3, 3)]


def make_params(seed=0, shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]


def clone(params):
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def grads_for(params, step, seed=1):
    g = torch.Generator().manual_seed(seed * 100_003 + step)
    return [torch.randn(p.shape, generator=g) for p in params]


def run(optimizer, params, steps, start=0, skip=None):
    for step in range(start, start + steps):
        for i, (p, g) in enumerate(zip(params, grads_for(params, step))):
            p.grad = None if skip and skip(step, i) else g
        optimizer.step()


def named(params, names):
    return list(zip(names, params))


LORA_NAMES = ["lora_unet_a.alpha_bias", "lora_unet_a.lora_down.weight", "lora_unet_a.lora_up.weight",
              "lora_unet_conv.lora_down.weight"]


@pytest.mark.parametrize("weight_decay", [0.0, 1e-2])
def test_all_off_32bit_equals_torch_adamw(weight_decay):
    ours, ref = make_params(), make_params()
    opt = HinaAdamW(ours, lr=3e-3, weight_decay=weight_decay, optim_bits=32, **ALL_OFF)
    ref_opt = torch.optim.AdamW(ref, lr=3e-3, weight_decay=weight_decay, foreach=False)
    run(opt, ours, 100)
    run(ref_opt, ref, 100)
    for a, b in zip(ours, ref):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6 * float(b.detach().abs().max()))


def test_all_off_32bit_equals_torch_adamw_with_lora_names():
    """Role detection alone changes nothing when every enhancement is off."""
    ours, ref = make_params(), make_params()
    opt = HinaAdamW(named(ours, LORA_NAMES), lr=1e-3, optim_bits=32, **ALL_OFF)
    ref_opt = torch.optim.AdamW(ref, lr=1e-3, foreach=False)
    run(opt, ours, 30)
    run(ref_opt, ref, 30)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6 * float(b.detach().abs().max()))


def test_8bit_tracks_32bit():
    """bitsandbytes' own 8-bit optimizer tests compare against 32-bit with loose tolerances; same here."""
    p8, p32 = make_params(shapes=[(64, 256), (256, 64)]), make_params(shapes=[(64, 256), (256, 64)])
    start = [p.detach().clone() for p in p32]
    opt8 = HinaAdamW(p8, lr=1e-3, optim_bits=8, block_size=256, min_8bit_size=0, **ALL_OFF)
    opt32 = HinaAdamW(p32, lr=1e-3, optim_bits=32, **ALL_OFF)
    run(opt8, p8, 50)
    run(opt32, p32, 50)
    for a, b, s in zip(p8, p32, start):
        moved = (b - s).norm()
        assert (a - b).norm() / moved < 0.05
    assert opt8.state_nbytes() < 0.3 * opt32.state_nbytes()


@pytest.mark.parametrize("kwargs", [{}, dict(use_adopt_stability=True, use_orthogonal_grad=True, use_agr=True)])
def test_8bit_one_graph_and_decode_first_paths_step_the_same(monkeypatch, kwargs):
    """The 8-bit chunk step decodes and encodes inside its one function, or (when TAM, Cautious or SPD reduce over
    the states) decodes into pool buffers before it and encodes after it: the same step, codes included."""
    from library.hina import hina_adamw

    results = []
    for decode_first in (False, True):
        monkeypatch.setattr(hina_adamw, "reduces_over_states", lambda group, value=decode_first: value)
        params = make_params(shapes=[(64, 256), (256, 64), (32, 32)])
        opt = HinaAdamW(params, lr=1e-2, optim_bits=8, min_8bit_size=0, compile_step=False, **kwargs)
        run(opt, params, 4, skip=lambda step, i: step == 2 and i == 1)
        results.append((params, opt))
    (one, opt_one), (first, opt_first) = results
    for a, b in zip(one, first):
        assert torch.equal(a, b)
        for key in ("exp_avg", "exp_avg_sq", "exp_avg_absmax", "exp_avg_sq_absmax"):
            assert torch.equal(opt_one.state[a][key], opt_first.state[b][key]), key


def test_8bit_state_is_about_two_bytes_per_param():
    params = make_params(shapes=[(16, 320), (320, 16)] * 4)
    opt = HinaAdamW(named(params, [f"m{i // 2}.lora_{'down' if i % 2 == 0 else 'up'}.weight" for i in range(8)]))
    run(opt, params, 2)
    per_param = opt.state_nbytes() / sum(p.numel() for p in params)
    assert per_param <= 2.2, per_param


@pytest.mark.parametrize("bits", [8, 32])
@pytest.mark.parametrize("defaults", [True, False])
def test_state_dict_round_trip_is_bit_identical(bits, defaults):
    kwargs = {} if defaults else ALL_OFF
    names = LORA_NAMES
    a = make_params()
    opt_a = HinaAdamW(named(a, names), lr=1e-2, optim_bits=bits, min_8bit_size=0, **kwargs)
    run(opt_a, a, 5, skip=lambda step, i: step == 3 and i == 1)

    buffer = io.BytesIO()
    torch.save(opt_a.state_dict(), buffer)
    b = clone(a)
    opt_b = HinaAdamW(named(b, names), lr=1e-2, optim_bits=bits, min_8bit_size=0, **kwargs)
    buffer.seek(0)
    opt_b.load_state_dict(torch.load(buffer, weights_only=False))

    run(opt_a, a, 3, start=5)
    run(opt_b, b, 3, start=5)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    state_a, state_b = opt_a.state_dict()["state"], opt_b.state_dict()["state"]
    for key in state_a:
        for name, value in state_a[key].items():
            other = state_b[key][name]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other, name
            if isinstance(value, torch.Tensor):
                assert value.dtype == other.dtype, name  # 8-bit codes stay uint8


@pytest.mark.parametrize("bits", [8, 32])
def test_grad_none_param_is_skipped_and_state_untouched(bits):
    params = make_params()
    opt = HinaAdamW(params, lr=1e-2, optim_bits=bits, min_8bit_size=0)
    run(opt, params, 3)
    frozen = params[1].detach().clone()
    state_before = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in opt.state[params[1]].items()}
    run(opt, params, 2, start=3, skip=lambda step, i: i == 1)
    assert torch.equal(params[1], frozen)
    for key, value in opt.state[params[1]].items():
        before = state_before[key]
        assert torch.equal(value, before) if isinstance(value, torch.Tensor) else value == before, key
    assert opt.state[params[0]]["step"] == 5 and opt.state[params[1]]["step"] == 3


def test_param_that_never_had_a_grad_gets_no_state_garbage():
    params = make_params()
    opt = HinaAdamW(params, lr=1e-2)
    run(opt, params, 3, skip=lambda step, i: i == 2)
    assert opt.state[params[2]]["step"] == 0
    assert not opt.state[params[2]]["exp_avg"].any()


def test_nonfinite_gradient_skips_that_tensor_and_is_counted():
    params = make_params()
    opt = HinaAdamW(params, lr=1e-2)
    run(opt, params, 2)
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.randn_like(p)
    params[2].grad[0, 0] = float("nan")
    opt.step()
    assert torch.equal(params[2], before[2])
    assert not torch.equal(params[0], before[0])
    assert all(torch.isfinite(p).all() for p in params)
    assert opt.get_optimization_info()["training_stats"]["skipped_updates"] == 1


def test_sparse_gradient_is_rejected():
    p = torch.nn.Parameter(torch.randn(10, 4))
    opt = HinaAdamW([p])
    p.grad = torch.randn(10, 4).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


@pytest.mark.parametrize("kwargs", [ALL_OFF, {}])
def test_changing_group_lr_scales_the_step(kwargs):
    """What a scheduler does: set param_groups[i]['lr']. The step must scale with it."""
    moves = []
    for lr in (1e-3, 5e-4):
        params = make_params()
        opt = HinaAdamW(params, lr=1e-3, optim_bits=32, weight_decay=0.0, use_spd=False,
                        **{k: v for k, v in kwargs.items() if k != "use_spd"})
        run(opt, params, 3)
        before = [p.detach().clone() for p in params]
        opt.param_groups[0]["lr"] = lr
        run(opt, params, 1, start=3)
        moves.append(torch.cat([(p - b).flatten() for p, b in zip(params, before)]))
    # p_new - p_old carries float32 rounding of p (about 1e-7 here), hence the atol.
    torch.testing.assert_close(moves[1], moves[0] / 2, rtol=1e-3, atol=5e-7)


def test_scheduler_drives_lr():
    params = make_params()
    opt = HinaAdamW(params, lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.0 if step >= 2 else 1.0)
    run(opt, params, 1)
    scheduler.step()
    run(opt, params, 1, start=1)
    scheduler.step()
    before = [p.detach().clone() for p in params]
    run(opt, params, 1, start=2)
    for p, b in zip(params, before):
        assert torch.equal(p, b)  # lr 0: no step, no decay


def test_lora_plus_ratio_gives_b_the_larger_step():
    def step_sizes(use_alora):
        down = torch.nn.Parameter(torch.randn(4, 32) * 0.1)
        up = torch.nn.Parameter(torch.randn(32, 4) * 0.1)
        opt = HinaAdamW([("x.lora_down.weight", down), ("x.lora_up.weight", up)], lr=1e-3, optim_bits=32,
                        **{**ALL_OFF, "use_alora": use_alora})
        before = [down.detach().clone(), up.detach().clone()]
        down.grad, up.grad = torch.randn(4, 32), torch.randn(32, 4)
        opt.step()
        return [(p - b).abs().mean().item() for p, b in zip((down, up), before)]

    off, on = step_sizes(False), step_sizes(True)
    ratio = (on[1] / off[1]) / (on[0] / off[0])
    # B gets alora_ratio x lr; ALLoRA's row coefficient is close to 1 for these small weights.
    assert 10 < ratio < 20


def test_each_flag_changes_the_step():
    base = dict(ALL_OFF, optim_bits=32)
    reference = None
    results = {}
    for flag in [None, "use_spd", "use_cautious", "use_orthogonal_grad", "use_adopt_stability", "use_grams",
                 "use_agr", "use_tam", "use_alora"]:
        params = make_params()
        kwargs = dict(base)
        if flag:
            kwargs[flag] = True
        opt = HinaAdamW(named(params, LORA_NAMES), lr=1e-2, **kwargs)
        run(opt, params, 4)
        results[flag] = torch.cat([p.detach().flatten() for p in params])
    reference = results.pop(None)
    for flag, value in results.items():
        assert not torch.equal(value, reference), f"{flag} changed nothing"


def test_dynamic_weight_decay_changes_decay_after_transition():
    def final(dynamic):
        p = torch.nn.Parameter(torch.ones(8))
        opt = HinaAdamW([p], lr=0.1, weight_decay=0.5, optim_bits=32,
                        **{**ALL_OFF, "dynamic_weight_decay": dynamic}, wd_transition_steps=2)
        for _ in range(6):
            p.grad = torch.zeros(8)
            opt.step()
        return p.detach().clone()

    assert not torch.equal(final(True), final(False))


def test_role_detection_kohya_peft_lokr_and_norms():
    names = [
        "lora_unet_x_attn1_to_q.lora_down.weight", "lora_unet_x_attn1_to_q.lora_up.weight",
        "base_model.model.h.0.attn.c_attn.lora_A.default.weight",
        "base_model.model.h.0.attn.c_attn.lora_B.default.weight",
        "lora_unet_y.lokr_w1", "lora_unet_y.lokr_w2_a", "lora_unet_y.lokr_w2_b",
        "lora_unet_z.lokr_w1_a", "lora_unet_z.lokr_w1_b", "lora_unet_z.lokr_w2", "lora_unet_t.lokr_w1",
        "lora_unet_t.lokr_t2", "lora_unet_t.lokr_w2_a", "lora_unet_t.lokr_w2_b",
        "lora_unet_n.w_norm", "lora_unet_n.b_norm",
    ]
    shapes = [(4, 32), (32, 4), (4, 32), (32, 4), (4, 4), (8, 2), (2, 8), (4, 2), (2, 4), (8, 8), (4, 4),
              (2, 2, 3, 3), (2, 8), (2, 8), (8,), (8,)]
    params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    opt = HinaAdamW(named(params, names))
    info = opt.get_optimization_info()
    json.dumps(info)
    assert info["lora_stats"] == {"lora_a_params": 2, "lora_b_params": 2, "lora_pairs": 2,
                                  "lora_pairs_across_groups": 0, "unpaired_lora_params": 0,
                                  "name_sources": ["param_names"]}
    lokr = info["lokr_stats"]
    assert lokr["lokr_pairs"] == 3
    assert lokr["lokr_w1_params"] == 4 and lokr["lokr_w2_params"] == 6
    assert lokr["w_norm_params"] == 1 and lokr["b_norm_params"] == 1 and lokr["norm_pairs"] == 1
    diagnosis = opt.diagnose_lora_pairing()
    json.dumps(diagnosis)
    assert diagnosis["groups"][0]["name_source"] == "param_names"
    assert diagnosis["groups"][0]["unpaired_a"] == []


def test_lokr_w1_a_is_not_paired_with_w2_a():
    """The first implementation in the wild paired by substring stripping; pairs must be by module."""
    names = ["lora_unet_a.lokr_w1_a", "lora_unet_a.lokr_w1_b", "lora_unet_b.lokr_w2_a", "lora_unet_b.lokr_w2_b"]
    params = [torch.nn.Parameter(torch.zeros(4, 4)) for _ in names]
    info = HinaAdamW(named(params, names)).get_optimization_info()
    assert info["lokr_stats"]["lokr_pairs"] == 0


def test_shape_fallback_pairs_consecutive_lora_tensors_and_says_so():
    shapes = [(8, 64), (32, 8), (8, 16, 3, 3), (16, 8, 1, 1), (64,)]
    params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    opt = HinaAdamW(params)
    assert opt.get_optimization_info()["lora_stats"]["lora_pairs"] == 2
    group = opt.diagnose_lora_pairing()["groups"][0]
    assert group["name_source"] == "shape_fallback"
    assert "guessed" in group["note"]


def test_equal_tensors_are_not_paired_by_value():
    """Pairing never compares tensor values: two identical zero tensors with unrelated names stay unpaired."""
    names = ["a.lora_down.weight", "b.lora_up.weight"]
    params = [torch.nn.Parameter(torch.zeros(4, 4)) for _ in names]
    assert HinaAdamW(named(params, names)).get_optimization_info()["lora_stats"]["lora_pairs"] == 0


def test_names_from_param_groups_named_key_and_attach_names():
    module = torch.nn.ModuleDict({"m": torch.nn.ModuleDict({
        "lora_down": torch.nn.Linear(16, 4, bias=False), "lora_up": torch.nn.Linear(4, 16, bias=False)})})
    params = list(module.parameters())
    by_group = HinaAdamW([{"params": params, "param_names": [n for n, _ in module.named_parameters()]}])
    by_named = HinaAdamW([{"params": params, "named": [n for n, _ in module.named_parameters()]}])
    by_pairs = HinaAdamW(list(module.named_parameters()))
    attached = HinaAdamW([torch.zeros(3, requires_grad=True)] + params).attach_names(module)
    for opt in (by_group, by_named, by_pairs):
        assert opt.get_optimization_info()["lora_stats"]["lora_pairs"] == 1
        assert opt.diagnose_lora_pairing()["groups"][0]["name_source"] == "param_names"
    assert attached.get_optimization_info()["lora_stats"]["lora_pairs"] == 1


@pytest.mark.parametrize("kwargs, match", [
    (dict(lr=-1.0), "Invalid learning rate"),
    (dict(betas=(0.9,)), "betas"),
    (dict(betas=(0.9, 1.5)), "beta parameter at index 1"),
    (dict(optim_bits=4), "optim_bits: 4"),
    (dict(block_size=100), "block_size: 100"),
    (dict(tam_beta=1.0), "tam_beta"),
    (dict(wd_decay_factor=0.0), "wd_decay_factor"),
])
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HinaAdamW(make_params(), **kwargs)


def test_empty_parameter_list_is_an_error():
    with pytest.raises(ValueError, match="empty parameter list"):
        HinaAdamW([])


def test_defaults_reduce_a_regression_loss():
    torch.manual_seed(0)
    x = torch.randn(256, 16)
    y = x @ torch.randn(16, 1)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    opt = HinaAdamW(model.named_parameters(), lr=1e-2)
    first = None
    for _ in range(200):
        loss = torch.nn.functional.mse_loss(model(x), y)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1 * first


@pytest.mark.parametrize("bits", [8, 32])
@pytest.mark.parametrize("orthogonal", [False, True])
def test_huge_finite_gradient_is_skipped_and_counted(bits, orthogonal):
    """A gradient of 1e20 is finite, but its square overflows float32 (as does ⊥Grad's norm): the tensor is
    skipped like a non-finite one, counted, its weights and states untouched; the other tensor steps."""
    params = make_params(shapes=[(16, 64), (64, 16)])
    opt = HinaAdamW(params, lr=1e-3, min_8bit_size=0, optim_bits=bits, use_orthogonal_grad=orthogonal)
    run(opt, params, 2)
    before = [p.detach().clone() for p in params]
    states = {k: v.clone() for k, v in opt.state[params[0]].items() if isinstance(v, torch.Tensor)}
    params[0].grad = torch.full((16, 64), 1e20)
    params[1].grad = torch.randn(64, 16)
    opt.step()
    assert torch.equal(params[0], before[0])
    assert not torch.equal(params[1], before[1])
    assert all(torch.equal(opt.state[params[0]][k], v) for k, v in states.items())
    assert opt.state[params[0]]["step"] == 2 and opt.state[params[1]]["step"] == 3
    assert opt.get_optimization_info()["training_stats"]["skipped_updates"] == 1


def test_nonfinite_8bit_state_falls_back_to_fp32_with_a_warning():
    """A non-finite 8-bit state (here: written into the storage) has no code: the tensor's states move to
    fp32 (with a warning) instead of being stored as garbage, and a state_dict saved after that loads."""
    params = make_params(shapes=[(16, 64), (64, 16)])
    opt = HinaAdamW(params, lr=1e-3, min_8bit_size=0, **ALL_OFF)
    run(opt, params, 2)
    opt.state[params[0]]["exp_avg_sq_absmax"].fill_(float("inf"))
    with pytest.warns(RuntimeWarning, match="fp32"):
        run(opt, params, 1, start=2)
    state = opt.state[params[0]]
    assert state["exp_avg_sq"].dtype == torch.float32 and not torch.isfinite(state["exp_avg_sq"]).all()
    assert "exp_avg_sq_absmax" not in state
    assert opt.state[params[1]]["exp_avg_sq"].dtype == torch.uint8  # the other tensor stays 8-bit
    for p in params:  # a finite restart for the round trip below
        p.data.nan_to_num_(0.0)
    state["exp_avg_sq"].nan_to_num_(0.0, posinf=1.0)
    state["exp_avg"].nan_to_num_(0.0)
    run(opt, params, 2, start=3)
    assert all(torch.isfinite(p).all() for p in params)

    restored = clone(params)
    opt_b = HinaAdamW(restored, lr=1e-3, min_8bit_size=0, **ALL_OFF)
    opt_b.load_state_dict(opt.state_dict())
    run(opt, params, 1, start=5)
    run(opt_b, restored, 1, start=5)
    for a, b in zip(params, restored):
        assert torch.equal(a, b)
