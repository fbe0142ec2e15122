"""Sample-image prompt files, timing rule, file names and samplers, as kohya's train_util has them."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from library.hina_train import sampling
from library.hina_train.args import parse_args
from library.hina_train.errors import ArgumentError


def test_prompt_line_options():
    got = sampling.parse_line("a cat, sitting --n low quality, blurry --w 768 --h 512 --s 20 --l 6.5 --d 42 --ss euler_a")
    assert got == {"prompt": "a cat, sitting", "negative_prompt": "low quality, blurry", "width": 768,
                   "height": 512, "sample_steps": 20, "scale": 6.5, "seed": 42, "sample_sampler": "euler_a"}
    assert sampling.parse_line("plain") == {"prompt": "plain"}
    assert sampling.parse_line("x --g 3.5 --W 64")["width"] == 64  # unknown options skipped, flags any case
    with pytest.raises(ArgumentError, match="prompt option --w 'wide' is not a valid int"):
        sampling.parse_line("x --w wide")


def test_prompt_files_txt_toml_json(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("# comment\n\nfirst --d 1\nsecond --s 5\n")
    assert [(p["prompt"], p["enum"]) for p in sampling.load_prompts(txt)] == [("first", 0), ("second", 1)]
    toml = tmp_path / "p.toml"
    toml.write_text('[prompt]\nwidth = 64\nscale = 4.0\n[[prompt.subset]]\nprompt = "a"\n'
                    '[[prompt.subset]]\nprompt = "b"\nwidth = 96\n')
    got = sampling.load_prompts(toml)
    assert [(p["prompt"], p["width"], p["scale"]) for p in got] == [("a", 64, 4.0), ("b", 96, 4.0)]
    js = tmp_path / "p.json"
    js.write_text(json.dumps([{"prompt": "c", "seed": 3}, "d --h 80"]))
    got = sampling.load_prompts(js)
    assert got[0]["seed"] == 3 and got[1]["height"] == 80 and got[1]["enum"] == 1


@pytest.mark.parametrize("text, message", [
    ("", "has no prompts"),
    ("x --ss plms", "sampler 'plms' is not known; valid: ddim, pndm"),
])
def test_bad_prompt_files(tmp_path, text, message):
    path = tmp_path / "p.txt"
    path.write_text(text)
    with pytest.raises(ArgumentError, match=message):
        sampling.load_prompts(path)
    with pytest.raises(ArgumentError, match="does not exist"):
        sampling.load_prompts(tmp_path / "missing.txt")


def test_sample_options_checked_up_front(tmp_path):
    with pytest.raises(ArgumentError, match="--sample_sampler 'dpm' is not a sampler; valid: ddim, pndm, lms"):
        parse_args(["--sample_sampler", "dpm"])
    with pytest.raises(ArgumentError, match="need --sample_prompts FILE"):
        parse_args(["--sample_every_n_steps", "10"])
    with pytest.raises(ArgumentError, match="--sample_prompts .* does not exist"):
        parse_args(["--sample_prompts", str(tmp_path / "none.txt")])


def test_when_to_sample_is_kohyas_rule():
    def args(**kw):
        base = dict(sample_prompts="p.txt", sample_at_first=False, sample_every_n_steps=None,
                    sample_every_n_epochs=None)
        return SimpleNamespace(**{**base, **kw})

    assert sampling.due(args(sample_at_first=True), 0, 0) and not sampling.due(args(), 0, 0)
    steps = args(sample_every_n_steps=5)
    assert [s for s in range(1, 16) if sampling.due(steps, s, None)] == [5, 10, 15]
    assert not sampling.due(steps, 10, 2)  # epoch ends do not count for the step rule
    epochs = args(sample_every_n_steps=5, sample_every_n_epochs=2)  # epochs replace steps
    assert not sampling.due(epochs, 10, None) and sampling.due(epochs, 7, 2) and not sampling.due(epochs, 7, 3)
    assert not sampling.due(args(sample_prompts=None, sample_at_first=True), 0, 0)


def test_file_names_are_kohyas():
    assert sampling.file_name("lora", 250, None, 3, 42, "20260102030405") == "lora_000250_03_20260102030405_42.png"
    assert sampling.file_name("lora", 250, 2, 0, None, "20260102030405") == "lora_e000002_00_20260102030405.png"
    assert sampling.file_name(None, 7, None, 1, None, "20260102030405") == "000007_01_20260102030405.png"


@pytest.mark.filterwarnings("ignore:.*dpmsolver.*:FutureWarning")  # kohya's name, diffusers deprecates it
def test_sampler_names_map_to_diffusers_schedulers():
    import diffusers

    for name, (cls, extra) in sampling.SAMPLERS.items():
        scheduler = sampling.make_scheduler(name, v_parameterization=(name == "ddim"))
        assert type(scheduler) is getattr(diffusers, cls)
        assert scheduler.config.beta_schedule == "scaled_linear" and scheduler.config.beta_end == 0.012
        for key, value in extra.items():
            assert scheduler.config[key] == value
    assert sampling.make_scheduler("ddim", True).config.prediction_type == "v_prediction"
    assert sampling.make_scheduler("ddim", False).config.clip_sample is True  # kohya turns it on
    with pytest.raises(ArgumentError, match="sampler 'x' is not known"):
        sampling.make_scheduler("x", False)


def test_generate_is_reproducible_with_a_seed():
    import numpy as np
    import torch

    from library.hina_train.demo_data import caption_words
    from library.hina_train.text_encoding import TextConditioner
    from library.hina_train.tiny_model import build_tiny_sd

    tokenizer, text_encoder, vae, unet = build_tiny_sd(caption_words(), seed=0)
    models = SimpleNamespace(is_sdxl=False, tokenizers=[tokenizer], text_encoders=[text_encoder], vae=vae, unet=unet)
    conditioner = TextConditioner(models, None, (64, 64))
    prompt = {"prompt": "a red circle", "negative_prompt": "blue", "width": 64, "height": 80, "sample_steps": 2,
              "seed": 5, "enum": 0}
    autocast = torch.autocast("cpu", enabled=False)
    a = sampling.generate(models, conditioner, prompt, "euler_a", False, "cpu", lambda: autocast)
    b = sampling.generate(models, conditioner, prompt, "euler_a", False, "cpu", lambda: autocast)
    c = sampling.generate(models, conditioner, {**prompt, "seed": 6}, "euler_a", False, "cpu", lambda: autocast)
    assert a.size == (64, 80) and np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))


def test_sdxl_conditioning_and_sampling_on_a_tiny_sdxl_shape():
    """Two text encoders (penultimate layers joined, pooled projection of the second), per-image size/crop
    ids from the buckets (kohya's get_crop_ltrb), a long caption, and a sample through the same path."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from library.hina_train.demo_data import caption_words
    from library.hina_train.text_encoding import TextConditioner
    from library.hina_train.tiny_model import load_tokenizer, text_encoder_config, unet_config, vae_config

    tok = load_tokenizer(caption_words())
    torch.manual_seed(0)
    te1 = CLIPTextModel(CLIPTextConfig(**text_encoder_config(len(tok)))).eval()
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**text_encoder_config(len(tok)))).eval()
    config = {**unet_config(), "cross_attention_dim": 64, "addition_embed_type": "text_time",
              "addition_time_embed_dim": 8, "projection_class_embeddings_input_dim": 32 + 6 * 8}
    models = SimpleNamespace(is_sdxl=True, tokenizers=[tok, tok], text_encoders=[te1, te2],
                             unet=UNet2DConditionModel(**config).eval(), vae=AutoencoderKL(**vae_config()).eval())
    conditioner = TextConditioner(models, None, (64, 64), max_token_length=150)
    items = [SimpleNamespace(bucket=(128, 32), size=(256, 50)), SimpleNamespace(bucket=(64, 64), size=(64, 64))]
    with torch.no_grad():
        hidden, added = conditioner(["a red circle", "a blue square"], "cpu", items)
        ids2 = conditioner.ids(tok, ["a red circle", "a blue square"])
        pooled = te2(ids2[:, 0]).text_embeds  # the first chunk's pooled projection
        first = te1(ids2[:, 0], output_hidden_states=True).hidden_states[-2]
    assert hidden.shape == (2, 152, 64) and torch.allclose(added["text_embeds"], pooled, atol=1e-6)
    assert torch.allclose(hidden[:, 1:76, :32], first[:, 1:76], atol=1e-6)
    # original (h, w), crop (top, left), target (h, w); 256x50 fits a 128x32 bucket as 128x25, 3 from the top
    assert added["time_ids"].tolist() == [[50, 256, 3, 0, 32, 128], [64, 64, 0, 0, 64, 64]]
    image = sampling.generate(models, conditioner, {"prompt": "a red circle", "width": 64, "height": 64,
                                                    "sample_steps": 2, "seed": 1}, "ddim", False, "cpu",
                              lambda: torch.autocast("cpu", enabled=False))
    assert image.size == (64, 64)
