"""Pairing across param groups (kohya's LoRA+ splits A and B into different groups), complete LoKr modules,
the "groups already apply LoRA+" detection, and the notice for unnamed parameters."""

from __future__ import annotations

import pytest
import torch

from library.hina import naming
from library.hina.naming import GroupParams


def named(*names_and_shapes):
    names = [n for n, _ in names_and_shapes]
    shapes = [s for _, s in names_and_shapes]
    return names, shapes


def group(lr, *names_and_shapes):
    names, shapes = named(*names_and_shapes)
    return GroupParams(names, shapes, "param_names", lr)


def test_lora_pairs_are_formed_across_groups_by_prefix():
    # kohya LoRA+ layout: downs in one group, ups in another, at 16x the lr
    groups = [group(1e-3, ("lora_unet_q.lora_down.weight", (4, 32)), ("lora_unet_k.lora_down.weight", (4, 32))),
              group(1.6e-2, ("lora_unet_q.lora_up.weight", (32, 4)), ("lora_unet_k.lora_up.weight", (64, 4)))]
    model = naming.pair_groups(groups)
    assert sorted(model.lora_pairs) == [((0, 0), (1, 0)), ((0, 1), (1, 1))]
    counts = model.counts()
    assert counts["lora_pairs"] == 2 and counts["lora_pairs_across_groups"] == 2 and counts["unpaired_lora"] == 0
    # each group on its own finds nothing: that was the bug (408 unpaired in the real run)
    assert [len(p.lora_pairs) for p in model.groups] == [0, 0]
    assert [p.roles() for p in model.groups] == [["lora_a", "lora_a"], ["lora_b", "lora_b"]]


def test_lora_pair_inside_one_group_is_kept_per_group_too():
    model = naming.pair_groups([group(1e-3, ("m.lora_down.weight", (2, 8)), ("m.lora_up.weight", (8, 2)))])
    assert model.lora_pairs == [((0, 0), (0, 1))] and model.groups[0].lora_pairs == [(0, 1)]
    assert model.counts()["lora_pairs_across_groups"] == 0


@pytest.mark.parametrize("roles, complete", [
    (("lokr_w1", "lokr_w2"), True),
    (("lokr_w1", "lokr_w2_a", "lokr_w2_b"), True),
    (("lokr_w1_a", "lokr_w1_b", "lokr_w2"), True),
    (("lokr_t2", "lokr_w1", "lokr_w2_a", "lokr_w2_b"), True),
    (("lokr_w1", "lokr_w2_a"), False),     # w2_b missing
    (("lokr_w1_a", "lokr_w2"), False),     # w1_b missing
    (("lokr_w2",), False),
    ((), False),
])
def test_lokr_factors_complete(roles, complete):
    assert naming.lokr_factors_complete(roles) is complete


def test_lokr_module_split_across_groups_counts_once_and_only_when_complete():
    # the real-run failure: lokr_w1 + lokr_w2_a in the base group, lokr_w2_b in the LoRA+ group
    base = group(1e-3, ("a.lokr_w1", (4, 4)), ("a.lokr_w2_a", (8, 2)),
                 ("b.lokr_w1", (4, 4)), ("b.lokr_w2_a", (8, 2)))
    plus = group(1.6e-2, ("a.lokr_w2_b", (2, 8)))
    per_group = [naming.pair_parameters(g.names, g.shapes, "param_names") for g in (base, plus)]
    assert [len(p.lokr_pairs) for p in per_group] == [0, 0]  # incomplete inside each group: not a pair
    model = naming.pair_groups([base, plus])
    assert [m.prefix for m in model.lokr_pairs] == ["a"]
    assert model.lokr_pairs[0].w1 == ((0, 0),) and model.lokr_pairs[0].w2 == ((0, 1), (1, 0))
    assert model.counts()["lokr_pairs"] == 1 and model.counts()["lokr_incomplete_modules"] == 1  # "b" lacks w2_b


def test_split_lora_plus_is_detected_from_lrs_and_gives_the_ratio():
    groups = [group(1e-4, ("te.lora_down.weight", (4, 32))), group(1.6e-3, ("te.lora_up.weight", (32, 4))),
              group(1e-3, ("un.lora_down.weight", (4, 32))), group(8e-3, ("un.lora_up.weight", (32, 4)))]
    model = naming.pair_groups(groups)
    split = naming.detect_split_lora_plus(model, [g.lr for g in groups])
    assert split.b_groups == {1, 3}
    assert split.ratios[1] == pytest.approx(16.0) and split.ratios[3] == pytest.approx(8.0)
    text = split.message("HinaAdamW", 16.0)
    assert "ratio 8, 16" in text and "alora_ratio=16 is not applied" in text and "groups [1, 3]" in text


