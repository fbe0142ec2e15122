"""The built-in default end to end (shortened): trains, reduces the loss, writes a reloadable LoRA/LoKr + plot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from library.hina_train.cli import run

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow

DEMO_SAMPLES = False  # in-process demo runs train without sample images (conftest); the real demo run keeps them

STEPS = 20


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """The real command line, as `make demo` runs it, shortened; --save_state keeps the loss history."""
    out = tmp_path_factory.mktemp("demo")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "train_network_hina.py", "--output_dir", str(out),
                           "--max_train_steps", str(STEPS), "--save_state"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = json.loads((out / "demo-state" / "trainer_state.json").read_text())
    return out, proc.stdout + proc.stderr, state["losses"]


def test_demo_reduces_loss_and_writes_files(lora_run):
    out, _, losses = lora_run
    assert len(losses) == STEPS and all(torch.isfinite(torch.tensor(losses)))
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.95 * first, f"loss did not go down: first 5 steps {first:.4f}, last 5 {last:.4f}"
    assert (out / "demo.safetensors").is_file() and (out / "demo_loss.png").is_file()
    assert (out / "demo_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "temp files left behind"


def test_outputs_are_readable_by_others_like_ordinary_files(lora_run):
    """Atomic writes go through mkstemp/mkdtemp (private modes); the results must not stay private."""
    out, _, _ = lora_run
    for path in (out / "demo.safetensors", out / "demo_loss.png", out / "demo-state"):
        assert path.stat().st_mode & 0o044 == 0o044, f"{path.name} is not group/other readable"


def test_demo_shows_progress_bar_and_summary(lora_run):
    out, text, _ = lora_run
    assert "it/s" in text and "loss=" in text and "lr=" in text  # the tqdm bar
    assert f"steps: {STEPS}" in text and "loss: first" in text and "demo.safetensors" in text
    assert "optimizer: HinaAdamW" in text and "demo_loss.png" in text
    assert "Traceback" not in text


def test_demo_file_has_kohya_keys_and_metadata(lora_run):
    out, _, _ = lora_run
    with safe_open(str(out / "demo.safetensors"), framework="pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert any(k.startswith("lora_unet_") and k.endswith(".lora_down.weight") for k in keys)
    assert any(k.startswith("lora_te_") for k in keys)
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["ss_network_dim"] == "8" and meta["ss_network_alpha"] == "8.0"
    assert meta["ss_steps"] == str(STEPS) and meta["ss_resolution"] == "(64, 64)"
    assert meta["ss_optimizer"].endswith("HinaAdamW")


def _tiny_models():
    from library.hina_train.demo_data import caption_words
    from library.hina_train.tiny_model import build_tiny_sd

    return build_tiny_sd(caption_words(), seed=0)


def test_lora_output_reloads_through_network_module(lora_run):
    import networks.lora as lora

    out, _, _ = lora_run
    tokenizer, text_encoder, vae, unet = _tiny_models()
    network, weights = lora.create_network_from_weights(1.0, str(out / "demo.safetensors"), vae, text_encoder, unet)
    network.load_weights(str(out / "demo.safetensors"))
    saved = load_file(str(out / "demo.safetensors"))
    state = network.state_dict()
    assert set(state) == set(saved)
    for key, value in saved.items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=0)
    assert any(v.abs().sum() > 0 for k, v in saved.items() if "lora_up" in k), "lora_up never trained"


def test_lokr_demo_recipe_trains_and_reloads(tmp_path):
    import networks.lokr as lokr

    result = run(["--config_file", str(REPO / "configs" / "demo_lokr.toml"), "--output_dir", str(tmp_path),
                  "--max_train_steps", "4", "--resolution", "32"])
    path = tmp_path / "demo_lokr.safetensors"
    assert result["output"] == path and path.is_file()
    saved = load_file(str(path))
    assert any(k.endswith(".lokr_w1") for k in saved) and any(".lokr_w2" in k for k in saved)
    _, text_encoder, vae, unet = _tiny_models()
    network, _ = lokr.create_network_from_weights(1.0, str(path), vae, text_encoder, unet)
    network.load_weights(str(path))
    for key, value in saved.items():
        torch.testing.assert_close(network.state_dict()[key], value, rtol=0, atol=0)


def test_diffusers_folder_model_with_kohya_data_dir(tmp_path):
    """--pretrained_model_name_or_path (a diffusers folder) + --train_data_dir, epochs and per-epoch saving."""
    from diffusers import StableDiffusionPipeline

    from library.hina_train.demo_data import make_demo_dataset
    from library.hina_train.model_loading import noise_scheduler

    tokenizer, text_encoder, vae, unet = _tiny_models()
    StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                            scheduler=noise_scheduler(), safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(tmp_path / "model")
    data = make_demo_dataset(tmp_path / "data")
    result = run(["--pretrained_model_name_or_path", str(tmp_path / "model"), "--train_data_dir", str(data),
                  "--caption_extension", ".txt", "--resolution", "64", "--train_batch_size", "16",
                  "--max_train_epochs", "2", "--save_every_n_epochs", "1", "--output_dir", str(tmp_path / "out"),
                  "--output_name", "mine", "--network_train_unet_only", "--learning_rate", "1e-3"])
    assert result["global_step"] == 4  # 32 images / batch 16 = 2 steps per epoch
    out = tmp_path / "out"
    assert (out / "mine-000001.safetensors").is_file() and (out / "mine.safetensors").is_file()
    saved = load_file(str(out / "mine.safetensors"))
    assert saved and not any(k.startswith("lora_te") for k in saved)  # --network_train_unet_only
    with safe_open(str(out / "mine.safetensors"), framework="pt") as f:
        assert f.metadata()["ss_sd_model_name"] == "model"


def test_sdxl_diffusers_folder(tmp_path):
    """--sdxl: two text encoders (lora_te1_/lora_te2_ keys), pooled embeds and time ids reach the UNet."""
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from library.hina_train import tiny_model
    from library.hina_train.demo_data import caption_words, make_demo_dataset
    from library.hina_train.model_loading import noise_scheduler

    torch.manual_seed(0)
    tokenizer = tiny_model.load_tokenizer(caption_words())
    config = CLIPTextConfig(**tiny_model.text_encoder_config(len(tokenizer)))
    unet = UNet2DConditionModel(**{**tiny_model.unet_config(), "cross_attention_dim": 64,
                                   "addition_embed_type": "text_time", "addition_time_embed_dim": 8,
                                   "projection_class_embeddings_input_dim": 6 * 8 + 32})
    StableDiffusionXLPipeline(vae=AutoencoderKL(**tiny_model.vae_config()), text_encoder=CLIPTextModel(config),
                              text_encoder_2=CLIPTextModelWithProjection(config), tokenizer=tokenizer,
                              tokenizer_2=tokenizer, unet=unet, scheduler=noise_scheduler()
                              ).save_pretrained(tmp_path / "sdxl")
    result = run(["--sdxl", "--pretrained_model_name_or_path", str(tmp_path / "sdxl"), "--train_data_dir",
                  str(make_demo_dataset(tmp_path / "data")), "--caption_extension", ".txt", "--resolution", "64",
                  "--max_train_steps", "2", "--train_batch_size", "2", "--output_dir", str(tmp_path / "out")])
    saved = load_file(str(result["output"]))
    assert {k.split(".")[0].split("_")[1] for k in saved} == {"te1", "te2", "unet"}
    with safe_open(str(result["output"]), framework="pt") as f:
        assert f.metadata()["ss_base_model_version"] == "sdxl_base_v1-0"
