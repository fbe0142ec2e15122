"""The sd-scripts hook: registry names in get_optimizer, param_names from the network's modules, LoRA+ applied
once, delegation with --config_file.

The proof inside a real kohya-ss/sd-scripts checkout (its real train_network.py, every route) is
tests/test_sd_scripts_check.py, driving benchmarks/sd_scripts_check.py; see docs/SD_SCRIPTS.md.
"""

import argparse
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from library.hina import HinaAdamW, kohya

REPO = Path(__file__).resolve().parents[1]


class TinyLoRA(torch.nn.Module):
    def __init__(self, name, n_in, n_out, rank=2):
        super().__init__()
        self.lora_name = name
        self.lora_down = torch.nn.Linear(n_in, rank, bias=False)
        self.lora_up = torch.nn.Linear(rank, n_out, bias=False)


class KohyaStyleNetwork(torch.nn.Module):
    """Like sd-scripts' LoRANetwork: LoRA modules in plain lists, groups built from dict values."""

    def __init__(self, register=True):
        super().__init__()
        self.unet_loras = [TinyLoRA(f"lora_unet_block_{i}", 8, 8) for i in range(3)]
        self.text_encoder_loras = [TinyLoRA("lora_te_mlp_fc1", 8, 16)]
        if register:
            for lora in self.unet_loras + self.text_encoder_loras:
                self.add_module(lora.lora_name, lora)

    def prepare_optimizer_params(self, text_encoder_lr, unet_lr, default_lr):
        groups = []
        for loras, lr in ((self.text_encoder_loras, text_encoder_lr), (self.unet_loras, unet_lr)):
            params = {f"{l.lora_name}.{n}": p for l in loras for n, p in l.named_parameters()}
            groups.append({"params": params.values(), "lr": lr or default_lr})
        return groups, ["textencoder", "unet"]


def make_train_util():
    calls = []

    def get_optimizer(args, trainable_params):
        calls.append((args.optimizer_type, trainable_params))
        return "sd-scripts", "", None

    return types.SimpleNamespace(get_optimizer=get_optimizer, __name__="library.train_util"), calls


def sd_args(optimizer_type, *optimizer_args):
    return argparse.Namespace(optimizer_type=optimizer_type, optimizer_args=list(optimizer_args),
                              learning_rate=1e-3, use_8bit_adam=False, use_lion_optimizer=False,
                              fused_backward_pass=False)


def named_groups(register=True):
    network = KohyaStyleNetwork(register)
    wrapped = kohya._wrap_prepare(KohyaStyleNetwork.prepare_optimizer_params)
    groups, descriptions = wrapped(network, None, None, 1e-3)
    return network, groups, descriptions


@pytest.mark.parametrize("register", [True, False])
def test_groups_get_param_names_from_the_network(register):
    network, groups, descriptions = named_groups(register)
    assert descriptions == ["textencoder", "unet"]
    assert groups[0]["param_names"] == ["lora_te_mlp_fc1.lora_down.weight", "lora_te_mlp_fc1.lora_up.weight"]
    assert all(n.startswith("lora_unet_block_") for n in groups[1]["param_names"])
    optimizer = HinaAdamW(groups, lr=1e-3)
    assert optimizer.get_optimization_info()["lora_stats"]["lora_pairs"] == 4
    assert {g["name_source"] for g in optimizer.diagnose_lora_pairing()["groups"]} == {"param_names"}


def test_hook_routes_names():
    assert kohya.route("HinaAdamW") == ("registry", None)
    assert kohya.route("hinaadaptive") == ("registry", None)
    assert kohya.route("adamw_torch_fused") == ("registry", None)
    assert kohya.route("AdamW8bit") == ("sd-scripts", None)
    assert kohya.route("DAdaptAdamPreprint") == ("sd-scripts", None)
    assert kohya.route("schedule_free_adamw") == ("rename", "AdamWScheduleFree")
    assert kohya.route("adamw_8bit") == ("rename", "AdamW8bit")
    assert kohya.route("torch.optim.Adamax") == ("sd-scripts", None)


