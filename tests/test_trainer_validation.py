"""kohya's validation split: held-out images never trained on, their loss at fixed timesteps, logged.

Claims tested
- ``split_items`` holds out round(n * share) images of each subset, chosen by the seed, disjoint from training.
- the fixed timesteps are kohya's ``np.linspace(t_min, t_max, 6, dtype=int)[1:-1]``.
- in a run: the held-out images never reach a training batch; validation runs every
  ``--validate_every_n_steps`` and at each epoch's end on at most ``--max_validation_steps`` images at the
  four timesteps; the same network gives the same validation loss (fixed noise); metadata counts them.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from safetensors import safe_open

from library.hina_train import loop
from library.hina_train.args import ArgumentError, parse_args
from library.hina_train.cli import run
from library.hina_train.validation import split_items, validation_timesteps

DEMO_SAMPLES = False  # the built-in demo trains without sample images here (conftest); none is checked


def _items(counts):
    items = []
    for s, n in enumerate(counts):
        subset = SimpleNamespace(name=f"s{s}")
        items += [SimpleNamespace(subset=subset, name=f"s{s}-{i}") for i in range(n)]
    return items


def test_split_per_subset_by_seed():
    items = _items([5, 10])
    ordered, held = split_items(items, 0.2, seed=1)
    assert held == 1 + 2 and sorted(i.name for i in ordered) == sorted(i.name for i in items)
    val = ordered[len(ordered) - held:]
    assert sorted(i.subset.name for i in val) == ["s0", "s1", "s1"]
    again, _ = split_items(items, 0.2, seed=1)
    other, _ = split_items(items, 0.2, seed=2)
    assert [i.name for i in again] == [i.name for i in ordered]
    assert [i.name for i in other[-held:]] != [i.name for i in val]


def test_split_that_holds_out_nothing_fails():
    with pytest.raises(ArgumentError, match="--validation_split 0.01 holds out no image of 4"):
        split_items(_items([4]), 0.01, seed=0)


@pytest.mark.parametrize("t_min,t_max", [(0, 1000), (100, 900), (0, 37)])
def test_fixed_timesteps_are_kohyas(t_min, t_max):
    expected = np.linspace(t_min, t_max, 6, dtype=int)[1:-1].tolist()
    assert validation_timesteps(t_min, t_max) == expected


def test_validation_options_need_a_split():
    with pytest.raises(ArgumentError, match="need --validation_split"):
        parse_args(["--validate_every_n_steps", "2"])


def test_validation_in_a_run(tmp_path, monkeypatch):
    """32 demo images, 25 % held out -> 24 trained (3 batches of 8 per epoch), 2 epochs = 6 steps."""
    trained, val_timesteps = set(), []
    real_batch, real_loss = loop.Trainer._batch, loop.Trainer._loss

    def batch(self, indices):
        if not self.network_in_eval():
            trained.update(indices)
        return real_batch(self, indices)

    def loss(self, latents, captions):
        if self.network_in_eval():
            val_timesteps.append(self.plan.args.min_timestep)
        return real_loss(self, latents, captions)

    monkeypatch.setattr(loop.Trainer, "network_in_eval", lambda self: not self.network.training, raising=False)
    monkeypatch.setattr(loop.Trainer, "_batch", batch)
    monkeypatch.setattr(loop.Trainer, "_loss", loss)
    result = run(["--resolution", "32", "--train_batch_size", "8", "--max_train_epochs", "2", "--output_dir",
                  str(tmp_path), "--validation_split", "0.25", "--validate_every_n_steps", "3",
                  "--max_validation_steps", "2", "--validation_seed", "5"])
    assert result["global_step"] == 6
    kinds = [(step, kind) for step, kind, _ in result["validation"]]
    assert kinds == [(3, "step"), (3, "epoch"), (6, "step"), (6, "epoch")]
    assert val_timesteps == [200, 400, 600, 800] * 2 * 4  # 2 images x 4 timesteps, 4 passes
    losses = {(step, kind): value for step, kind, value in result["validation"]}
    assert losses[(3, "step")] == losses[(3, "epoch")]  # same network, fixed noise: same value
    assert losses[(3, "step")] != losses[(6, "step")]  # the network changed in between
    assert len(trained) == 24 and not trained & set(range(24, 32))  # held-out items are the last 8
    with safe_open(str(tmp_path / "demo.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["ss_num_validation_images"] == "8" and meta["ss_num_train_images"] == "24"
    assert meta["ss_validation_split"] == "0.25" and meta["ss_validation_seed"] == "5"
