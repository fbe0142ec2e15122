"""kohya options that act inside the training step, checked on the built-in tiny model: one prepared trainer,
its ``_loss`` called with the same draws with and without each option."""

from __future__ import annotations

import pytest
import torch

from library.hina_train import losses
from library.hina_train.args import ArgumentError, parse_args

DEMO_SAMPLES = False  # the built-in demo trains without sample images here (conftest); none is checked


def _tiny_models():
    from library.hina_train.demo_data import caption_words
    from library.hina_train.tiny_model import build_tiny_sd

    return build_tiny_sd(caption_words(), seed=0)  # the built-in model, as the trainer builds it


@pytest.fixture(scope="module")
def base_lora(tmp_path_factory):
    """A LoRA file with non-zero ΔW for --base_weights, and its network on a separate copy of the tiny model."""
    import networks.lora as lora

    _, text_encoder, vae, unet = _tiny_models()
    network = lora.create_network(1.0, 2, 1.0, vae, text_encoder, unet)
    torch.manual_seed(7)
    with torch.no_grad():
        for name, p in network.named_parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    path = tmp_path_factory.mktemp("base") / "base.safetensors"
    network.save_weights(str(path), None, {})
    return path, network, text_encoder, unet


@pytest.fixture(scope="module")
def trainer(tmp_path_factory, base_lora):
    from library.hina_train.cli import given_flags
    from library.hina_train.loop import Trainer
    from library.hina_train.trainer import prepare

    argv = ["--output_dir", str(tmp_path_factory.mktemp("opts")), "--max_train_steps", "1", "--seed", "3",
            "--base_weights", str(base_lora[0]), "--base_weights_multiplier", "0.5"]
    t = Trainer(prepare(parse_args(argv), given_flags(argv)))
    t._setup_models()
    t.batch_items = [t.plan.spec.items[0]]
    return t


def _loss(trainer, latents, seed=5, **options):
    args = trainer.plan.args
    saved = {k: getattr(args, k) for k in options}
    vars(args).update(options)
    try:
        trainer.draws = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            return float(trainer._loss(latents, ["a red circle"]))
    finally:
        vars(args).update(saved)


def _timestep(latents, seed=5) -> torch.Tensor:
    """The timestep ``_loss`` draws with the micro-batch generator (noise first, then t)."""
    g = torch.Generator().manual_seed(seed)
    torch.randn(latents.shape, generator=g)
    return torch.randint(0, 1000, (latents.shape[0],), generator=g)


def _latents():
    return torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(11))


def test_v_pred_like_loss_adds_the_weighted_term(trainer):
    latents = _latents()
    base = _loss(trainer, latents)
    got = _loss(trainer, latents, v_pred_like_loss=0.5)
    scale = float(losses.snr_scale(_timestep(latents), trainer.scheduler.alphas_cumprod)[0])
    assert got == pytest.approx(base + 0.5 * base / scale, rel=1e-5)


def test_scale_v_pred_loss_like_noise_pred_weighs_by_snr_over_snr_plus_one(trainer):
    latents = _latents()
    base = _loss(trainer, latents, v_parameterization=True)
    got = _loss(trainer, latents, v_parameterization=True, scale_v_pred_loss_like_noise_pred=True)
    scale = float(losses.snr_scale(_timestep(latents), trainer.scheduler.alphas_cumprod)[0])
    assert scale < 1 and got == pytest.approx(base * scale, rel=1e-5)


def test_adaptive_noise_scale_changes_the_step_noise(trainer):
    latents = _latents() + 3.0  # a large latent mean: a large adaptive offset
    plain = _loss(trainer, latents, noise_offset=0.1)
    assert _loss(trainer, latents, noise_offset=0.1) == plain  # same draws, same loss
    assert _loss(trainer, latents, noise_offset=0.1, adaptive_noise_scale=2.0) != pytest.approx(plain, rel=1e-3)