def test_install_wraps_get_optimizer_once_and_falls_through():
    train_util, calls = make_train_util()
    kohya.install(train_util, network_modules=())
    kohya.install(train_util, network_modules=())
    assert train_util.get_optimizer.__wrapped_original__.__name__ == "get_optimizer"
    _, groups, _ = named_groups()

    name, args_text, optimizer = train_util.get_optimizer(sd_args("HinaAdamW", "alora_ratio=20"), groups)
    assert name == "library.hina.hina_adamw.HinaAdamW" and args_text == "alora_ratio=20" and not calls
    assert isinstance(optimizer, HinaAdamW) and optimizer.param_groups[0]["alora_ratio"] == 20
    assert optimizer.get_optimization_info()["lora_stats"]["lora_pairs"] == 4

    train_util.get_optimizer(sd_args("AdamW"), groups)  # sd-scripts' own name: unchanged, names stripped
    assert calls[-1][0] == "AdamW" and all("param_names" not in g for g in calls[-1][1])
    train_util.get_optimizer(sd_args("schedule_free_adamw"), groups)
    assert calls[-1][0] == "AdamWScheduleFree"
    train_util.get_optimizer(sd_args("library.hina.HinaAdamW"), groups)  # a Hina path keeps the names
    assert all("param_names" in g for g in calls[-1][1])

    name, _, optimizer = train_util.get_optimizer(sd_args("adamw_torch_fused"), groups)
    assert type(optimizer) is torch.optim.AdamW and optimizer.param_groups[0]["fused"] is True
    assert "param_names" not in optimizer.param_groups[0]


def test_install_without_sd_scripts_patches_our_networks_only():
    done = kohya.install(network_modules=("no_such_module_xyz",))
    assert done["networks"] == {}


def test_wrap_network_module_patches_classes_defined_there():
    module = types.ModuleType("fake_networks")
    Network = type("Network", (KohyaStyleNetwork,), {"__module__": "fake_networks",
                                                      "prepare_optimizer_params": KohyaStyleNetwork.prepare_optimizer_params})
    module.Network = Network
    assert kohya.wrap_network_module(module) == ["Network"]
    assert kohya.wrap_network_module(module) == []  # already patched
    groups, _ = Network().prepare_optimizer_params(None, None, 1e-3)
    assert all("param_names" in g for g in groups)


def test_lycoris_lokr_network_names_classify():
    lycoris_kohya = pytest.importorskip("lycoris.kohya")
    from lycoris import create_lycoris

    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16))
    network = create_lycoris(model, 1.0, linear_dim=4, linear_alpha=1, algo="lokr", factor=4)
    network.apply_to()
    kohya.wrap_network_class(type(network))
    result = network.prepare_optimizer_params(1e-3)
    groups = result[0] if isinstance(result, tuple) else result
    names = [n for g in groups for n in g["param_names"]]
    assert names and all(n and "lokr_w" in n for n in names)
    optimizer = HinaAdamW(groups, lr=1e-3)
    assert optimizer.get_optimization_info()["lokr_stats"]["lokr_pairs"] == 2
    assert lycoris_kohya is not None


# ----------------------------------------------------------------------------------------------------------
# kohya's LoRA+ and use_alora: the ratio is applied once
def loraplus_groups(ratio=16.0, lr=1e-3):
    """What kohya's prepare_optimizer_params returns with loraplus_lr_ratio: downs and ups in two groups."""
    _, groups, _ = named_groups()
    downs = [(n, p) for g in groups for n, p in zip(g["param_names"], g["params"]) if ".lora_down." in n]
    ups = [(n, p) for g in groups for n, p in zip(g["param_names"], g["params"]) if ".lora_up." in n]
    return [{"params": [p for _, p in downs], "param_names": [n for n, _ in downs], "lr": lr},
            {"params": [p for _, p in ups], "param_names": [n for n, _ in ups], "lr": lr * ratio}]


@pytest.mark.parametrize("optimizer_type", ["HinaAdamW", "AdamW_HinaAdaptive"])
def test_kohya_loraplus_wins_and_alora_ratio_is_not_applied_on_top(optimizer_type, capsys):
    train_util, _ = make_train_util()
    kohya.install(train_util, network_modules=())
    args = sd_args(optimizer_type, "use_alora=True")  # HinaAdamW's default is off (issue 16)
    args.network_args = ["loraplus_lr_ratio=16"]
    _, _, optimizer = train_util.get_optimizer(args, loraplus_groups())
    assert [g["alora_ratio"] for g in optimizer.param_groups] == [1.0, 1.0]
    assert [g["lr"] for g in optimizer.param_groups] == [1e-3, 1.6e-2]  # kohya's 16x is the only ratio
    assert all(g["use_alora"] for g in optimizer.param_groups)  # ALLoRA row scaling stays on
    out = capsys.readouterr().out
    assert out.count("library.hina:") == 1
    assert "loraplus_lr_ratio=16" in out and "alora_ratio=16 is not applied" in out
    assert optimizer.get_optimization_info()["lora_stats"]["lora_b_params"] == 4


