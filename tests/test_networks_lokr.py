"""networks/lokr.py against LyCORIS's own LoKr (package lycoris-lora) on a tiny SD-architecture UNet.

LyCORIS is the reference: shapes come from its ``LokrModule`` constructor, files are read back through
its per-module loader (``lycoris.modules.get_module``/``make_module``, what its
``kohya.create_network_from_weights`` runs for each module), and outputs are compared module by module.
LyCORIS's whole-network constructor (``lycoris.kohya.create_network``) is not used: on this tiny UNet it
stops at "duplicated lora name: lora_unet_time_embedding_linear_1".
"""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn as nn

lycoris_general = pytest.importorskip("lycoris.functional.general")
lycoris_modules = pytest.importorskip("lycoris.modules")
from lycoris.modules.lokr import LokrModule  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from library.hina import naming  # noqa: E402
from networks import lokr  # noqa: E402

logging.getLogger("LyCORIS").setLevel(logging.ERROR)


@pytest.fixture(scope="module")
def models():
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        cross_attention_dim=32, attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=8).eval()
    config = transformers.CLIPTextConfig(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, max_position_embeddings=77)
    text_encoder = transformers.CLIPTextModel(config).eval()
    return unet, text_encoder


def randomize(module: nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


def layer_input(layer: nn.Module) -> torch.Tensor:
    if isinstance(layer, nn.Conv2d):
        return torch.randn(2, layer.in_channels, 6, 6)
    return torch.randn(2, 3, layer.in_features)


# ----------------------------------------------------------------------------------------------------
def test_factorization_matches_lycoris():
    for dimension in list(range(1, 200)) + [320, 360, 640, 768, 1024, 1280, 2048, 2560]:
        for factor in (-1, 0, 1, 2, 3, 4, 8, 16, 7):
            assert lokr.factorization(dimension, factor) == lycoris_general.factorization(dimension, factor), \
                (dimension, factor)


LAYERS = {
    "linear": lambda: nn.Linear(64, 96),
    "conv3x3": lambda: nn.Conv2d(64, 32, 3, padding=1),
    "conv1x1": lambda: nn.Conv2d(32, 64, 1),
    "conv_stride": lambda: nn.Conv2d(32, 32, 3, stride=2, padding=1),
}
CONFIGS = [  # (dim, factor, decompose_both, full_matrix, use_tucker)
    (2, -1, False, False, False), (2, -1, True, False, False), (1, 4, True, False, False),
    (2, 8, False, False, False), (4, -1, False, True, False), (2, -1, False, False, True),
    (1, 4, True, False, True), (8, -1, False, False, False),
]


@pytest.mark.parametrize("layer_kind", sorted(LAYERS))
@pytest.mark.parametrize("dim,factor,decompose_both,full_matrix,use_tucker", CONFIGS)
def test_module_matches_lycoris_both_ways(layer_kind, dim, factor, decompose_both, full_matrix, use_tucker):
    torch.manual_seed(1)
    layer = LAYERS[layer_kind]()
    alpha = 3.0
    theirs = LokrModule("m", layer, 1.0, dim, alpha, factor=factor, decompose_both=decompose_both,
                        full_matrix=full_matrix, use_tucker=use_tucker)
    plan = lokr.plan_lokr(tuple(layer.weight.shape), dim, factor, decompose_both, full_matrix, use_tucker)
    ours = lokr.LoKrModule("m", layer, plan, dim, alpha)
    their_sd = theirs.state_dict()
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in their_sd.items()}
    assert float(ours.alpha) == pytest.approx(float(their_sd["alpha"]))
    # Init as LyCORIS: the zero-init factor is zero, so ΔW starts at 0.
    assert torch.count_nonzero(ours.get_delta_weight()) == 0

    x = layer_input(layer)
    # ours -> LyCORIS
    randomize(ours, seed=2)
    theirs.load_state_dict(ours.state_dict())
    with torch.no_grad():
        expected = theirs(x)
        assert torch.allclose(ours(x), expected, atol=1e-5, rtol=1e-4)
        assert not torch.allclose(expected, layer(x), atol=1e-4)
    # LyCORIS -> ours
    randomize(theirs, seed=3)
    ours.load_state_dict(theirs.state_dict())
    with torch.no_grad():
        assert torch.allclose(ours(x), theirs(x), atol=1e-5, rtol=1e-4)


def test_both_full_forces_scale_one():
    layer = nn.Linear(16, 16)
    plan = lokr.plan_lokr((16, 16), 8, full_matrix=True)
    assert set(plan) == {naming.LOKR_W1, naming.LOKR_W2}
    module = lokr.LoKrModule("m", layer, plan, 8, alpha=1.0)
    assert module.scale == 1.0 and float(module.alpha) == 8.0


