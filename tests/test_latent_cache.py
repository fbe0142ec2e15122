"""--cache_latents_to_disk: kohya's .npz beside each image, reused when valid, encoded again otherwise."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from library.hina_train import dataset, latent_cache
from library.hina_train.buckets import BucketSettings, assign


@pytest.fixture(scope="module")
def vae():
    from diffusers import AutoencoderKL

    from library.hina_train.tiny_model import vae_config

    torch.manual_seed(0)
    return AutoencoderKL(**vae_config()).eval()


def _items(tmp_path, flip=False):
    from PIL import Image

    folder = tmp_path / "img"
    folder.mkdir(exist_ok=True)
    subset = dataset.Subset(image_dir=folder, flip_aug=flip)
    items = []
    for name, size in (("wide", (128, 32)), ("square", (40, 40))):
        Image.new("RGB", size, (200, 30, 30)).save(folder / f"{name}.png")
        items.append(dataset.Item(image=folder / f"{name}.png", caption="", subset=subset, size=size))
    return items


def _build(items, vae, seed=0):
    return latent_cache.build(items, vae, torch.Generator().manual_seed(seed), "cpu", to_disk=True, sdxl=False)


def test_writes_kohyas_file_and_reuses_it(tmp_path, vae):
    items = _items(tmp_path)
    assign(items, (64, 64), BucketSettings(True, 32, 128, 16))
    cache, counts = _build(items, vae)
    assert counts == {"encoded": 2, "reused": 0}
    path = tmp_path / "img" / "wide_0128x0032_sd.npz"
    with np.load(path) as npz:
        assert set(npz.files) == {"latents", "original_size", "crop_ltrb"}
        assert npz["latents"].shape == (4, 4, 16) and npz["original_size"].tolist() == [128, 32]
        stored = torch.from_numpy(npz["latents"])
    assert torch.allclose(cache.batch([0], [False])[0], stored * vae.config.scaling_factor)
    again, counts = _build(items, vae, seed=1)  # another seed would encode differently: reuse shows
    assert counts == {"encoded": 0, "reused": 2}
    assert torch.equal(again.batch([0], [False]), cache.batch([0], [False]))


def test_new_bucket_or_flip_means_encoding_again(tmp_path, vae):
    items = _items(tmp_path)
    assign(items, (64, 64), BucketSettings(True, 32, 128, 16))
    _build(items, vae)
    assign(items, (32, 32), BucketSettings(False))  # another resolution: latents of another shape
    cache, counts = _build(items, vae)
    assert counts == {"encoded": 2, "reused": 0}
    assert cache.batch([0], [False]).shape == (1, 4, 4, 4)
    flipped = _items(tmp_path, flip=True)
    assign(flipped, (32, 32), BucketSettings(False))
    cache, counts = _build(flipped, vae)
    assert counts == {"encoded": 2, "reused": 0}  # the files lack latents_flipped
    with np.load(tmp_path / "img" / "square_0040x0040_sd.npz") as npz:
        assert "latents_flipped" in npz.files
    # the flipped latent encodes the mirrored image, not a mirrored latent
    assert not torch.equal(cache.batch([1], [True]), cache.batch([1], [False]))


def test_unreadable_file_is_encoded_again(tmp_path, vae, capsys):
    items = _items(tmp_path)
    assign(items, (32, 32), BucketSettings(False))
    (tmp_path / "img" / "wide_0128x0032_sd.npz").write_bytes(b"PK\x03\x04 truncated")
    _, counts = _build(items, vae)
    assert counts == {"encoded": 2, "reused": 0}
    assert "cannot be read" in capsys.readouterr().out
    assert not [p for p in (tmp_path / "img").iterdir() if p.name.startswith(".")]


def test_skip_cache_check_takes_any_existing_file(tmp_path, vae):
    items = _items(tmp_path)
    assign(items, (64, 64), BucketSettings(True, 32, 128, 16))
    _build(items, vae)
    assign(items, (32, 32), BucketSettings(False))  # the files no longer fit, but are not checked
    _, counts = latent_cache.build(items, vae, torch.Generator(), "cpu", to_disk=True, sdxl=False, skip_check=True)
    assert counts == {"encoded": 0, "reused": 2}


def test_random_crop_cannot_be_cached(tmp_path, vae):
    from library.hina_train.errors import ArgumentError

    items = _items(tmp_path)
    items[0].subset.random_crop = True
    assign(items, (32, 32), BucketSettings(False))
    with pytest.raises(ArgumentError, match="--cache_latents cannot be used with random_crop"):
        _build(items, vae)


def test_vae_batch_size_sets_how_many_images_the_vae_encodes_at_once(tmp_path, vae, monkeypatch):
    from PIL import Image

    folder = tmp_path / "img"
    folder.mkdir()
    subset = dataset.Subset(image_dir=folder)
    items = []
    for i in range(5):
        Image.new("RGB", (32, 32), (40 * i, 30, 30)).save(folder / f"{i}.png")
        items.append(dataset.Item(image=folder / f"{i}.png", caption="", subset=subset, size=(32, 32)))
    assign(items, (32, 32), BucketSettings(False))
    sizes = []
    real = vae.encode
    monkeypatch.setattr(vae, "encode", lambda pixels: (sizes.append(len(pixels)), real(pixels))[1])
    latent_cache.build(items, vae, torch.Generator(), "cpu", to_disk=False, sdxl=False, vae_batch_size=2)
    assert sizes == [2, 2, 1]
    sizes.clear()
    latent_cache.build(items, vae, torch.Generator(), "cpu", to_disk=False, sdxl=False)
    assert sizes == [1] * 5  # kohya's default: one image at a time
