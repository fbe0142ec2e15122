"""Bad input fails with a clear message before any training time is spent, and leaves nothing on disk.

Every case runs the real command path (``cli.run``) with ``loop.train`` replaced by a function that fails
the test if reached: the error has to come from the set-up checks. Missing captions are not an error
(kohya's behaviour): the folder's class tokens are used, and tested as such.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from library.hina_train import cli, loop
from library.hina_train.args import ArgumentError
from library.hina_train.dataset import DatasetError, DatasetSpec, collect, spec_from_config, subsets_from_folder
from library.hina_train.args import parse_args
from library.hina_train.saving import SaveError

DEMO_SAMPLES = False  # the built-in demo trains without sample images here (conftest); none is checked


@pytest.fixture(autouse=True)
def no_training(monkeypatch):
    def fail(plan):
        raise AssertionError("training started despite bad input")

    monkeypatch.setattr(loop, "train", fail)


def make_data(root: Path, folder="2_sks dog", n=2, captions=True) -> Path:
    sub = root / folder
    sub.mkdir(parents=True)
    for i in range(n):
        Image.new("RGB", (40, 48), (10 * i, 80, 160)).save(sub / f"{i}.png")
        if captions:
            (sub / f"{i}.txt").write_text(f"photo {i}\n")
    return root


def fails(argv, error, match, out: Path):
    with pytest.raises(error, match=match):
        cli.run(argv + ["--output_dir", str(out)])
    assert not out.exists() or not any(out.iterdir()), f"left files behind: {list(out.iterdir())}"


def test_missing_data_folder(tmp_path):
    fails(["--train_data_dir", str(tmp_path / "nope")], DatasetError, "does not exist", tmp_path / "out")


def test_empty_data_folder(tmp_path):
    (tmp_path / "data").mkdir()
    fails(["--train_data_dir", str(tmp_path / "data")], DatasetError, "has no <repeats>_<class tokens> subfolders",
          tmp_path / "out")


def test_subfolder_without_images(tmp_path):
    (tmp_path / "data" / "5_cat").mkdir(parents=True)
    (tmp_path / "data" / "5_cat" / "notes.txt").write_text("x")
    fails(["--train_data_dir", str(tmp_path / "data")], DatasetError, "5_cat' has no images", tmp_path / "out")


def test_corrupt_image_is_named(tmp_path):
    data = make_data(tmp_path / "data")
    (data / "2_sks dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    fails(["--train_data_dir", str(data)], DatasetError, r"broken\.png' cannot be read", tmp_path / "out")


def test_truncated_image_is_named(tmp_path):
    data = make_data(tmp_path / "data")
    Image.effect_noise((64, 64), 50).convert("RGB").save(data / "2_sks dog" / "cut.jpg", quality=90)
    raw = (data / "2_sks dog" / "cut.jpg").read_bytes()
    (data / "2_sks dog" / "cut.jpg").write_bytes(raw[: len(raw) // 2])
    fails(["--train_data_dir", str(data)], DatasetError, r"cut\.jpg' cannot be read", tmp_path / "out")


def test_missing_caption_uses_class_tokens_like_kohya(tmp_path, capsys):
    data = make_data(tmp_path / "data", captions=False)
    (data / "2_sks dog" / "0.txt").write_text("a photo of sks dog\n")
    args = parse_args(["--train_data_dir", str(data), "--caption_extension", ".txt"])
    spec = collect(DatasetSpec(subsets=subsets_from_folder(data, args)))
    assert [it.caption for it in spec.items] == ["a photo of sks dog", "sks dog"]
    assert "1 image(s) have no caption file" in capsys.readouterr().out


def test_missing_caption_without_class_tokens_is_an_error(tmp_path):
    data = make_data(tmp_path / "data", folder="imgs", captions=False)
    config = tmp_path / "dataset.toml"
    config.write_text(f'[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{data / "imgs"}"\n')
    with pytest.raises(DatasetError, match=r"0\.png' has no caption file '0\.caption'"):
        collect(spec_from_config(config, parse_args([])))


def test_dataset_config_unknown_key(tmp_path):
    config = tmp_path / "dataset.toml"
    config.write_text('[[datasets]]\ncolour_aug = true\n')
    fails(["--dataset_config", str(config)], DatasetError, "key 'colour_aug' is not supported", tmp_path / "out")


@pytest.mark.parametrize("value", ["100", "512,500", "0"])
def test_resolution_not_multiple_of_8(tmp_path, value):
    fails(["--resolution", value], ArgumentError, "multiple of 8|positive", tmp_path / "out")


def test_dataset_config_resolution_not_multiple_of_8(tmp_path):
    data = make_data(tmp_path / "data")
    config = tmp_path / "dataset.toml"
    config.write_text(f'[general]\nresolution = 500\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{data / "2_sks dog"}"\n')
    fails(["--dataset_config", str(config)], DatasetError, "500 is not a multiple of 8", tmp_path / "out")


def _network_file(tmp_path: Path, dim: int) -> Path:
    import networks.lora as lora
    from library.hina_train.demo_data import caption_words
    from library.hina_train.tiny_model import build_tiny_sd

    _, text_encoder, vae, unet = build_tiny_sd(caption_words())
    network = lora.create_network(1.0, dim, 1.0, vae, text_encoder, unet)
    path = tmp_path / f"dim{dim}.safetensors"
    save_file({k: v.contiguous() for k, v in network.state_dict().items()}, str(path))
    network.restore()
    return path


def test_network_weights_that_do_not_fit(tmp_path):
    data = make_data(tmp_path / "data")
    weights = _network_file(tmp_path, dim=4)
    fails(["--train_data_dir", str(data), "--caption_extension", ".txt", "--network_dim", "8",
           "--network_weights", str(weights)], SaveError,
          r"--network_weights .* does not fit .* another shape .*file \[4, ", tmp_path / "out")


def test_network_weights_of_another_kind(tmp_path):
    data = make_data(tmp_path / "data")
    save_file({"model.diffusion_model.x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    fails(["--train_data_dir", str(data), "--caption_extension", ".txt",
           "--network_weights", str(tmp_path / "other.safetensors")], SaveError, "not in the network",
          tmp_path / "out")


def test_missing_network_weights_file(tmp_path):
    fails(["--network_weights", str(tmp_path / "none.safetensors")], SaveError, "does not exist", tmp_path / "out")


def test_resume_state_that_does_not_fit(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    shutil.copy(_network_file(tmp_path, dim=4), state / "network.safetensors")
    for name in ("optimizer.pt", "scheduler.pt", "rng.pt"):
        (state / name).write_bytes(b"")
    (state / "trainer_state.json").write_text('{"global_step": 1}')
    data = make_data(tmp_path / "data")
    fails(["--train_data_dir", str(data), "--caption_extension", ".txt", "--network_dim", "8",
           "--resume", str(state)], SaveError, "--resume network .* does not fit", tmp_path / "out")


def test_resume_folder_incomplete(tmp_path):
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "network.safetensors").write_bytes(b"")
    fails(["--resume", str(tmp_path / "state")], SaveError, "not a complete state folder: missing optimizer.pt",
          tmp_path / "out")


def test_output_folder_under_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    fails(["--max_train_steps", "1"], SaveError, "exists and is not a folder", tmp_path / "file" / "out")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can write anywhere")
def test_output_folder_not_writable(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        fails(["--max_train_steps", "1"], SaveError, "not writable", locked / "out")
    finally:
        locked.chmod(0o700)


def test_main_prints_one_error_line_and_exits_2(tmp_path, capsys):
    code = cli.main(["--train_data_dir", str(tmp_path / "nope"), "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == cli.EXIT_BAD_INPUT
    assert err.startswith("error: --train_data_dir") and "nope" in err and "Traceback" not in err