def test_split_groups_with_equal_lrs_or_one_group_are_not_lora_plus():
    same = [group(1e-3, ("m.lora_down.weight", (4, 32))), group(1e-3, ("m.lora_up.weight", (32, 4)))]
    assert naming.detect_split_lora_plus(naming.pair_groups(same), [1e-3, 1e-3]) is None
    one = [group(1e-3, ("m.lora_down.weight", (4, 32)), ("m.lora_up.weight", (32, 4)))]
    assert naming.detect_split_lora_plus(naming.pair_groups(one), [1e-3]) is None
    with pytest.raises(ValueError, match="1 lrs for 2 param groups"):
        naming.detect_split_lora_plus(naming.pair_groups(same), [1e-3])


def test_split_lokr_zero_init_side_is_detected():
    groups = [group(1e-3, ("a.lokr_w1", (4, 4)), ("a.lokr_w2_a", (8, 2))), group(4e-3, ("a.lokr_w2_b", (2, 8)))]
    split = naming.detect_split_lora_plus(naming.pair_groups(groups), [1e-3, 4e-3])
    assert split.b_groups == {1} and split.ratios[1] == pytest.approx(4.0)


def test_unnamed_lora_plus_groups_pair_by_shape_element_wise():
    # stock sd-scripts with loraplus: no names, a group of downs and a group of the ups in the same order
    downs = GroupParams(None, [(4, 32), (4, 64, 3, 3)], "param_names", 1e-3)
    ups = GroupParams(None, [(64, 4), (32, 4, 1, 1)], "param_names", 1.6e-2)
    model = naming.pair_groups([downs, ups])
    assert model.lora_pairs == [((0, 0), (1, 0)), ((0, 1), (1, 1))]
    assert [p.name_source for p in model.groups] == ["shape_fallback", "shape_fallback"]
    assert model.groups[1].roles() == ["lora_b", "lora_b"]
    split = naming.detect_split_lora_plus(model, [1e-3, 1.6e-2])
    assert split.b_groups == {1} and split.ratios[1] == pytest.approx(16.0)
    # shapes that do not line up are left alone
    other = GroupParams(None, [(64, 4), (7, 5)], "param_names", 1.6e-2)
    assert naming.pair_groups([downs, other]).lora_pairs == []


def test_notice_for_unnamed_parameters_names_the_hook():
    unnamed = [GroupParams(None, [(4, 32), (32, 4)], "param_names", 1e-3)]
    text = naming.unnamed_parameters_notice(naming.pair_groups(unnamed), "HinaAdamW")
    assert "1 of 1 param groups" in text and "(1 pairs)" in text
    assert "train_network_hina.py --sd_scripts" in text and "library.hina.kohya.install()" in text
    assert "LoKr" in text
    names = [group(1e-3, ("m.lora_down.weight", (4, 32)), ("m.lora_up.weight", (32, 4)))]
    assert naming.unnamed_parameters_notice(naming.pair_groups(names), "HinaAdamW") is None


def test_our_lokr_network_with_loraplus_pairs_every_module_across_groups():
    diffusers = pytest.importorskip("diffusers")
    from networks import lokr

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        cross_attention_dim=32, attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=8)
    network = lokr.create_network(1.0, 2, 1.0, None, None, unet, factor="4", decompose_both="True",
                                  loraplus_lr_ratio="16")
    groups, descriptions = network.prepare_optimizer_params(None, 1e-3, 1e-3)
    assert descriptions == ["unet", "unet plus"]
    model = naming.pair_groups([GroupParams(g["param_names"], [tuple(p.shape) for p in g["params"]],
                                            "param_names", g["lr"]) for g in groups])
    assert model.counts()["lokr_pairs"] == len(network.unet_loras) > 10
    assert model.counts()["lokr_incomplete_modules"] == 0
    split = naming.detect_split_lora_plus(model, [g["lr"] for g in groups])
    assert split.b_groups == {1} and split.ratios[1] == pytest.approx(16.0)
