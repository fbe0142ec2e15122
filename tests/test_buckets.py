"""Aspect-ratio buckets as kohya makes them, the bucketed sample order, and the dataset-TOML bucket keys."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from library.hina_train import buckets, dataset
from library.hina_train.args import parse_args
from library.hina_train.buckets import BucketError, BucketSettings


def test_bucket_resolutions_written_out():
    # kohya's rule for max_reso 64x64, 32..128, steps 16: the square, then per width w the height
    # floor(area / w) rounded down to the step, if >= the minimum, both orientations
    expected = {(64, 64)}
    for w in range(32, 129, 16):
        h = min(128, (4096 // w) // 16 * 16)
        if h >= 32:
            expected |= {(w, h), (h, w)}
    assert buckets.make_bucket_resolutions((64, 64), 32, 128, 16) == sorted(expected)
    sd = buckets.make_bucket_resolutions((512, 512), 256, 1024, 64)
    assert (1024, 256) in sd and (256, 1024) in sd and (512, 512) in sd and (576, 448) in sd


def test_a_wide_image_keeps_its_width():
    """The issue's example: a 1024x256 image at 512 used to lose three quarters to a square crop."""
    settings = BucketSettings(enable_bucket=True)
    predefined = buckets.make_bucket_resolutions((512, 512), 256, 1024, 64)
    bucket, resized = buckets.select_bucket((1024, 256), (512, 512), settings, predefined)
    assert bucket == (1024, 256) and resized == (1024, 256)
    bucket, resized = buckets.select_bucket((1000, 260), (512, 512), settings, predefined)
    nearest = min(predefined, key=lambda r: abs(r[0] / r[1] - 1000 / 260))
    assert bucket == nearest == (960, 256)
    # the image (aspect 3.85) is wider than the bucket (3.75): the height is fitted, the width cropped
    assert resized == (int(1000 * 256 / 260 + 0.5), 256)


def test_no_bucketing_covers_and_centre_crops():
    settings = BucketSettings(enable_bucket=False)
    bucket, resized = buckets.select_bucket((200, 100), (64, 64), settings, [(64, 64)])
    assert bucket == (64, 64) and resized == (128, 64)


def test_no_upscale_buckets_follow_the_image():
    settings = BucketSettings(enable_bucket=True, bucket_reso_steps=64, bucket_no_upscale=True)
    # smaller than the area: kept, bucket rounded down to the step
    assert buckets.select_bucket((200, 130), (512, 512), settings, None) == ((192, 128), (200, 130))
    # larger: scaled to the area, aspect kept, then rounded
    bucket, resized = buckets.select_bucket((2048, 1024), (512, 512), settings, None)
    assert bucket[0] * bucket[1] <= 512 * 512 and bucket[0] % 64 == 0 and bucket[1] % 64 == 0
    assert abs(resized[0] / resized[1] - 2.0) < 0.02 and resized[0] >= bucket[0] and resized[1] >= bucket[1]


def test_crop_position_matches_kohya():
    """kohya's get_crop_ltrb: the image fitted inside the bucket, centred (SDXL's crop conditioning)."""
    assert buckets.crop_ltrb((64, 64), (128, 64)) == (0, 16, 64, 48)  # 128x64 fits as 64x32, 16 from the top
    assert buckets.crop_ltrb((128, 32), (64, 64)) == (48, 0, 80, 32)  # 64x64 fits as 32x32, 48 from the left


def test_checks_and_adjustments(capsys):
    ok = BucketSettings(enable_bucket=True, min_bucket_reso=40, max_bucket_reso=120, bucket_reso_steps=16)
    adjusted = ok.checked((64, 64), 16)
    assert (adjusted.min_bucket_reso, adjusted.max_bucket_reso) == (32, 128)
    assert "min_bucket_reso adjusted" in capsys.readouterr().out
    with pytest.raises(BucketError, match="bucket_reso_steps 24 must be divisible by 16"):
        BucketSettings(enable_bucket=True, bucket_reso_steps=24).checked((512, 512), 16)
    with pytest.raises(BucketError, match="min_bucket_reso 256 is larger than the resolution 64,64"):
        BucketSettings(enable_bucket=True).checked((64, 64), 64)
    with pytest.raises(BucketError, match="max_bucket_reso 512 is smaller than the resolution"):
        BucketSettings(enable_bucket=True, max_bucket_reso=512).checked((768, 768), 64)
    assert buckets.unet_multiple(SimpleNamespace(config=SimpleNamespace(block_out_channels=(1, 2, 3, 4)))) == 64
    assert buckets.unet_multiple(SimpleNamespace(config=SimpleNamespace(block_out_channels=(1, 2, 3)))) == 32


