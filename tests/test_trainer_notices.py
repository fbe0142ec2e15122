"""One-line notices: images upscaled a lot, captions under another extension than --caption_extension."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from library.hina_train.args import parse_args
from library.hina_train.dataset import DatasetError, DatasetSpec, collect, subsets_from_folder
from library.hina_train.notices import caption_hint, upscale_factor, upscale_notice


def test_upscale_factor_covers_the_target():
    assert upscale_factor((8, 8), (512, 512)) == 64
    assert upscale_factor((100, 50), (64, 64)) == pytest.approx(64 / 50)


def test_upscale_notice_names_the_worst_image():
    items = [SimpleNamespace(image=Path("a/icon.png"), size=(8, 8), bucket=None),
             SimpleNamespace(image=Path("a/small.png"), size=(100, 100), bucket=None),
             SimpleNamespace(image=Path("a/fine.png"), size=(512, 512), bucket=None)]
    note = upscale_notice(items, (512, 512))
    assert note.startswith("note: 2 image(s) are upscaled more than 4x") and "icon.png: 8x8 -> 512x512, 64x" in note
    assert "\n" not in note
    assert upscale_notice(items[2:], (512, 512)) is None


def _folder(tmp_path, caption_suffix):
    sub = tmp_path / "data" / "2_sks dog"
    sub.mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (32, 32), (i, 80, 160)).save(sub / f"{i}.png")
        (sub / f"{i}{caption_suffix}").write_text(f"photo {i}\n")
    return tmp_path / "data"


def test_default_caption_extension_next_to_txt_files_says_so(tmp_path, capsys):
    data = _folder(tmp_path, ".txt")
    args = parse_args(["--train_data_dir", str(data)])  # kohya's default: .caption
    spec = collect(DatasetSpec(subsets=subsets_from_folder(data, args)))
    out = capsys.readouterr().out
    assert [it.caption for it in spec.items] == ["sks dog"] * 3  # kohya's fallback, unchanged
    assert "3 .txt file(s) sit next to them, e.g. 0.txt: add --caption_extension .txt" in out


def test_caption_hint_is_empty_when_nothing_is_there(tmp_path):
    assert caption_hint([tmp_path / "x.png"], ".caption") == ""


def test_missing_caption_error_names_the_other_files(tmp_path):
    data = _folder(tmp_path, ".caption")
    image = data / "2_sks dog" / "0.png"
    subset = SimpleNamespace(caption_extension=".txt", class_tokens=None)
    from library.hina_train.dataset import _caption

    with pytest.raises(DatasetError, match=r"no caption file '0.txt'.*1 .caption file\(s\) sit next to them"):
        _caption(image, subset)
