"""Logging, lr tags, gradient accumulation at epoch ends and the lr schedulers, as kohya's train_network.py.

Claims tested
- ``--logging_dir`` alone writes TensorBoard events (kohya turns TensorBoard on), each run in its own
  ``<log_prefix><timestamp>`` folder; ``--log_with tensorboard`` without a folder fails at once.
- the lr is logged per group kind: ``lr/textencoder`` and ``lr/unet`` carry their own lrs, and the progress
  bar shows the U-Net's.
- gradient accumulation: an epoch ends with a finished update (3 batches per epoch, accumulation 2 ->
  updates of 2 + 1 micro-batches), 2 epochs are 4 steps, and each step's loss is the mean of its own
  micro-batches' losses.
- schedulers: an unknown name fails while parsing (before any model loads) listing the valid ones; warmup
  given as a fraction, cosine with a minimum lr and warmup-stable-decay follow their formulas written out.
"""

from __future__ import annotations

import math

import pytest
import torch

from library.hina_train import loop
from library.hina_train.args import ArgumentError, parse_args
from library.hina_train.cli import run
from library.hina_train.schedulers import build_scheduler
from library.hina_train.tracking import lr_tags, run_log_dir

DEMO_SAMPLES = False  # the built-in demo trains without sample images here (conftest); none is checked

FAST = ["--resolution", "32", "--train_batch_size", "8", "--max_train_steps", "2"]


def _scalars(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = sorted(folder.rglob("events.out.tfevents.*"))
    assert events, f"no TensorBoard events under {folder}"
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_logging_dir_alone_turns_tensorboard_on_with_a_folder_per_run(tmp_path):
    logs = tmp_path / "logs"
    for _ in range(2):
        run(FAST + ["--output_dir", str(tmp_path / "out"), "--logging_dir", str(logs), "--log_prefix", "demo_"])
    runs = sorted(p for p in logs.iterdir() if p.is_dir())
    assert len(runs) == 2, [p.name for p in runs]  # two runs, two TensorBoard runs (not steps 1,2,1,2)
    for folder in runs:
        assert folder.name.startswith("demo_") and folder.name[5:19].isdigit()
        assert (folder / "network_train").is_dir()
        assert _scalars(folder)["loss/current"].__len__() == 2


def test_log_with_tensorboard_needs_a_folder():
    with pytest.raises(ArgumentError, match="--log_with tensorboard needs --logging_dir"):
        parse_args(["--log_with", "tensorboard"])


def test_lr_is_logged_per_group_kind_and_the_bar_shows_the_unet_lr(tmp_path, capsys):
    logs = tmp_path / "logs"
    run(FAST + ["--output_dir", str(tmp_path), "--logging_dir", str(logs), "--text_encoder_lr", "1e-5",
                "--unet_lr", "3e-4"])
    scalars = _scalars(logs)
    assert scalars["lr/textencoder"] == pytest.approx([1e-5, 1e-5])
    assert scalars["lr/unet"] == pytest.approx([3e-4, 3e-4])
    assert "lr=3.00e-04" in capsys.readouterr().err


def test_lr_tags_fallback_and_duplicates():
    assert lr_tags(["textencoder", "unet", "unet"], 3, False) == ["lr/textencoder", "lr/unet", "lr/unet/2"]
    assert lr_tags([], 2, False) == ["lr/textencoder", "lr/unet"]
    assert lr_tags([], 3, True) == ["lr/group0", "lr/group1", "lr/group2"]


def test_run_log_dir_never_reuses_a_folder(tmp_path):
    first = run_log_dir(str(tmp_path), "p_", now=0.0)
    first.mkdir()
    assert run_log_dir(str(tmp_path), "p_", now=0.0) == first.with_name(first.name + "-2")


def test_gradient_accumulation_finishes_each_epoch(tmp_path, monkeypatch):
    """32 demo images, batch 11 -> 3 batches per epoch; accumulation 2 -> updates of 2 and 1 micro-batches."""
    micro_losses = []
    original = loop.Trainer._loss

    def recording(self, latents, captions):
        loss = original(self, latents, captions)
        micro_losses.append(loss.item())
        return loss

    monkeypatch.setattr(loop.Trainer, "_loss", recording)
    result = run(["--resolution", "32", "--train_batch_size", "11", "--gradient_accumulation_steps", "2",
                  "--max_train_epochs", "2", "--output_dir", str(tmp_path)])
    assert loop.updates_per_epoch(3, 2) == 2
    assert result["global_step"] == 4 and len(micro_losses) == 6  # not 8 micro-batches
    groups = [micro_losses[0:2], micro_losses[2:3], micro_losses[3:5], micro_losses[5:6]]
    assert result["losses"] == pytest.approx([sum(g) / len(g) for g in groups], rel=1e-6)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "demo.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["ss_epoch"] == "2" and meta["ss_num_epochs"] == "2" and meta["ss_steps"] == "4"


@pytest.mark.parametrize("name", ["cosin", "adafactor", "reduce_lr_on_plateau"])
def test_bad_scheduler_fails_while_parsing(name, monkeypatch):
    from library.hina_train import model_loading

    monkeypatch.setattr(model_loading, "load_models", lambda *a: pytest.fail("models loaded"))
    with pytest.raises(ArgumentError, match=f"--lr_scheduler '{name}'"):
        run(["--lr_scheduler", name, "--pretrained_model_name_or_path", "x", "--train_data_dir", "y"])


def _lrs(argv, steps, lr=1.0):
    args = parse_args(argv)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = build_scheduler(args, opt, steps)
    out = []
    for _ in range(steps):
        out.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return out


def test_warmup_given_as_a_fraction_of_the_steps():
    lrs = _lrs(["--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", "0.1"], 100)
    assert lrs[:11] == pytest.approx([t / 10 for t in range(10)] + [1.0])  # 10 warmup steps: lr * t / 10
    assert _lrs(["--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", "20%"], 10)[:3] == \
        pytest.approx([0.0, 0.5, 1.0])


def test_cosine_with_min_lr_ratio():
    steps, ratio = 20, 0.1
    lrs = _lrs(["--lr_scheduler", "cosine_with_min_lr", "--lr_scheduler_min_lr_ratio", str(ratio)], steps)
    expected = [ratio + (1 - ratio) * 0.5 * (1 + math.cos(math.pi * t / steps)) for t in range(steps)]
    assert lrs == pytest.approx(expected)


def test_warmup_stable_decay():
    lrs = _lrs(["--lr_scheduler", "warmup_stable_decay", "--lr_warmup_steps", "2", "--lr_decay_steps", "0.4",
                "--lr_scheduler_min_lr_ratio", "0"], 10)
    # 2 warmup (linear), 4 stable, 4 decay (cosine to 0)
    decay = [0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)]
    assert lrs == pytest.approx([0.0, 0.5, 1, 1, 1, 1] + decay)