def _items(sizes_and_buckets):
    subset = dataset.Subset(image_dir=None, num_repeats=1)
    return [dataset.Item(image=None, caption="", subset=subset, bucket=b, num_repeats=r)
            for b, r in sizes_and_buckets]


def test_epochs_draw_each_batch_from_one_bucket():
    items = _items([((64, 64), 3), ((128, 32), 1), ((128, 32), 2), ((32, 128), 1)])
    epochs = dataset.Epochs(items, batch_size=2, seed=5)
    # per bucket ceil(count / batch): 64x64 has 3 samples -> 2 batches, 128x32 has 3 -> 2, 32x128 has 1 -> 1
    assert epochs.batches_per_epoch == 5
    for epoch in range(3):
        batches = epochs.batches(epoch)
        assert len(batches) == 5
        assert sorted(i for b in batches for i in b) == [0, 0, 0, 1, 2, 2, 3]
        for batch in batches:
            assert len({items[i].bucket for i in batch}) == 1
        assert batches == epochs.batches(epoch)  # a pure function of (seed, epoch)
    assert epochs.batches(0) != epochs.batches(1) or epochs.batches(1) != epochs.batches(2)


def _config(tmp_path, text):
    images = tmp_path / "img"
    images.mkdir(exist_ok=True)
    from PIL import Image

    Image.new("RGB", (96, 32)).save(images / "a.png")
    (images / "a.txt").write_text("x, y")
    path = tmp_path / "d.toml"
    path.write_text(text.replace("IMG", str(images)))
    return path


def test_dataset_toml_bucket_keys_at_each_level(tmp_path):
    args = parse_args([])
    path = _config(tmp_path, """
[general]
enable_bucket = true
bucket_reso_steps = 32
caption_dropout_rate = 0.5
[[datasets]]
min_bucket_reso = 64
[[datasets.subsets]]
image_dir = 'IMG'
caption_prefix = "p"
is_reg = true
""")
    spec = dataset.spec_from_config(path, args)
    assert spec.buckets == BucketSettings(True, 64, 1024, 32, False)
    subset = spec.subsets[0]
    assert subset.caption_dropout_rate == 0.5 and subset.caption_prefix == "p" and subset.is_reg
    # the command line is the fallback
    args = parse_args(["--enable_bucket", "--max_bucket_reso", "512", "--caption_suffix", "s"])
    path = _config(tmp_path, "[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'IMG'\n")
    spec = dataset.spec_from_config(path, args)
    assert spec.buckets.enable_bucket and spec.buckets.max_bucket_reso == 512
    assert spec.subsets[0].caption_suffix == "s"


@pytest.mark.parametrize("text, message", [
    ("[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'IMG'\nenable_bucket = true\n",
     "key 'enable_bucket' is not supported"),  # a dataset key in a subset (kohya's schema refuses it too)
    ("[general]\nenable_bucket = 1\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'IMG'\n",
     "enable_bucket = 1 has the wrong type; expected true or false"),
    ("[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'IMG'\ncaption_dropout_rate = 1.5\n",
     "caption_dropout_rate 1.5 must be a number from 0 to 1"),
])
def test_bad_bucket_and_caption_keys(tmp_path, text, message):
    with pytest.raises(dataset.DatasetError, match=message.replace("(", r"\(").replace(")", r"\)")):
        dataset.spec_from_config(_config(tmp_path, text), parse_args([]))


def test_regularisation_images_balance_the_training_images():
    train = dataset.Subset(image_dir=None, num_repeats=3)
    reg = dataset.Subset(image_dir=None, num_repeats=1, is_reg=True)
    items = [dataset.Item(image=None, caption="", subset=train, num_repeats=3) for _ in range(2)]
    items += [dataset.Item(image=None, caption="", subset=reg, num_repeats=1) for _ in range(4)]
    dataset.balance_regularisation(items)
    # 6 training samples: the 4 regularisation images once each, then one more repeat for the first two
    assert [it.num_repeats for it in items[2:]] == [2, 2, 1, 1]