def test_loraplus_asked_but_groups_not_split_keeps_the_optimizer_ratio(capsys):
    train_util, _ = make_train_util()
    kohya.install(train_util, network_modules=())
    _, groups, _ = named_groups()
    args = sd_args("HinaAdamW", "use_alora=True", "alora_ratio=8")
    args.network_args = ["loraplus_unet_lr_ratio=4", "conv_dim=4"]
    _, _, optimizer = train_util.get_optimizer(args, groups)
    assert {g["alora_ratio"] for g in optimizer.param_groups} == {8}
    assert "alora_ratio=8 is the LoRA+ ratio that applies" in capsys.readouterr().out


def test_no_loraplus_no_notice_and_dotted_path_gets_the_setting_too(capsys):
    train_util, calls = make_train_util()
    kohya.install(train_util, network_modules=())
    _, groups, _ = named_groups()
    _, _, optimizer = train_util.get_optimizer(sd_args("HinaAdamW"), groups)
    assert {g["alora_ratio"] for g in optimizer.param_groups} == {16.0} and capsys.readouterr().out == ""
    args = sd_args("library.hina.HinaAdamW", "use_alora=True")
    args.network_args = ["loraplus_lr_ratio=16"]
    train_util.get_optimizer(args, loraplus_groups())  # sd-scripts builds it from args.optimizer_args
    assert calls[-1][0] == "library.hina.HinaAdamW"
    assert args.optimizer_args == ["use_alora=True", "alora_ratio=1.0"]
    # use_alora=False or an optimizer without a ratio of its own: nothing to settle
    args = sd_args("HinaAdamW", "use_alora=False")
    args.network_args = ["loraplus_lr_ratio=16"]
    assert kohya.settle_lora_plus(args, loraplus_groups(), HinaAdamW) == ["use_alora=False"]


def test_adamix_names_go_to_the_registry():
    # sd-scripts 48d368fa lists AdEMAMix8bit but has no branch for it (torch.optim lookup, AttributeError)
    for name in ("AdEMAMix8bit", "PagedAdEMAMix8bit", "ademamix_8bit"):
        assert kohya.route(name) == ("registry", None)


# ----------------------------------------------------------------------------------------------------------
# --sd_scripts with --config_file: sd-scripts' read_config_from_file parses sys.argv a second time
CONFIG_CHECKOUT_TRAIN_UTIL = '''
import argparse, toml
def get_optimizer(args, trainable_params):
    raise ValueError("not used here")
def read_config_from_file(args, parser):  # sd-scripts 48d368fa, shortened: the config, then sys.argv over it
    if not args.config_file:
        return args
    config_args = argparse.Namespace(**toml.load(args.config_file))
    return parser.parse_args(namespace=config_args)
'''
CONFIG_CHECKOUT_TRAIN_NETWORK = '''
import argparse, json, os
def setup_parser():
    p = argparse.ArgumentParser()
    p.add_argument("--config_file")
    p.add_argument("--optimizer_type")
    p.add_argument("--learning_rate", type=float)
    return p
class NetworkTrainer:
    def train(self, args):
        with open(os.environ["HINA_FAKE_REPORT"], "w") as f:
            json.dump(vars(args), f)
'''


def test_sd_scripts_delegation_with_config_file(tmp_path):
    checkout = tmp_path / "sd-scripts"
    (checkout / "library").mkdir(parents=True)
    (checkout / "networks").mkdir()
    (checkout / "library" / "__init__.py").write_text("")
    (checkout / "library" / "train_util.py").write_text(CONFIG_CHECKOUT_TRAIN_UTIL)
    (checkout / "train_network.py").write_text(CONFIG_CHECKOUT_TRAIN_NETWORK)
    config = tmp_path / "recipe.toml"
    config.write_text('optimizer_type = "HinaAdamW"\nlearning_rate = 0.002\n')
    report = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, str(REPO / "train_network_hina.py"), "--sd_scripts", str(checkout),
                           "--config_file", str(config), "--learning_rate", "0.003"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HINA_FAKE_REPORT": str(report)})
    assert proc.returncode == 0, proc.stderr[-2000:]  # was: exit 2, unrecognized arguments: --sd_scripts
    args = json.loads(report.read_text())
    assert args["optimizer_type"] == "HinaAdamW" and args["learning_rate"] == 0.003  # command line wins


def test_layerwise_names_refuse_gradient_accumulation():
    args = sd_args("galore_adamw_layerwise")
    args.gradient_accumulation_steps = 4
    with pytest.raises(ValueError, match="--gradient_accumulation_steps 4, must be 1"):
        kohya.build_for_sd_scripts(args, [])
