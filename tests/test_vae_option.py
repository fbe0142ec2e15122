"""--vae: another VAE from a diffusers folder replaces the model's; bad paths fail by name."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from library.hina_train.model_loading import ModelError, load_models, load_vae


def test_vae_folder_replaces_the_models_vae(tmp_path):
    from diffusers import AutoencoderKL

    from library.hina_train.tiny_model import vae_config

    torch.manual_seed(123)
    other = AutoencoderKL(**vae_config())
    other.save_pretrained(tmp_path / "vae")
    args = SimpleNamespace(pretrained_model_name_or_path=None, sdxl=False, v2=False, vae=str(tmp_path))
    models = load_models(args)  # tmp_path holds vae/: a pipeline-style folder works too
    for mine, theirs in zip(models.vae.state_dict().values(), other.state_dict().values()):
        assert torch.equal(mine, theirs)
    assert not any(p.requires_grad for p in models.vae.parameters())


def test_bad_vae_paths(tmp_path):
    with pytest.raises(ModelError, match="--vae .* does not exist"):
        load_vae(str(tmp_path / "missing"))
    with pytest.raises(ModelError, match="folder without config.json"):
        load_vae(str(tmp_path))
    (tmp_path / "v.txt").write_text("x")
    with pytest.raises(ModelError, match="expected a diffusers folder or a .safetensors/.ckpt file"):
        load_vae(str(tmp_path / "v.txt"))
