"""kohya's validation split (sd-scripts ``train_util.split_train_val`` and ``train_network.py``'s validation).

``--validation_split S`` holds out ``round(n * S)`` images of each subset (shuffled by ``--validation_seed``,
else ``--seed``); they are never trained on. A validation pass runs the denoising loss of each held-out image
(at most ``--max_validation_steps`` of them) at kohya's four fixed timesteps (``linspace(min, max, 6)[1:-1]``:
200, 400, 600, 800 for 1000 steps) with noise drawn from a generator seeded by the validation seed, so every
pass measures the same thing and differences come from the network alone. It runs every
``--validate_every_n_steps`` steps and at the end of every ``--validate_every_n_epochs``-th epoch (every epoch
by default), and is logged as ``loss/validation/step_average`` / ``loss/validation/epoch_average``.
"""

from __future__ import annotations

import random

import torch

from .errors import ArgumentError

NUM_VALIDATION_TIMESTEPS = 4


def split_items(items: list, share: float, seed: int) -> tuple[list, int]:
    """The items reordered as (training items, then held-out items) and the number held out.

    Per subset, as kohya splits each dataset: shuffle with ``seed``, hold out ``round(n * share)``.
    """
    subsets: dict[int, list] = {}
    for item in items:
        subsets.setdefault(id(item.subset), []).append(item)
    train, held_out = [], []
    for group in subsets.values():
        order = list(group)
        random.Random(seed).shuffle(order)
        n_val = round(len(order) * share)
        if n_val >= len(order):
            n_val = len(order) - 1  # keep at least one image to train on
        train += order[:len(order) - n_val]
        held_out += order[len(order) - n_val:]
    if not held_out:
        raise ArgumentError(f"--validation_split {share} holds out no image of {len(items)} (round(n * share) is 0 "
                            f"in every subset); raise it to at least {1 / max(1, len(items)):.2g}")
    return train + held_out, len(held_out)


def validation_timesteps(t_min: int, t_max: int) -> list[int]:
    """kohya's fixed timesteps: ``np.linspace(t_min, t_max, 6, dtype=int)[1:-1]``."""
    n = NUM_VALIDATION_TIMESTEPS + 2
    return [int(t_min + (t_max - t_min) * i / (n - 1)) for i in range(1, n - 1)]


def should_validate_step(args, step: int) -> bool:
    return bool(args.validation_split and args.validate_every_n_steps and step % args.validate_every_n_steps == 0)


def should_validate_epoch(args, epoch: int) -> bool:
    """``epoch`` counted from 1; every epoch unless --validate_every_n_epochs says otherwise."""
    if not args.validation_split:
        return False
    return args.validate_every_n_epochs is None or epoch % args.validate_every_n_epochs == 0


@torch.no_grad()
def validation_loss(trainer, indices: list[int]) -> float:
    """Mean denoising loss of the held-out ``indices`` at the fixed timesteps, the network in eval mode.

    Uses the trainer's own batch and loss code; the timestep range is pinned to each fixed timestep for the
    call (kohya does the same with args.min_timestep/max_timestep) and restored afterwards.
    """
    args = trainer.plan.args
    seed = args.validation_seed if args.validation_seed is not None else args.seed
    if args.max_validation_steps is not None:
        indices = indices[:args.max_validation_steps]
    t_min = args.min_timestep or 0
    t_max = args.max_timestep or trainer.scheduler.config.num_train_timesteps
    saved = (args.min_timestep, args.max_timestep, trainer.draws)
    network = trainer.accelerator.unwrap_model(trainer.network)
    was_training = network.training
    optimizer_eval = getattr(trainer.inner_optimizer, "eval", None)
    if callable(optimizer_eval):  # schedule-free optimizers evaluate their averaged weights
        optimizer_eval()
    network.eval()
    losses = []
    try:
        trainer.draws = torch.Generator().manual_seed(seed)
        for index in indices:
            latents, captions = trainer._batch([index])
            for t in validation_timesteps(t_min, t_max):
                args.min_timestep, args.max_timestep = t, t + 1
                losses.append(float(trainer._loss(latents, captions).detach().float()))
    finally:
        args.min_timestep, args.max_timestep, trainer.draws = saved
        network.train(was_training)
        optimizer_train = getattr(trainer.inner_optimizer, "train", None)
        if callable(optimizer_train):
            optimizer_train()
    return sum(losses) / len(losses)