@pytest.mark.parametrize("argv, message", [
    (["--adaptive_noise_scale", "0.1"], "--adaptive_noise_scale 0.1 needs --noise_offset"),
    (["--scale_v_pred_loss_like_noise_pred"], "--scale_v_pred_loss_like_noise_pred needs --v_parameterization"),
    (["--v_pred_like_loss", "0.1", "--v_parameterization"], "--v_pred_like_loss 0.1 cannot be used with"),
    (["--v_pred_like_loss", "-1"], "--v_pred_like_loss -1.0 must be a number >= 0"),
])
def test_loss_option_combinations_kohya_refuses(argv, message):
    with pytest.raises(ArgumentError, match=message.replace(".", r"\.")):
        parse_args(argv)


def test_vae_batch_size_chunks_the_training_encode_without_changing_it(trainer, monkeypatch):
    vae = trainer.plan.models.vae
    sizes = []
    real = vae.encode
    monkeypatch.setattr(vae, "encode", lambda pixels: (sizes.append(len(pixels)), real(pixels))[1])
    pixels = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    args = trainer.plan.args
    results = {}
    for size in (3, 8):
        args.vae_batch_size = size
        trainer.draws = torch.Generator().manual_seed(4)
        with torch.no_grad():
            results[size] = trainer._encode(pixels)
    args.vae_batch_size = 1
    assert sizes == [3, 1, 4]
    assert torch.allclose(results[3], results[8], atol=1e-5)


def test_base_weights_are_merged_into_the_model_with_their_multiplier(trainer, base_lora):
    _, network, text_encoder, unet = base_lora  # the network's own (unmerged) copy of the built-in model
    reference = dict(unet.named_modules()) | {f"te.{k}": v for k, v in text_encoder.named_modules()}
    trained = dict(trainer.plan.models.unet.named_modules()) | {
        f"te.{k}": v for k, v in trainer.plan.models.text_encoders[0].named_modules()}
    checked = 0
    for module in network.unet_loras + network.text_encoder_loras:
        prefix = "" if module in network.unet_loras else "te."
        path = next(f"{prefix}{k}" for k, v in (unet if not prefix else text_encoder).named_modules()
                    if v is module.org_module)
        up, down = module.lora_up.weight.flatten(1), module.lora_down.weight.flatten(1)
        delta = (up @ down).view(module.org_module.weight.shape) * module.scale  # ΔW = up·down·alpha/dim
        expected = reference[path].weight + 0.5 * delta
        assert torch.allclose(trained[path].weight, expected, atol=1e-6), path
        checked += 1
    assert checked > 10


def test_base_weights_multiplier_needs_a_file_each():
    with pytest.raises(ArgumentError, match="--base_weights_multiplier has 2 values for 1 --base_weights file"):
        parse_args(["--base_weights", "a.safetensors", "--base_weights_multiplier", "0.5", "1"])


# --- where a run starts: --initial_step / --initial_epoch / --skip_until_initial_step -----------------------
@pytest.fixture(scope="module")
def started_runs(tmp_path_factory):
    """Three demo runs: 10 steps from the start, from step 6 skipping, from epoch 2 not skipping.
    Each records (epoch, item indices) of every micro-batch."""
    from library.hina_train import loop
    from library.hina_train.cli import run

    real_batch = loop.Trainer._batch
    records = []

    def spy(self, indices):
        records[-1].append((self.epoch, list(indices)))
        return real_batch(self, indices)

    loop.Trainer._batch = spy
    results = {}
    try:
        for name, extra in (("full", []), ("skip", ["--initial_step", "6", "--skip_until_initial_step"]),
                            ("epoch", ["--initial_epoch", "2"])):
            records.append([])
            out = tmp_path_factory.mktemp(name)
            results[name] = (run(["--output_dir", str(out), "--max_train_steps", "10", "--resolution", "32", *extra]),
                              records[-1], out)
    finally:
        loop.Trainer._batch = real_batch
    return results


def test_skip_until_initial_step_trains_the_remaining_steps_on_their_own_data(started_runs):
    full, full_batches, _ = started_runs["full"]
    result, batches, _ = started_runs["skip"]
    assert len(full_batches) == 10 and full["global_step"] == 10
    assert batches == full_batches[6:]  # steps 7..10, with the batches (and epochs) they have in a full run
    assert result["global_step"] == 10 and len(result["losses"]) == 4