def _lycoris_file(path: str, layers, make_module) -> tuple[dict, dict]:
    """LyCORIS modules ``make_module(index, name, layer)`` with random weights, saved to ``path``: (modules, state)."""
    theirs, weights_sd = {}, {}
    for index, (name, layer) in enumerate(layers):
        module = make_module(index, name, layer)
        randomize(module, seed=index)
        theirs[name] = module
        weights_sd.update(module.state_dict(prefix=name + "."))
    save_file(weights_sd, path)
    return theirs, weights_sd


def _network(models, **args):
    unet, text_encoder = models
    defaults = {"conv_dim": "2", "conv_alpha": "1"}
    defaults.update(args)
    network = lokr.create_network(1.0, 2, 4.0, None, text_encoder, unet, **defaults)
    for index, module in enumerate(network.unet_loras + network.text_encoder_loras):
        randomize(module, seed=100 + index)
    return network


@pytest.mark.parametrize("args", [{}, {"decompose_both": "True", "factor": "4"}, {"full_matrix": "True"},
                                  {"factor": "8", "use_tucker": "True"}])
def test_our_file_loads_in_lycoris_and_gives_same_output(models, tmp_path, args):
    network = _network(models, **args)
    path = str(tmp_path / "lokr.safetensors")
    network.save_weights(path, torch.float32, {"ss_network_module": "networks.lokr"})
    weights_sd = load_file(path)
    assert set(weights_sd) == set(network.state_dict())
    checked = 0
    for module in network.unet_loras + network.text_encoder_loras:
        lyco_type, params = lycoris_modules.get_module(weights_sd, module.lora_name)
        if naming.LOKR_T2 in module.state_dict():
            # LyCORIS's make_module_from_state_dict reads the rank of a Tucker file from lokr_w2_a's 2nd
            # dim (b, not the rank), so it cannot rebuild these; build LyCORIS's module from the config.
            theirs = LokrModule(module.lora_name, module.org_module, 1.0, module.lora_dim, float(module.alpha),
                                factor=8, use_tucker=True)
            theirs.load_state_dict({k.split(".", 1)[1]: v for k, v in weights_sd.items()
                                    if k.startswith(module.lora_name + ".")})
        else:
            with torch.no_grad():
                theirs = lycoris_modules.make_module(lyco_type, params, module.lora_name, module.org_module)
        assert isinstance(theirs, LokrModule)
        x = layer_input(module.org_module)
        with torch.no_grad():
            assert torch.allclose(module.eval()(x), theirs.eval()(x), atol=1e-5, rtol=1e-4), module.lora_name
        checked += 1
    assert checked == len(network.unet_loras) + len(network.text_encoder_loras) > 50


def test_lycoris_state_dict_loads_in_ours(models, tmp_path):
    unet, text_encoder = models
    te_layers, unet_layers = lokr.find_targets(text_encoder, unet, with_conv=True)
    path = str(tmp_path / "lycoris.safetensors")
    theirs, weights_sd = _lycoris_file(path, unet_layers + te_layers[0], lambda index, name, layer: LokrModule(
        name, layer, 1.0, 2 if index % 2 else 4, 2.0, decompose_both=bool(index % 3 == 0), factor=-1))
    network, returned = lokr.create_network_from_weights(1.0, path, None, text_encoder, unet)
    info = network.load_weights(path)
    assert not info.missing_keys and not info.unexpected_keys
    assert set(network.state_dict()) == set(weights_sd)
    for module in network.unet_loras + network.text_encoder_loras:
        x = layer_input(module.org_module)
        with torch.no_grad():
            assert torch.allclose(module.eval()(x), theirs[module.lora_name](x), atol=1e-5, rtol=1e-4)
    # Keys round-trip: our save of the LyCORIS file has the same keys and values.
    network.save_weights(str(tmp_path / "again.safetensors"), None, None)
    again = load_file(str(tmp_path / "again.safetensors"))
    assert set(again) == set(weights_sd)
    assert all(torch.equal(again[k], weights_sd[k].float()) for k in weights_sd)


def test_param_names_classify_and_pair(models):
    network = _network(models, decompose_both="True", factor="4")
    groups, descriptions = network.prepare_optimizer_params(1e-4, 2e-4, 3e-4)
    assert descriptions == ["textencoder", "unet"]
    assert [g["lr"] for g in groups] == [1e-4, 2e-4]
    names = [n for g in groups for n in g["param_names"]]
    params = [p for g in groups for p in g["params"]]
    assert all(len(g["param_names"]) == len(g["params"]) for g in groups)
    named = dict(network.named_parameters())
    assert all(named[n] is p for n, p in zip(names, params))
    assert any(n.startswith("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lokr_w1")
               for n in names)
    pairing = naming.pair_parameters(names, [tuple(p.shape) for p in params], "param_names")
    assert len(pairing.lokr_pairs) == len(network.unet_loras) + len(network.text_encoder_loras)
    assert pairing.count("other") == 0 and not pairing.lora_pairs


