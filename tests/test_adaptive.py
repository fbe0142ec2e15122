"""AdamW_HinaAdaptive: relationship discovery on an unnamed kohya-style LoRA, importance, lr mask."""

import torch
from _hina_cases import workspace_by_model_size

from library.hina import AdamW_HinaAdaptive
from library.hina.techniques.importance import MULTIPLIER_BOUNDS, importance_multiplier
from library.hina.techniques.relationships import composes, compatibility


class LoRALinear(torch.nn.Module):
    """kohya networks/lora.py LoRAModule in miniature: lora_down (r, in), lora_up (out, r) zero-initialised."""

    def __init__(self, base: torch.nn.Linear, rank: int, gen: torch.Generator):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.lora_down = torch.nn.Linear(base.in_features, rank, bias=False)
        self.lora_up = torch.nn.Linear(rank, base.out_features, bias=False)
        with torch.no_grad():
            self.lora_down.weight.copy_(torch.randn(self.lora_down.weight.shape, generator=gen) * 0.3)
            self.lora_up.weight.zero_()
        self.scale = 0.5

    def forward(self, x):
        return self.base(x) + self.lora_up(self.lora_down(x)) * self.scale


def lora_net(gen):
    dims = [(24, 24), (24, 24), (24, 24), (24, 40), (40, 24)]
    return torch.nn.ModuleList([LoRALinear(torch.nn.Linear(i, o), 4, gen) for i, o in dims])


def forward(net, x):
    for layer in net:
        x = torch.tanh(layer(x))
    return x


def train_unnamed(steps=10, interval=10, seed=0):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = lora_net(gen)
    downs = [m.lora_down.weight for m in net]
    ups = [m.lora_up.weight for m in net]
    params = downs + ups
    order = [7, 2, 9, 0, 5, 3, 8, 1, 6, 4]  # a fixed shuffle: pairs are not adjacent
    shuffled = [params[i] for i in order]
    opt = AdamW_HinaAdaptive(shuffled, lr=1e-2, max_lr=1e-1, relationship_discovery_interval=interval,
                             optim_bits=32)
    x = torch.randn(64, 24, generator=gen)
    y = torch.randn(64, 24, generator=gen)
    for _ in range(steps):
        loss = (forward(net, x) - y).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    # true pairs, as positions in the shuffled list: (down of module k, up of module k)
    true = {(order.index(k), order.index(k + 5)) for k in range(5)}
    return opt, true, shuffled


def test_discovery_finds_the_true_pairs_of_an_unnamed_lora():
    opt, true, _ = train_unnamed()
    summary = opt.get_relationship_summary()
    found = {(r["a_index"], r["b_index"]) for r in summary["relationships"]}
    assert found == true
    assert summary["total_relationships"] == 5
    for r in summary["relationships"]:
        assert r["compatibility"] > 0.99 and r["a_shape"][0] == r["b_shape"][1] == 4
        assert r["joint_importance"] is not None
    assert opt.diagnose_lora_pairing()["groups"][0]["name_source"] == "shape_fallback"


def test_discovery_is_deterministic_and_bounded():
    a, _, params_a = train_unnamed(steps=12)
    b, _, params_b = train_unnamed(steps=12)
    assert a.get_relationship_summary()["relationships"] == b.get_relationship_summary()["relationships"]
    for p, q in zip(params_a, params_b):
        assert torch.equal(p, q)
    first = a.discover_relationships()
    again = a.discover_relationships()
    assert first == again
    assert a.get_relationship_summary()["total_relationships"] == len(first) <= len(params_a) // 2
    indices = [i for x, y, _ in first for i in (x, y)]
    assert len(indices) == len(set(indices))


def test_compatibility_and_shapes():
    assert composes((4, 24), (40, 4)) and composes((4, 8, 3, 3), (16, 4, 1, 1))
    assert not composes((4, 24), (40, 5)) and not composes((24,), (40, 24)) and not composes((30, 24), (40, 30))
    s = torch.tensor([[1.0, -2.0, 3.0]])
    assert compatibility(s, s).item() == 1.0
    assert compatibility(s, -s).item() == 0.0
    assert compatibility(torch.zeros(1, 3), torch.zeros(1, 3)).item() == 0.0  # no evidence


def test_importance_multiplier_is_bounded_and_strength_zero_disables():
    importance = torch.tensor([-5.0, 0.0, 0.9, 1.0, 1.3, 10.0])
    mult = importance_multiplier(importance.clone(), 1.0)
    assert mult.min() >= MULTIPLIER_BOUNDS[0] and mult.max() <= MULTIPLIER_BOUNDS[1]
    assert torch.equal(importance_multiplier(importance.clone(), 0.0), torch.ones(6))
    opt, _, _ = train_unnamed(steps=6)
    analysis = opt.get_importance_analysis()
    assert analysis["total_parameters"] == 10
    assert set(analysis["importance_statistics"]) == {"mean", "max", "min", "std"}
    assert 0.0 <= analysis["importance_statistics"]["min"] <= analysis["importance_statistics"]["max"] <= 2.0


