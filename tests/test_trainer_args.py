"""train_network_hina.py's command line: kohya names, --config_file / --output_config, refused flags."""

from __future__ import annotations

from pathlib import Path

import pytest

from library.hina_train.args import UNSUPPORTED, ArgumentError, build_parser, parse_args, parse_resolution
from library.hina_train.cli import run

DEMO_SAMPLES = False  # the built-in demo trains without sample images here (conftest); none is checked

REPO = Path(__file__).resolve().parent.parent
RECIPES = sorted((REPO / "configs").glob("*.toml"))


def test_the_recipes_exist():
    names = {p.name for p in RECIPES}
    assert {"demo.toml", "demo_lokr.toml"} <= names
    assert {"sd_lora.toml", "lokr.toml", "llm_lora.toml"} <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_each_recipe_parses_as_config_file(recipe):
    args = parse_args(["--config_file", str(recipe)])
    assert args.optimizer_type  # every recipe names its optimizer
    assert isinstance(args.learning_rate, float)
    for item in args.optimizer_args or []:
        assert "=" in item


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_each_recipe_builds_its_optimizer(recipe):
    import torch

    from library.hina.registry import create_optimizer

    args = parse_args(["--config_file", str(recipe)])
    params = [{"params": [torch.nn.Parameter(torch.zeros(4, 8)), torch.nn.Parameter(torch.zeros(8, 4))],
               "param_names": ["m.lora_down.weight", "m.lora_up.weight"]}]
    create_optimizer(args.optimizer_type, params, args.learning_rate, args.optimizer_args)


def test_config_file_without_suffix_and_command_line_overrides(tmp_path):
    (tmp_path / "c.toml").write_text('[a]\nlearning_rate = 0.5\nnetwork_dim = 7\n[b.c]\noptimizer_args = ["x=1"]\n')
    args = parse_args(["--config_file", str(tmp_path / "c"), "--network_dim", "3"])
    assert args.learning_rate == 0.5 and args.network_dim == 3 and args.optimizer_args == ["x=1"]


def test_output_config_round_trips(tmp_path):
    path = tmp_path / "out.toml"
    assert run(["--output_config", "--config_file", str(path), "--network_dim", "12", "--optimizer_args",
                "use_spd=True", "--resolution", "512,768"]) is None
    args = parse_args(["--config_file", str(path)])
    assert args.network_dim == 12 and args.optimizer_args == ["use_spd=True"] and args.resolution_wh == (512, 768)
    assert "config_file" not in path.read_text() and "output_config" not in path.read_text()


def test_output_config_needs_a_file():
    with pytest.raises(ArgumentError, match="--output_config needs --config_file"):
        run(["--output_config"])


@pytest.mark.parametrize("flag", ["--deepspeed", "--huggingface_repo_id=x", "--wandb_api_key=k",
                                  "--cpu_offload_checkpointing", "--fused_backward_pass", "--masked_loss"])
def test_unsupported_kohya_flags_fail_naming_them(flag):
    name = flag[2:].split("=")[0]
    with pytest.raises(ArgumentError, match=f"--{name} is a kohya sd-scripts option"):
        parse_args([flag])


def test_unsupported_flag_in_config_file_fails(tmp_path):
    (tmp_path / "c.toml").write_text("deepspeed = true\n")
    with pytest.raises(ArgumentError, match="--deepspeed"):
        parse_args(["--config_file", str(tmp_path / "c.toml")])


def test_unknown_config_key_fails_with_suggestion(tmp_path):
    (tmp_path / "c.toml").write_text("learning_rat = 1.0\n")
    with pytest.raises(ArgumentError, match="unknown key 'learning_rat'.*learning_rate"):
        parse_args(["--config_file", str(tmp_path / "c.toml")])


def test_unknown_command_line_flag_fails():
    with pytest.raises(SystemExit):
        parse_args(["--not_a_kohya_flag"])


def test_unsupported_list_has_no_supported_names():
    supported = {a.dest for a in build_parser()._actions if a.help != "==SUPPRESS=="}
    assert not supported & set(UNSUPPORTED)


@pytest.mark.parametrize("value", ["diffusers", "diffusers_safetensors", "bin"])
def test_save_model_as_kohyas_formats_only(value):
    with pytest.raises(ArgumentError, match=f"--save_model_as '{value}' is not supported; valid: safetensors, ckpt, pt"):
        parse_args(["--save_model_as", value])
    assert parse_args(["--save_model_as", "ckpt"]).save_model_as == "ckpt"


def test_kohya_defaults_and_deviations():
    args = parse_args([])
    assert args.learning_rate == 2e-6 and args.max_train_steps == 1600 and args.network_alpha == 1.0
    assert args.lr_scheduler == "constant" and args.max_grad_norm == 1.0 and args.caption_extension == ".caption"
    assert args.optimizer_type == "HinaAdamW" and args.network_module == "networks.lora"  # documented deviations