def test_network_wraps_forward_and_multiplier(models):
    unet, text_encoder = models
    torch.manual_seed(0)
    x, t, context = torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 5, 32)
    with torch.no_grad():
        before = unet(x, t, context).sample
    network = _network(models)
    network.apply_to(text_encoder, unet, apply_text_encoder=True, apply_unet=True)
    try:
        network.eval()
        with torch.no_grad():
            changed = unet(x, t, context).sample
            network.set_multiplier(0.0)
            off = unet(x, t, context).sample
        assert not torch.allclose(changed, before, atol=1e-4)
        assert torch.allclose(off, before, atol=1e-6)
    finally:
        network.restore()
    with torch.no_grad():
        assert torch.allclose(unet(x, t, context).sample, before)


def test_module_dropout_leaves_grad_none_and_rank_dropout_zeroes_rows():
    layer = nn.Linear(16, 16)
    plan = lokr.plan_lokr((16, 16), 2)
    module = lokr.LoKrModule("m", layer, plan, 2, 1.0, module_dropout=0.999999)
    randomize(module, seed=0)
    module.apply_to()
    module.train()
    layer(torch.randn(3, 16)).sum().backward()
    assert all(p.grad is None for p in module.parameters())
    module.eval()
    layer(torch.randn(3, 16)).sum().backward()
    assert all(p.grad is not None for p in module.parameters())

    dropping = lokr.LoKrModule("r", nn.Linear(16, 16, bias=False), plan, 2, 1.0, rank_dropout=0.5)
    randomize(dropping, seed=1)
    dropping.train()
    torch.manual_seed(0)
    with torch.no_grad():
        delta_out = dropping(torch.eye(16)) - dropping.org_module(torch.eye(16))
    zero_rows = (delta_out.abs().sum(0) == 0).sum().item()  # output features switched off this step
    assert 0 < zero_rows < 16


def test_load_weights_errors_name_the_key(models, tmp_path):
    network = _network(models)
    path = str(tmp_path / "a.safetensors")
    network.save_weights(path, None, None)
    weights = load_file(path)
    key = next(k for k in weights if k.endswith(naming.LOKR_W1))
    weights[key] = torch.zeros(weights[key].shape[0] + 1, weights[key].shape[1])
    save_file(weights, path)
    with pytest.raises(ValueError, match="shape mismatches: " + key.replace(".", r"\.")):
        network.load_weights(path)
    other = _network(models, decompose_both="True", factor="8")
    other.save_weights(path, None, None)
    with pytest.raises(ValueError, match=r"missing keys: \S+\.lokr_w1\b.*unexpected keys: \S+\.lokr_w1_a"):
        network.load_weights(path)


def test_bad_network_args_are_named(models):
    unet, text_encoder = models
    with pytest.raises(ValueError, match="unknown network arg 'factr'"):
        lokr.create_network(1.0, 4, 1, None, text_encoder, unet, factr="4")
    with pytest.raises(ValueError, match="decompose_both='maybe'"):
        lokr.create_network(1.0, 4, 1, None, text_encoder, unet, decompose_both="maybe")
    with pytest.raises(ValueError, match="'block_dims' is not supported"):
        lokr.create_network(1.0, 4, 1, None, text_encoder, unet, block_dims="4,4")
    assert math.isfinite(lokr.LoKrModule("m", nn.Linear(4, 4), lokr.plan_lokr((4, 4), 1), 1, 0).scale)


def test_lycoris_modules_outside_kohya_targets_load(models, tmp_path):
    # LyCORIS presets adapt layers kohya's targets never reach (time_embedding, conv_in); such a file used to
    # fail with "LoKr modules name layers this model does not have" although the model has them.
    unet, text_encoder = models
    te_layers, unet_layers = lokr.find_targets(text_encoder, unet, with_conv=True)
    targeted = dict(unet_layers)
    extra = {"lora_unet_time_embedding_linear_1": unet.time_embedding.linear_1, "lora_unet_conv_in": unet.conv_in}
    assert not set(extra) & set(targeted)
    layers = {**extra, unet_layers[0][0]: unet_layers[0][1]}
    path = str(tmp_path / "lycoris_extra.safetensors")
    theirs, weights_sd = _lycoris_file(path, layers.items(),
                                       lambda index, name, layer: LokrModule(name, layer, 1.0, 4, 2.0, factor=-1))
    network, _ = lokr.create_network_from_weights(1.0, path, None, text_encoder, unet)
    info = network.load_weights(path)
    assert not info.missing_keys and not info.unexpected_keys
    assert sorted(m.lora_name for m in network.unet_loras) == sorted(layers)
    for module in network.unet_loras:
        x = layer_input(module.org_module)
        with torch.no_grad():
            assert torch.allclose(module.eval()(x), theirs[module.lora_name](x), atol=1e-5, rtol=1e-4)
    # a name that is no layer at all is still an error that names it
    weights_sd["lora_unet_no_such_layer.lokr_w1"] = torch.zeros(2, 2)
    save_file(weights_sd, path)
    with pytest.raises(ValueError, match="1 LoKr modules name layers this model does not have .*lora_unet_no_such_layer"):
        lokr.create_network_from_weights(1.0, path, None, text_encoder, unet)