def test_initial_epoch_without_skipping_numbers_epochs_from_it(started_runs):
    full, full_batches, _ = started_runs["full"]
    result, batches, out = started_runs["epoch"]
    per_epoch = sum(1 for epoch, _ in full_batches if epoch == 1)  # 32 demo images, batch 4: 8 steps an epoch
    assert per_epoch < 10 <= 2 * per_epoch  # the 10 planned steps make 2 epochs
    assert {epoch for epoch, _ in batches} == {2} and len(batches) == per_epoch  # epoch 2 whole, then the end
    assert batches[:10 - per_epoch] == full_batches[per_epoch:]  # epoch 2's own data order
    assert result["global_step"] == per_epoch  # steps count from 0 (kohya: "only the epoch number is skipped")
    from safetensors import safe_open

    with safe_open(str(out / "demo.safetensors"), "pt") as f:
        assert f.metadata()["ss_epoch"] == "2"


@pytest.mark.parametrize("argv, message", [
    (["--initial_epoch", "0"], "--initial_epoch 0 must be an epoch number >= 1"),
    (["--initial_step", "-1"], "--initial_step -1 must be a step number >= 0"),
])
def test_initial_step_values(argv, message):
    with pytest.raises(ArgumentError, match=message):
        parse_args(argv)


def test_initial_step_past_the_planned_steps_fails_before_training(tmp_path):
    from library.hina_train.trainer import prepare

    with pytest.raises(ArgumentError, match="start at step 12, but the run plans 10 steps"):
        prepare(parse_args(["--output_dir", str(tmp_path), "--max_train_steps", "10", "--initial_step", "12"]))


def test_debug_dataset_prints_the_first_epoch_and_trains_nothing(tmp_path, capsys, monkeypatch):
    from library.hina_train import loop
    from library.hina_train.cli import run

    monkeypatch.setattr(loop, "train", lambda plan: pytest.fail("--debug_dataset must not train"))
    assert run(["--output_dir", str(tmp_path / "out"), "--debug_dataset"]) is None
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch 1, step ")]
    images = sorted(p.name for p in (tmp_path / "out" / "demo_data").rglob("*.png"))
    assert {line.split(": ", 1)[1].split(" (")[0].rsplit("/", 1)[-1] for line in lines} == set(images)
    assert all(" -> bucket 64x64): '" in line for line in lines)
    assert not list((tmp_path / "out").glob("*.safetensors"))


def test_torch_compile_compiles_the_unet_with_the_backend(trainer, monkeypatch):
    """The U-Net is wrapped by torch.compile with --dynamo_backend. Not run here: tracing the tiny U-Net takes
    a minute on a loaded 2-core machine (torch.compile itself is torch's to test)."""
    import torch._dynamo

    from library.hina_train.loop import Trainer

    args, models = trainer.plan.args, trainer.plan.models
    unet = models.unet
    calls = []
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: (calls.append((model, kw)), real_compile(model, **kw))[1])
    args.torch_compile, args.dynamo_backend = True, "eager"
    try:
        Trainer(trainer.plan)._setup_models()
        assert calls == [(unet, {"backend": "eager"})]
        assert isinstance(models.unet, torch._dynamo.eval_frame.OptimizedModule) and models.unet._orig_mod is unet
    finally:
        models.unet = unet
        args.torch_compile, args.dynamo_backend = False, "inductor"


def test_dynamo_backend_must_be_kohyas_choice():
    with pytest.raises(ArgumentError, match="--dynamo_backend 'fast'; valid: eager, aot_eager, inductor"):
        parse_args(["--torch_compile", "--dynamo_backend", "fast"])


def test_token_warmup_follows_the_trainers_step(trainer, monkeypatch):
    from library.hina_train.args import parse_args as parse

    item = trainer.plan.spec.items[0]
    monkeypatch.setattr(item, "caption", "t1, t2, t3, t4, t5")
    monkeypatch.setattr(item.subset, "token_warmup_step", 10)
    monkeypatch.setattr(item.subset, "token_warmup_min", 1)
    trainer.latent_cache = None
    counts = []
    for step in (0, 5, 10):
        trainer.current_step = step
        trainer.draws = torch.Generator().manual_seed(0)
        _, captions = trainer._batch([0])
        counts.append(len(captions[0].split(", ")))
    assert counts == [1, 3, 5]  # floor(step·(5 − 1)/10) + 1 until step 10
    assert parse(["--token_warmup_step", "0.5"]).token_warmup_step == 0.5