def test_caption_extention_misspelling_is_kohyas_alias():
    assert parse_args(["--caption_extention", ".txt"]).caption_extension == ".txt"


def test_inert_flags_are_accepted_with_a_notice(capsys):
    parse_args(["--sdpa", "--max_data_loader_n_workers", "0"])
    out = capsys.readouterr().out
    assert "--sdpa has no effect" in out and "--max_data_loader_n_workers has no effect" in out


@pytest.mark.parametrize("value,expected", [("512", (512, 512)), ("512,768", (512, 768)), (" 64 , 128", (64, 128)),
                                            (1024, (1024, 1024)), ([640, 512], (640, 512))])
def test_resolution_forms(value, expected):
    assert parse_resolution(value) == expected


@pytest.mark.parametrize("bad,valid", [("--train_batch_size=0", "positive integer"),
                                       ("--learning_rate=-1", ">= 0"),
                                       ("--optimizer_args=use_spd", "expected key=value")])
def test_bad_values_name_what_is_valid(bad, valid):
    with pytest.raises(ArgumentError, match=valid):
        parse_args([bad])


# --- delegation to an sd-scripts checkout ------------------------------------------------------------
# sd-scripts itself needs torchvision (no CPU build in this environment), so the checkout here is a
# stand-in with sd-scripts' layout and entry points: train_network.setup_parser / NetworkTrainer.train,
# library/train_util.py (get_optimizer, read_config_from_file), networks/ without __init__.py.
FAKE_TRAIN_NETWORK = '''
import argparse, json, os
import torch
import library.train_util as train_util

class NetworkTrainer:
    def train(self, args):
        import library, library.hina, networks.lokr
        param = torch.nn.Parameter(torch.zeros(4, 8))
        name, _, optimizer = train_util.get_optimizer(args, [{"params": [param], "lr": args.learning_rate}])
        report = {"args": vars(args), "trainer": type(self).__name__, "library": library.__file__,
                  "hina": library.hina.__file__, "lokr": networks.lokr.__file__,
                  "hooked": getattr(train_util.get_optimizer, "__hina_hooked__", False),
                  "optimizer": type(optimizer).__name__}
        with open(os.environ["HINA_FAKE_REPORT"], "w") as f:
            json.dump(report, f)

def setup_parser():
    p = argparse.ArgumentParser()
    for flag in ("--optimizer_type", "--config_file", "--pretrained_model_name_or_path"):
        p.add_argument(flag)
    p.add_argument("--learning_rate", type=float, default=1e-4)
    p.add_argument("--optimizer_args", nargs="*", default=None)
    return p
'''
FAKE_SDXL = '''
import train_network
class SdxlNetworkTrainer(train_network.NetworkTrainer):
    pass
def setup_parser():
    return train_network.setup_parser()
'''
FAKE_TRAIN_UTIL = '''
def get_optimizer(args, trainable_params):
    raise ValueError("stock sd-scripts does not know " + str(args.optimizer_type))
def read_config_from_file(args, parser):
    return args
def verify_command_line_training_args(args):
    pass
'''


def _fake_checkout(root: Path) -> Path:
    (root / "library").mkdir(parents=True)
    (root / "networks").mkdir()
    (root / "library" / "__init__.py").write_text("")
    (root / "library" / "train_util.py").write_text(FAKE_TRAIN_UTIL)
    (root / "networks" / "lora.py").write_text("")
    (root / "train_network.py").write_text(FAKE_TRAIN_NETWORK)
    (root / "sdxl_train_network.py").write_text(FAKE_SDXL)
    return root