ALL_OFF = dict(use_spd=False, use_cautious=False, use_adopt_stability=False, use_grams=False, use_agr=False,
               use_tam=False, dynamic_weight_decay=False, use_dynamic_adaptation=False, weight_decay=0.0,
               optim_bits=32)


def test_lr_mask_bumps_relative_to_base_lr_and_freezes_during_warmup():
    p = torch.nn.Parameter(torch.zeros(10))
    opt = AdamW_HinaAdaptive([p], lr=1e-3, lr_bump=1e-4, min_lr=1e-5, max_lr=1.5e-3, warmup_steps=2, **ALL_OFF)
    ratios = []
    for _ in range(9):
        p.grad = torch.ones(10)  # the same sign every step: the mask grows
        opt.step()
        ratios.append(float(opt.state[p]["lr_mask"].abs().max()))
    # steps 1-2: warmup (frozen at 1); then +0.1 per step up to max_lr / lr = 1.5
    expected = [1.0, 1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.5, 1.5]
    assert all(abs(a - b) < 1e-6 for a, b in zip(ratios, expected)), ratios
    analysis = opt.get_lr_mask_analysis()["groups"][0]
    assert abs(analysis["effective_lr"]["max"] - 1.5e-3) < 1e-9 and analysis["fraction_at_max"] == 1.0
    # a scheduler halving the group lr halves every element's lr, the ratio is unchanged
    opt.param_groups[0]["lr"] = 5e-4
    assert abs(opt.get_lr_mask_analysis()["groups"][0]["effective_lr"]["max"] - 7.5e-4) < 1e-9
    # the sign flips: the ratio steps back down
    p.grad = -torch.ones(10)
    opt.step()
    assert abs(float(opt.state[p]["lr_mask"].abs().max()) - 1.4) < 1e-6


def test_invalid_arguments_are_named():
    p = [torch.nn.Parameter(torch.zeros(3))]
    for kwargs, word in ((dict(min_lr=0.0), "min_lr"), (dict(importance_decay=1.0), "importance_decay"),
                         (dict(relationship_discovery_interval=0), "relationship_discovery_interval"),
                         (dict(compatibility_threshold=2.0), "compatibility_threshold")):
        try:
            AdamW_HinaAdaptive(p, **kwargs)
        except ValueError as error:
            assert word in str(error)
        else:
            raise AssertionError(f"{kwargs} accepted")


def test_default_max_lr_lets_the_mask_reach_ten_times_the_base_lr_and_a_lower_cap_warns():
    import warnings

    from library.hina.techniques.lr_mask import DEFAULT_MAX_RATIO
    p = torch.nn.Parameter(torch.zeros(10))
    opt = AdamW_HinaAdaptive([p], lr=1e-3, lr_bump=2e-3, warmup_steps=0, **ALL_OFF)
    for _ in range(8):
        p.grad = torch.ones(10)
        opt.step()
    assert abs(float(opt.state[p]["lr_mask"].abs().max()) - DEFAULT_MAX_RATIO) < 1e-6  # 1 + 2 per step, capped
    assert opt.get_lr_mask_analysis()["groups"][0]["fraction_at_max"] == 1.0

    q = torch.nn.Parameter(torch.zeros(10))
    capped = AdamW_HinaAdaptive([q], lr=3e-3, max_lr=1e-3, **ALL_OFF)
    q.grad = torch.ones(10)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        capped.step()
    assert any("lr=0.003 is at or above max_lr=0.001" in str(w.message) for w in caught)
    assert abs(float(capped.state[q]["lr_mask"].abs().max()) - 1 / 3) < 1e-6  # the cap still applies, as asked