def test_cache_info_writes_kohyas_metadata_cache_and_reads_it_instead_of_the_images(tmp_path):
    import json

    from PIL import Image

    from library.hina_train import dataset

    folder = tmp_path / "3_dog"
    folder.mkdir()
    Image.new("RGB", (48, 32)).save(folder / "a.png")
    (folder / "a.txt").write_text("a dog, running\n")
    Image.new("RGB", (16, 40)).save(folder / "b.png")  # no caption: the class tokens
    args = parse_args(["--train_data_dir", str(tmp_path), "--caption_extension", ".txt", "--cache_info"])
    first = dataset.collect(dataset.spec_from_folders(args))
    metas = json.loads((folder / "metadata_cache.json").read_text())
    assert metas == {str(folder / "a.png"): {"caption": "a dog, running", "resolution": [48, 32]},
                     str(folder / "b.png"): {"caption": "dog", "resolution": [16, 40]}}
    (folder / "a.txt").write_text("changed\n")
    (folder / "b.png").write_bytes(b"not an image any more")  # kohya: the cache is trusted, nothing is opened
    again = dataset.collect(dataset.spec_from_folders(args))
    assert [(it.image, it.caption, it.size, it.num_repeats) for it in again.items] == \
        [(it.image, it.caption, it.size, it.num_repeats) for it in first.items]
    without = parse_args(["--train_data_dir", str(tmp_path), "--caption_extension", ".txt"])
    with pytest.raises(dataset.DatasetError):  # without --cache_info the images are read (and checked) again
        dataset.collect(dataset.spec_from_folders(without))


def test_alpha_mask_weighs_the_loss_by_the_area_downsampled_alpha(trainer, tmp_path, monkeypatch):
    import numpy as np
    from PIL import Image

    alpha = np.zeros((64, 64), dtype=np.uint8)
    alpha[:, :32] = 255  # left half opaque, right half transparent
    rgba = np.dstack([np.full((64, 64, 3), 120, dtype=np.uint8), alpha])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "half.png")
    item = trainer.plan.spec.items[0]
    for name, value in (("image", tmp_path / "half.png"), ("size", (64, 64)), ("bucket", (64, 64)),
                        ("resized", (64, 64))):
        monkeypatch.setattr(item, name, value)
    monkeypatch.setattr(item.subset, "flip_aug", False)
    trainer.latent_cache = None
    monkeypatch.setattr(item.subset, "alpha_mask", True)
    trainer.draws = torch.Generator().manual_seed(0)
    latents, captions = trainer._batch([0])
    assert torch.equal(trainer.batch_masks[0], torch.from_numpy(alpha / 255.0))
    elementwise = {}
    real = losses.elementwise_loss
    monkeypatch.setattr(losses, "elementwise_loss", lambda *a: elementwise.setdefault("l", real(*a)))
    trainer.draws = torch.Generator().manual_seed(1)
    with torch.no_grad():
        got = float(trainer._loss(latents, captions))
    el = elementwise["l"]  # (1, 4, 8, 8): the mask is 1 on latent columns 0..3, 0 on 4..7
    assert got == pytest.approx(float(el[..., :4].sum() / el.numel()), rel=1e-5)
    monkeypatch.setattr(item.subset, "alpha_mask", False)
    trainer.draws = torch.Generator().manual_seed(0)
    trainer._batch([0])
    assert trainer.batch_masks is None  # off: no mask, the whole image trains


def test_load_item_with_mask_matches_load_item_and_is_one_without_alpha(tmp_path):
    from PIL import Image

    from library.hina_train import dataset

    Image.new("RGB", (80, 48), (10, 200, 30)).save(tmp_path / "rgb.png")
    subset = dataset.Subset(image_dir=tmp_path, random_crop=True)
    item = dataset.Item(image=tmp_path / "rgb.png", caption="", subset=subset, size=(80, 48), bucket=(32, 32))
    pixels, mask = dataset.load_item_with_mask(item, torch.Generator().manual_seed(3))
    assert torch.equal(pixels, dataset.load_item(item, torch.Generator().manual_seed(3)))  # same crop draw
    assert mask.shape == (32, 32) and torch.equal(mask, torch.ones(32, 32))