def _delegate(tmp_path: Path, argv: list[str], cwd: Path) -> dict:
    import json
    import os
    import subprocess
    import sys

    report = tmp_path / "report.json"
    env = {**os.environ, "HINA_FAKE_REPORT": str(report), "HF_HUB_OFFLINE": "1"}
    # the timeout guards against a hang; on a loaded 2-core machine importing torch alone can take minutes
    proc = subprocess.run([sys.executable, str(REPO / "train_network_hina.py"), *argv], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "delegating to sd-scripts" in proc.stdout
    return json.loads(report.read_text())


@pytest.mark.parametrize("sdxl", [False, True], ids=["sd", "sdxl"])
def test_sd_scripts_flag_runs_the_checkouts_trainer_with_the_hook(tmp_path, sdxl):
    checkout = _fake_checkout(tmp_path / "sd-scripts")
    argv = ["--sd_scripts", str(checkout), "--optimizer_type", "HinaAdamW", "--learning_rate", "0.001",
            "--optimizer_args", "use_spd=True"] + (["--sdxl"] if sdxl else [])
    report = _delegate(tmp_path, argv, cwd=tmp_path)
    assert report["trainer"] == ("SdxlNetworkTrainer" if sdxl else "NetworkTrainer")
    assert report["library"].startswith(str(checkout))  # sd-scripts' own library package
    assert report["hina"].startswith(str(REPO / "library" / "hina"))  # ours, not yet copied in
    assert report["lokr"] == str(REPO / "networks" / "lokr.py")
    assert report["hooked"] and report["optimizer"] == "HinaAdamW"
    assert report["args"]["learning_rate"] == 0.001 and "sd_scripts" not in report["args"]


def test_running_from_a_checkout_root_delegates(tmp_path):
    checkout = _fake_checkout(tmp_path / "sd-scripts")
    report = _delegate(tmp_path, ["--optimizer_type", "HinaAdamW"], cwd=checkout)
    assert report["trainer"] == "NetworkTrainer" and report["optimizer"] == "HinaAdamW"


def test_sd_scripts_path_that_is_not_a_checkout(tmp_path):
    from library.hina_train.sd_scripts import find_checkout

    with pytest.raises(SystemExit, match="is not an sd-scripts checkout"):
        find_checkout(["--sd_scripts", str(tmp_path)])


def test_seed_random_when_missing_and_taken_from_the_resumed_state(tmp_path):
    from library.hina_train.trainer import choose_seed

    args = parse_args([])
    choose_seed(args)
    assert isinstance(args.seed, int)  # kohya: a random seed, printed
    (tmp_path / "trainer_state.json").write_text('{"global_step": 3, "seed": 1234}')
    args = parse_args(["--resume", str(tmp_path)])
    choose_seed(args)
    assert args.seed == 1234  # the sample order of the saved run depends on it
    args = parse_args(["--resume", str(tmp_path), "--seed", "7"])
    choose_seed(args)
    assert args.seed == 7


def test_dataset_config_common_subset(tmp_path):
    """kohya's dataset TOML: [general] defaults, [[datasets]] resolution/batch_size, per-subset overrides."""
    from PIL import Image

    from library.hina_train.dataset import Epochs, collect, spec_from_config

    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        for i in range(2):
            Image.new("RGB", (16, 16)).save(tmp_path / folder / f"{i}.png")
            (tmp_path / folder / f"{i}.txt").write_text(f"{folder} text {i}")
            (tmp_path / folder / f"{i}.caption").write_text(f"{folder} caption {i}")
    config = tmp_path / "dataset.toml"
    config.write_text(f'''
[general]
caption_extension = ".txt"
shuffle_caption = true
[[datasets]]
resolution = [64, 128]
batch_size = 3
  [[datasets.subsets]]
  image_dir = "{tmp_path / 'a'}"
  num_repeats = 3
  [[datasets.subsets]]
  image_dir = "{tmp_path / 'b'}"
  caption_extension = ".caption"
  class_tokens = "bee"
''')
    spec = collect(spec_from_config(config, parse_args([])))
    assert spec.resolution == (64, 128) and spec.batch_size == 3
    assert [it.caption for it in spec.items] == ["a text 0", "a text 1", "b caption 0", "b caption 1"]
    assert all(s.shuffle_caption for s in spec.subsets)
    epochs = Epochs(spec.items, spec.batch_size, seed=1)
    assert len(epochs.indices) == 2 * 3 + 2 and epochs.batches_per_epoch == 3
    assert epochs.batches(0) == Epochs(spec.items, 3, seed=1).batches(0) != epochs.batches(1)


# --- the one TOML argument reader (library.hina.config_toml, shared with the recipes) ------------------------
def test_a_key_set_in_two_sections_fails(tmp_path):
    (tmp_path / "c.toml").write_text("[a]\nnetwork_dim = 4\n[b]\nnetwork_dim = 8\n")
    with pytest.raises(ArgumentError, match=r"key 'network_dim' is set twice \(\[a\] and \[b\]\)"):
        parse_args(["--config_file", str(tmp_path / "c.toml")])


def test_bad_toml_names_line_and_column(tmp_path):
    (tmp_path / "c.toml").write_text("network_dim = 4\nlearning_rate = = 1\n")
    with pytest.raises(ArgumentError, match=r"c\.toml':2:\d+: invalid TOML"):
        parse_args(["--config_file", str(tmp_path / "c.toml")])


def test_output_config_is_written_atomically(tmp_path, monkeypatch):
    from library.hina_train import saving

    calls = []
    real = saving.atomic_write
    monkeypatch.setattr(saving, "atomic_write", lambda path, write, **kw: calls.append(path) or real(path, write, **kw))
    run(["--output_config", "--config_file", str(tmp_path / "o.toml")])
    assert calls == [tmp_path / "o.toml"] and [p.name for p in tmp_path.iterdir()] == ["o.toml"]
