"""A kohya-style dataset TOML (buckets, mixed-size images, caption options) and a sample-prompt file, end to
end on the built-in tiny model: the buckets used, the latent cache files, the sample PNGs and their names."""

from __future__ import annotations

import re

import pytest
import torch

from library.hina_train import loop as loop_module
from library.hina_train.cli import run

SIZES = {"wide": (128, 32), "wide2": (256, 64), "tall": (32, 128), "square": (64, 64), "square2": (48, 48),
         "landscape": (96, 64)}


@pytest.fixture(scope="module")
def kohya_run(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("kohya")
    images = root / "img"
    images.mkdir()
    for i, (name, size) in enumerate(SIZES.items()):
        Image.new("RGB", size, (40 * i, 120, 200 - 30 * i)).save(images / f"{name}.png")
        (images / f"{name}.txt").write_text(f"{name} ||| a red circle, on a blue background, shapes\n")
    config = root / "dataset.toml"
    config.write_text(f"""
[general]
enable_bucket = true
min_bucket_reso = 32
max_bucket_reso = 128
bucket_reso_steps = 16
caption_extension = ".txt"
shuffle_caption = true
keep_tokens_separator = "|||"

[[datasets]]
resolution = 64
batch_size = 2

  [[datasets.subsets]]
  image_dir = '{images}'
  num_repeats = 2
  caption_prefix = "photo of"
  caption_tag_dropout_rate = 0.1
""")
    prompts = root / "prompts.txt"
    prompts.write_text("# kohya prompt file\na red circle on a blue background --w 64 --h 64 --s 3 --d 7 --l 5\n"
                       "a wide shape --n blue --w 96 --h 80 --s 2\n")
    out = root / "out"
    seen = []
    original = loop_module.Trainer._batch

    def spy(self, indices):
        latents, captions = original(self, indices)
        seen.append((tuple(latents.shape[-2:]), [self.plan.spec.items[i].image.stem for i in indices], captions))
        return latents, captions

    loop_module.Trainer._batch = spy
    try:
        result = run(["--dataset_config", str(config), "--output_dir", str(out), "--output_name", "kds",
                      "--max_train_steps", "4", "--seed", "1", "--network_dim", "4", "--learning_rate", "1e-3",
                      "--optimizer_type", "AdamW", "--cache_latents_to_disk", "--sample_prompts", str(prompts), "--sample_at_first",
                      "--sample_every_n_steps", "4", "--sample_sampler", "euler_a"])
    finally:
        loop_module.Trainer._batch = original
    return root, out, result, seen


def test_each_batch_comes_from_one_bucket_at_the_image_aspect(kohya_run):
    root, _, result, seen = kohya_run
    assert result["global_step"] == 4 and all(torch.isfinite(torch.tensor(result["losses"])))
    # bucket (latent h, w) = pixel bucket / 8; kohya's choice for a 64x64 area, steps 16, 32..128
    expected = {"wide": (4, 16), "wide2": (4, 16), "tall": (16, 4), "square": (8, 8), "square2": (8, 8),
                "landscape": (6, 10)}
    assert seen, "no batches"
    for shape, stems, _ in seen:
        assert {expected[s] for s in stems} == {shape}, (shape, stems)


def test_captions_keep_the_fixed_part_and_get_the_prefix(kohya_run):
    _, _, _, seen = kohya_run
    for _, stems, captions in seen:
        for stem, caption in zip(stems, captions):
            assert caption.startswith(f"photo of {stem}, "), caption
            tags = caption.split(", ")[1:]
            assert set(tags) <= {"a red circle", "on a blue background", "shapes"}


def test_latent_cache_files_sit_beside_the_images(kohya_run):
    import numpy as np

    root, _, _, _ = kohya_run
    with np.load(root / "img" / "wide_0128x0032_sd.npz") as npz:
        assert set(npz.files) == {"latents", "original_size", "crop_ltrb"}
        assert npz["latents"].shape == (4, 4, 16)
        assert npz["original_size"].tolist() == [128, 32]
    with np.load(root / "img" / "wide2_0256x0064_sd.npz") as npz:
        assert npz["latents"].shape == (4, 4, 16)  # 256x64 scaled into the 128x32 bucket


def test_sample_images_named_like_kohya(kohya_run):
    from PIL import Image

    _, out, _, _ = kohya_run
    names = sorted(p.name for p in (out / "sample").iterdir())
    pattern = re.compile(r"kds_(e000000|000004)_(00|01)_\d{14}(_7)?\.png")
    assert len(names) == 4 and all(pattern.fullmatch(n) for n in names), names
    first = [n for n in names if n.startswith("kds_e000000_00_")]
    assert len(first) == 1 and first[0].endswith("_7.png")  # the prompt's seed ends the name
    with Image.open(out / "sample" / [n for n in names if "_000004_01_" in n][0]) as image:
        assert image.size == (96, 80)
    assert not [p for p in (out / "sample").iterdir() if p.name.startswith(".")]


def test_bucket_settings_in_the_files_metadata(kohya_run):
    import json

    from safetensors import safe_open

    _, out, _, _ = kohya_run
    with safe_open(str(out / "kds.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["ss_enable_bucket"] == "True" and meta["ss_min_bucket_reso"] == "32"
    info = json.loads(meta["ss_bucket_info"])
    assert {tuple(b["resolution"]): b["count"] for b in info["buckets"].values()} == \
        {(32, 128): 2, (64, 64): 4, (80, 48): 2, (128, 32): 4}
    assert meta["ss_loss_type"] == "l2"