def test_lora_plus_ratio_applies_as_in_hina_adamw():
    """With its own features off, AdamW_HinaAdaptive steps a named LoRA exactly like HinaAdamW (LoRA+ and ALLoRA)."""
    from library.hina import HinaAdamW

    def run(cls, **kwargs):
        gen = torch.Generator().manual_seed(0)
        torch.manual_seed(0)
        net = lora_net(gen)
        named = [(n, p) for n, p in net.named_parameters() if p.requires_grad and "lora" in n]
        opt = cls(named, lr=1e-2, **kwargs)
        x = torch.randn(8, 24, generator=gen)
        for _ in range(3):
            opt.zero_grad()
            forward(net, x).square().mean().backward()
            opt.step()
        return [p.detach().clone() for _, p in named]

    off = dict(ALL_OFF, use_lr_mask=False)
    off = {**off, "use_alora": True}  # off by default in both classes (issue 16); on here, what this test is about
    adaptive = run(AdamW_HinaAdaptive, **off)
    reference = run(HinaAdamW, **{k: v for k, v in off.items() if k not in ("use_dynamic_adaptation", "use_lr_mask")})
    assert all(torch.equal(a, b) for a, b in zip(adaptive, reference))
    without = run(AdamW_HinaAdaptive, **{**off, "use_alora": False})
    assert not all(torch.equal(a, b) for a, b in zip(adaptive, without))


# --- the fused chunk step against the plain per-tensor reference (tests/_reference.py) -----------------------------
FUSED_SHAPES = ((16, 40), (40, 16), (7,), (3, 4, 3, 3), (8, 4, 1, 1), (300, 16), (16, 300))
FUSED_NAMES = ("a.lora_down.weight", "a.lora_up.weight", "b.alpha", "c.lora_down.weight", "c.lora_up.weight",
               "d.lora_up.weight", "d.lora_down.weight")


def _gradients(steps):
    """Per step, a gradient per tensor: none for one tensor at step 4, an inf in another at step 5 (skipped)."""
    g = torch.Generator().manual_seed(1)
    params = [torch.randn(s, generator=g) * 0.1 for s in FUSED_SHAPES]
    grads = []
    for t in range(steps):
        step = [None if (t == 4 and i == 2) else torch.randn(s, generator=g) for i, s in enumerate(FUSED_SHAPES)]
        if t == 5:
            step[3][0, 0, 0, 0] = float("inf")
        grads.append(step)
    return params, grads


import pytest  # noqa: E402

from _reference import AdaptiveReference  # noqa: E402


@pytest.mark.parametrize("chunk", [None, 512], ids=["one chunk", "several chunks"])
@pytest.mark.parametrize("bits", [32, 8])
def test_fused_chunk_step_matches_the_plain_reference(bits, chunk):
    """Eight steps with relationship discovery every 2 (joint importance of pairs inside one chunk and across
    chunks), the lr mask past its warm-up, ADOPT, TAM, SPD, Cautious, a tensor without gradient and one with an inf:
    the fused step equals the plain per-tensor reference (8-bit: states through the same codec after every step;
    within 1e-4 of the distance moved, measured ~1e-6)."""
    kwargs = dict(lr=1e-2, max_lr=1e-1, warmup_steps=1, relationship_discovery_interval=2)
    init, grads = _gradients(8)
    params = [torch.nn.Parameter(x.clone()) for x in init]
    opt = AdamW_HinaAdaptive([{"params": params, "named": list(FUSED_NAMES)}], compile_step=False, optim_bits=bits,
                             min_8bit_size=0, **kwargs)
    if chunk:
        opt.chunk_elements = chunk
    opt._check_roles_once()
    chunks = [pack.indices for pack in opt._layout(0, opt.param_groups[0]).chunks]
    assert (len(chunks) > 2) == bool(chunk)
    settings = {k: opt.defaults[k] for k in opt.defaults if k in AdaptiveReference.__init__.__code__.co_varnames}
    ref = AdaptiveReference(init, opt._pairings()[0].roles(), chunks, **settings,
                            eight_bit_block=opt.block_size if bits == 8 else None)
    for step in grads:
        for p, g in zip(params, step):
            p.grad = None if g is None else g.clone()
        opt.step()
        ref.step(step)
    assert opt.get_relationship_summary()["total_relationships"] > 0 and ref.partner
    assert opt.get_optimization_info()["training_stats"]["skipped_updates"] == ref.skipped == 1
    for name, p, expected, x0 in zip(FUSED_NAMES, params, ref.w, init):
        if bits == 32:
            torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-7)
        else:  # the same codec on both sides: what is left is float rounding carried through the codes
            moved = (expected - x0).norm()
            assert (p.detach() - expected).norm() <= 1e-4 * moved, name


def test_work_memory_is_bounded_by_the_chunk_not_the_model():
    """0.5M and 4M elements with 64K-element chunks: the same work pool, whatever the model size: gradient,
    weights, ALLoRA's coefficients and the four 8-bit states decoded to fp32 (m, v, previous gradient, lr mask)."""
    workspace = workspace_by_model_size(AdamW_HinaAdaptive)
    assert workspace[500_000] == workspace[4_000_000]
    assert 0 < workspace[4_000_000] <= 7 * 4 * (1 << 16)  # at most 7 fp32 chunk-sized buffers