def test_resize_filter_is_kohyas_default_and_option(tmp_path):
    from PIL import Image

    assert dataset.resize_filter(None, (100, 100), (50, 50)) == Image.Resampling.BOX  # area when shrinking
    assert dataset.resize_filter(None, (100, 100), (150, 50)) == Image.Resampling.LANCZOS  # else lanczos
    assert dataset.resize_filter("nearest", (100, 100), (50, 50)) == Image.Resampling.NEAREST
    src = Image.new("RGB", (4, 2))
    src.putdata([(0, 0, 0), (255, 255, 255)] * 4)
    src.save(tmp_path / "s.png")
    # 4x2 stripes shrunk to 2x1 with area averaging: every output pixel is the mean of a black and a white one
    got = dataset.load_image(tmp_path / "s.png", 2, 1, (2, 1))
    assert torch.allclose(got, torch.full((3, 1, 2), 127.5 / 127.5 - 1.0), atol=1 / 127.5)
    nearest = dataset.load_image(tmp_path / "s.png", 2, 1, (2, 1), "nearest")
    assert nearest.abs().min() > 0.99  # a source pixel, black or white
    with pytest.raises(Exception, match="--resize_interpolation 'cubicle'; valid: lanczos"):
        parse_args(["--resize_interpolation", "cubicle"])


def test_random_crop_draws_the_offset_from_the_generator(tmp_path):
    from PIL import Image

    image = Image.new("RGB", (8, 2))
    image.putdata([(32 * x, 0, 0) for x in range(8)] * 2)  # red encodes the column
    image.save(tmp_path / "r.png")
    lefts = set()
    for seed in range(12):
        got = dataset.load_image(tmp_path / "r.png", 2, 2, (8, 2), "nearest", torch.Generator().manual_seed(seed))
        left = int(torch.randint(0, 7, (), generator=torch.Generator().manual_seed(seed)))  # 0..8-2
        assert torch.allclose(got[0, 0], torch.tensor([32 * left, 32 * left + 32]) / 127.5 - 1.0)
        lefts.add(left)
    assert len(lefts) > 2
    centre = dataset.load_image(tmp_path / "r.png", 2, 2, (8, 2), "nearest")
    assert torch.allclose(centre[0, 0], torch.tensor([96.0, 128.0]) / 127.5 - 1.0)  # (8 - 2) // 2 = 3


def test_dataset_repeats_is_the_num_repeats_fallback(tmp_path):
    path = _config(tmp_path, "[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'IMG'\n"
                             "[[datasets.subsets]]\nimage_dir = 'IMG'\nnum_repeats = 2\n")
    spec = dataset.spec_from_config(path, parse_args(["--dataset_repeats", "5"]))
    assert [s.num_repeats for s in spec.subsets] == [5, 2]


def test_color_aug_hue_shift_and_gamma_written_out():
    import colorsys

    pixels = torch.tensor([[0.8, 0.1], [0.2, -0.6], [-0.4, 0.3]]).view(3, 1, 2)  # two RGB pixels in [-1, 1]
    rgb = ((pixels + 1) / 2).view(3, 2).T.tolist()
    changed = 0
    for seed in range(30):
        draws = torch.rand(3, generator=torch.Generator().manual_seed(seed)).tolist()
        got = dataset.color_aug(pixels, torch.Generator().manual_seed(seed))
        if draws[0] > 0.33:  # two thirds of the time: unchanged
            assert torch.equal(got, pixels)
            continue
        changed += 1
        if draws[1] > 0.5:  # hue shift of U(-16, 16) degrees, through colorsys
            shift = (draws[2] * 2 - 1) * 16 / 360
            expected = []
            for r, g, b in rgb:
                h, s, v = colorsys.rgb_to_hsv(r, g, b)
                expected.append(colorsys.hsv_to_rgb((h + shift) % 1.0, s, v))
        else:  # gamma U(0.95, 1.05) on [0, 1] values
            gamma = 0.95 + draws[2] * 0.1
            expected = [[c ** gamma for c in px] for px in rgb]
        assert torch.allclose((got.view(3, 2).T + 1) / 2, torch.tensor(expected), atol=1e-5), seed
    assert changed > 3