def test_lr_scheduler_type_with_args():
    lrs = _lrs(["--lr_scheduler_type", "StepLR", "--lr_scheduler_args", "step_size=2", "gamma=0.5"], 6)
    assert lrs == pytest.approx([1, 1, 0.5, 0.5, 0.25, 0.25])


def test_piecewise_constant_needs_step_rules():
    with pytest.raises(ArgumentError, match="step_rules"):
        parse_args(["--lr_scheduler", "piecewise_constant"])
    lrs = _lrs(["--lr_scheduler", "piecewise_constant", "--lr_scheduler_args", "step_rules=1:2,0.1"], 4)
    assert lrs == pytest.approx([1, 1, 0.1, 0.1])


def test_several_text_encoder_lrs():
    assert parse_args(["--text_encoder_lr", "1e-4", "2e-4"]).text_encoder_lr == [1e-4, 2e-4]
    assert parse_args(["--text_encoder_lr", "1e-4"]).text_encoder_lr == 1e-4
    with pytest.raises(ArgumentError, match="--text_encoder_lr -1"):
        parse_args(["--text_encoder_lr", "1e-4", "-1"])


def test_log_config_hparams_and_tracker_config(tmp_path):
    from library.hina_train.tracking import hparams, tracker_init_kwargs

    args = parse_args(["--log_config", "--optimizer_args", "use_spd=True", "--network_dim", "4"])
    values = hparams(args)
    assert values["network_dim"] == 4 and values["optimizer_args"] == "['use_spd=True']"
    assert "network_weights" not in values  # unset: left out
    assert hparams(parse_args([])) is None
    with pytest.raises(ArgumentError, match="--log_tracker_config .* does not exist"):
        parse_args(["--logging_dir", str(tmp_path), "--log_tracker_config", str(tmp_path / "none.toml")])
    (tmp_path / "t.toml").write_text("[tensorboard]\nflush_secs = 5\n")
    assert tracker_init_kwargs(str(tmp_path / "t.toml")) == {"tensorboard": {"flush_secs": 5}}
