"""kohya's caption options and long-caption (``--max_token_length``) encoding."""

from __future__ import annotations

import pytest
import torch

from library.hina_train import captions
from library.hina_train.dataset import Subset


def _subset(**kw):
    return Subset(image_dir=None, **kw)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_prefix_and_suffix():
    s = _subset(caption_prefix="photo of", caption_suffix="best quality")
    assert captions.process_caption("a dog", s, _gen()) == "photo of a dog best quality"


def test_caption_dropout_rate_and_every_n_epochs():
    s = _subset(caption_dropout_rate=0.5)
    got = [captions.process_caption("a dog", s, _gen(k)) for k in range(200)]
    expected = ["" if float(torch.rand((), generator=_gen(k))) < 0.5 else "a dog" for k in range(200)]
    assert got == expected and 60 < got.count("") < 140
    s = _subset(caption_dropout_every_n_epochs=3)
    assert [captions.process_caption("a dog", s, _gen(), epoch=e) for e in range(1, 7)] == \
           ["a dog", "a dog", "", "a dog", "a dog", ""]


def test_keep_tokens_separator_fixes_head_and_tail():
    caption = "sks, woman ||| red hair, smile, hat ||| masterpiece"
    assert captions.split_fixed_flexible(caption, 0, "|||") == (
        ["sks", "woman"], ["red hair", "smile", "hat"], ["masterpiece"])
    s = _subset(shuffle_caption=True, keep_tokens_separator="|||")
    for k in range(10):
        out = captions.process_caption(caption, s, _gen(k)).split(", ")
        assert out[:2] == ["sks", "woman"] and out[-1] == "masterpiece"
        assert sorted(out[2:-1]) == ["hat", "red hair", "smile"]
    # without the separator in the caption, keep_tokens applies
    assert captions.split_fixed_flexible("a, b, c", 1, "|||") == (["a"], ["b", "c"], [])


def test_tag_dropout_drops_flexible_tags_with_its_rate():
    s = _subset(caption_tag_dropout_rate=0.3, keep_tokens=1)
    caption = "fixed, t1, t2, t3, t4"
    for k in range(20):
        g = _gen(k)
        keep = (torch.rand(4, generator=g) >= 0.3).tolist()
        expected = ", ".join(["fixed"] + [t for t, kept in zip(["t1", "t2", "t3", "t4"], keep) if kept])
        assert captions.process_caption(caption, s, _gen(k)) == expected


def test_secondary_separator_and_custom_separator():
    s = _subset(shuffle_caption=True, secondary_separator=";;;")
    for k in range(5):
        out = captions.process_caption("a;;;b, c", s, _gen(k))
        assert sorted(out.split(", ")) == ["a,b", "c"]
    s = _subset(shuffle_caption=True, keep_tokens=1, caption_separator="|")
    assert captions.process_caption("x| y| z", s, _gen()).startswith("x, ")


def test_check_rates_names_the_bad_value():
    with pytest.raises(ValueError, match="caption_tag_dropout_rate 2 must be a number from 0 to 1"):
        captions.check_rates({"caption_tag_dropout_rate": 2}, "")
    with pytest.raises(ValueError, match="caption_dropout_every_n_epochs -1 must be an integer >= 0"):
        captions.check_rates({"caption_dropout_every_n_epochs": -1}, "")


# --- long captions ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_text():
    from transformers import CLIPTextConfig, CLIPTextModel

    from library.hina_train.demo_data import caption_words
    from library.hina_train.tiny_model import load_tokenizer, text_encoder_config

    tokenizer = load_tokenizer(caption_words())
    torch.manual_seed(0)
    return tokenizer, CLIPTextModel(CLIPTextConfig(**text_encoder_config(len(tokenizer)))).eval()


def test_max_token_length_chunks_like_kohya(tiny_text):
    from types import SimpleNamespace

    from library.hina_train.text_encoding import TextConditioner

    tokenizer, encoder = tiny_text
    models = SimpleNamespace(is_sdxl=False, tokenizers=[tokenizer], text_encoders=[encoder])
    long_caption = "a red circle on a blue background " * 15  # 105 tokens
    conditioner = TextConditioner(models, None, (64, 64), max_token_length=150)
    ids = conditioner.ids(tokenizer, [long_caption])
    plain = tokenizer(long_caption, truncation=True, max_length=152, padding="max_length").input_ids
    bos, eos = plain[0], plain[-1]
    # kohya: <BOS> + 75 tokens + last token, per chunk
    assert ids.shape == (1, 2, 77)
    assert ids[0, 0].tolist() == [bos] + plain[1:76] + [eos]
    assert ids[0, 1].tolist() == [bos] + plain[76:151] + [eos]
    with torch.no_grad():
        hidden, pooled = conditioner.encode([long_caption], "cpu")
        chunk0 = encoder(ids[:, 0])[0]
        chunk1 = encoder(ids[:, 1])[0]
    assert hidden.shape == (1, 152, 32) and pooled is None
    # joined: <BOS> of chunk 0, positions 1..75 of each chunk, the last position of the last chunk
    expected = torch.cat([chunk0[:, :1], chunk0[:, 1:76], chunk1[:, 1:76], chunk1[:, -1:]], dim=1)
    assert torch.allclose(hidden, expected, atol=1e-6)


