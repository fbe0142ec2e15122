"""kohya's LoRA+ (loraplus_lr_ratio) and HinaAdamW's B-side ratio apply once (issue 12 items 2 and 6).

kohya's network puts ``lora_down`` and ``lora_up`` in separate param groups, the up group at ratio x lr.
The optimizer pairs by name across groups (``naming.pair_groups``), sees that the groups already carry the
ratio, and gives the B side a multiplier of 1.0 there, with one warning; without names (stock sd-scripts)
it says so once at the first step.
"""

import warnings

import torch

from library.hina import HinaAdamW

# every technique off but use_alora (the B-side ratio these tests are about; off by default since issue 16)
ALL_OFF = dict(use_spd=False, use_cautious=False, use_grams=False, use_agr=False, use_tam=False, use_alora=True,
               dynamic_weight_decay=False, weight_decay=0.0, optim_bits=32, compile_step=False)


def _lora(seed: int):
    gen = torch.Generator().manual_seed(seed)
    named = []
    for prefix in ("lora_unet_a", "lora_unet_b"):
        named.append((f"{prefix}.lora_down.weight", torch.nn.Parameter(torch.randn(4, 32, generator=gen) * 0.1)))
        named.append((f"{prefix}.lora_up.weight", torch.nn.Parameter(torch.randn(32, 4, generator=gen) * 0.1)))
    return named


def _step(opt, named):
    gen = torch.Generator().manual_seed(1)
    for _, p in named:
        p.grad = torch.randn(p.shape, generator=gen)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()
    return [str(w.message) for w in caught]


def _split_groups(named, lr, ratio, with_names=True):
    downs = [(n, p) for n, p in named if "lora_down" in n]
    ups = [(n, p) for n, p in named if "lora_up" in n]
    groups = [{"params": [p for _, p in downs], "lr": lr}, {"params": [p for _, p in ups], "lr": lr * ratio}]
    if with_names:
        groups[0]["param_names"] = [n for n, _ in downs]
        groups[1]["param_names"] = [n for n, _ in ups]
    return groups


def test_kohya_loraplus_groups_and_alora_ratio_apply_once():
    one_group = _lora(0)
    reference = HinaAdamW(one_group, lr=1e-3, alora_ratio=16.0, **ALL_OFF)  # our ratio, one group
    _step(reference, one_group)

    split = _lora(0)
    opt = HinaAdamW(_split_groups(split, 1e-3, 16.0), lr=1e-3, alora_ratio=16.0, **ALL_OFF)
    messages = _step(opt, split)
    assert sum("that ratio wins" in m for m in messages) == 1
    for (name, expected), (_, got) in zip(one_group, split):
        assert torch.equal(expected, got), name  # B side at 16x lr, not 256x
    info = opt.get_optimization_info()["lora_stats"]
    assert (info["lora_pairs"], info["lora_pairs_across_groups"], info["unpaired_lora_params"]) == (2, 2, 0)
    assert opt.diagnose_lora_pairing()["lora_plus_from_groups"] == [1]
    assert not any("that ratio wins" in m for m in _step(opt, split))  # said once


def test_unnamed_split_groups_stock_sd_scripts():
    """Stock sd-scripts passes no names: the split groups pair by shape, the ratio still applies once, and
    one warning names the hook."""
    one_group = _lora(0)
    reference = HinaAdamW(one_group, lr=1e-3, alora_ratio=16.0, **ALL_OFF)
    _step(reference, one_group)

    split = _lora(0)
    opt = HinaAdamW(_split_groups(split, 1e-3, 16.0, with_names=False), lr=1e-3, alora_ratio=16.0, **ALL_OFF)
    messages = _step(opt, split)
    assert sum("no parameter names reached the optimizer" in m and "--sd_scripts" in m for m in messages) == 1
    for (name, expected), (_, got) in zip(one_group, split):
        assert torch.equal(expected, got), name
    assert not any("no parameter names" in m for m in _step(opt, split))


def test_warmup_scheduler_does_not_hide_the_group_ratio():
    """A warm-up that starts at lr 0 still shows the groups' ratio (the scheduler's initial_lr is read)."""
    split = _lora(0)
    opt = HinaAdamW(_split_groups(split, 1e-3, 16.0), lr=1e-3, alora_ratio=16.0, **ALL_OFF)
    torch.optim.lr_scheduler.LambdaLR(opt, lambda step: step / 10)
    assert opt.param_groups[0]["lr"] == 0.0
    messages = _step(opt, split)
    assert sum("that ratio wins" in m for m in messages) == 1