def test_default_length_cuts_with_a_notice(tiny_text, capsys):
    from types import SimpleNamespace

    from library.hina_train.text_encoding import TextConditioner

    tokenizer, encoder = tiny_text
    models = SimpleNamespace(is_sdxl=False, tokenizers=[tokenizer], text_encoders=[encoder])
    conditioner = TextConditioner(models, None, (64, 64))
    ids = conditioner.ids(tokenizer, ["a red circle " * 30])
    assert ids.shape == (1, 1, 77)
    assert "the text encoder sees the first 75" in capsys.readouterr().out
    conditioner.ids(tokenizer, ["a red circle " * 30])
    assert capsys.readouterr().out == ""  # once per run


# --- the text-encoder output cache ------------------------------------------------------------------------
def test_text_encoder_outputs_cached_to_disk_and_reused(tiny_text, tmp_path):
    from types import SimpleNamespace

    import numpy as np

    from library.hina_train.dataset import Item
    from library.hina_train.text_encoding import TextConditioner, cache_outputs

    tokenizer, encoder = tiny_text
    models = SimpleNamespace(is_sdxl=False, tokenizers=[tokenizer], text_encoders=[encoder])
    conditioner = TextConditioner(models, None, (64, 64), max_token_length=150)
    subset = _subset()
    items = [Item(image=tmp_path / f"{n}.png", caption=c, subset=subset) for n, c in (("a", "a red circle"),
                                                                                       ("b", "a blue square"))]
    counts = cache_outputs(items, conditioner, "cpu", True, lambda it: "photo of " + it.caption)
    assert counts == {"encoded": 2, "reused": 0}
    with np.load(tmp_path / "a_te_outputs.npz") as npz:
        assert set(npz.files) == {"hidden_state1", "caption"} and npz["hidden_state1"].shape == (152, 32)
        assert str(npz["caption"]) == "photo of a red circle"
    with torch.no_grad():
        direct, _ = conditioner.encode(["photo of a red circle"], "cpu")
    assert torch.allclose(items[0].text_outputs[0], direct[0])
    hidden, added = conditioner(["ignored", "ignored"], "cpu", items)  # the cache answers, not the encoder
    assert added is None and torch.equal(hidden[0], items[0].text_outputs[0])
    again = [Item(image=it.image, caption=it.caption, subset=subset) for it in items]
    assert cache_outputs(again, conditioner, "cpu", True, lambda it: "photo of " + it.caption) == \
        {"encoded": 0, "reused": 2}
    edited = [Item(image=items[0].image, caption="a green triangle", subset=subset)]
    assert cache_outputs(edited, conditioner, "cpu", True, lambda it: it.caption)["encoded"] == 1


def test_text_encoder_cache_refuses_changing_captions():
    from library.hina_train.errors import ArgumentError
    from library.hina_train.text_encoding import check_cacheable

    check_cacheable([_subset()])
    with pytest.raises(ArgumentError, match="sets shuffle_caption, so its captions change every epoch"):
        check_cacheable([_subset(shuffle_caption=True)])
    with pytest.raises(ArgumentError, match="needs --network_train_unet_only"):
        from library.hina_train.args import parse_args

        parse_args(["--cache_text_encoder_outputs"])


def test_wildcards_pick_one_line_and_one_choice_each():
    subset = _subset(enable_wildcard=True)
    seen = set()
    for seed in range(40):
        got = captions.process_caption("a {red|blue} {{literal}} shape\nline two {x|y}", subset, _gen(seed))
        assert got in {"a red {literal} shape", "a blue {literal} shape", "line two x", "line two y"}, got
        seen.add(got)
    assert len(seen) == 4  # every line and every choice is drawn
    assert captions.process_caption("a {red|blue}", _subset(), _gen()) == "a {red|blue}"  # off: left as written


def test_wildcard_caption_file_keeps_every_line(tmp_path):
    from PIL import Image

    from library.hina_train.dataset import _caption

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("first {x|y}\n\nsecond\n")
    assert _caption(tmp_path / "a.png", _subset(caption_extension=".txt"))[0] == "first {x|y}"
    both = _subset(caption_extension=".txt", enable_wildcard=True)
    assert _caption(tmp_path / "a.png", both)[0] == "first {x|y}\nsecond"


def test_enable_wildcard_on_the_command_line_reaches_the_folders_subsets(tmp_path):
    from library.hina_train.args import parse_args
    from library.hina_train.dataset import subsets_from_folder

    (tmp_path / "2_dog").mkdir()
    args = parse_args(["--train_data_dir", str(tmp_path), "--enable_wildcard"])
    assert [s.enable_wildcard for s in subsets_from_folder(tmp_path, args)] == [True]


def test_token_warmup_keeps_the_first_tags_growing_to_all(monkeypatch):
    caption = "fixed ||| t1, t2, t3, t4, t5, t6, t7"
    subset = _subset(keep_tokens_separator="|||", token_warmup_min=1, token_warmup_step=4)
    got = [captions.process_caption(caption, subset, _gen(), step=s) for s in range(6)]
    # kohya: floor(step·(n − min)/warmup) + min of the n = 7 flexible tags until step 4, then all
    counts = [int(s * (7 - 1) / 4) + 1 for s in range(4)] + [7, 7]
    assert got == [", ".join(["fixed"] + [f"t{i}" for i in range(1, n + 1)]) for n in counts]
    share = _subset(token_warmup_min=2, token_warmup_step=0.5)  # below 1: a share of the run's steps
    assert captions.warmup_tag_count(10, share, 3, max_train_steps=12) == int(3 * 8 / 6) + 2
    assert captions.warmup_tag_count(10, share, 6, max_train_steps=12) == 10
