"""Learning-rate schedulers by kohya's names and arguments (sd-scripts ``train_util.get_scheduler_fix``).

- ``--lr_scheduler NAME``: transformers' schedule functions (``linear``, ``cosine``, ``cosine_with_restarts``,
  ``polynomial``, ``constant``, ``constant_with_warmup``, ``inverse_sqrt``, ``cosine_with_min_lr``,
  ``cosine_warmup_with_min_lr``, ``warmup_stable_decay``), diffusers' ``piecewise_constant`` (its
  ``step_rules`` through ``--lr_scheduler_args``) and ``adafactor[:LR]`` (transformers' AdafactorSchedule,
  only with the Adafactor optimizer).
- ``--lr_scheduler_type CLASS`` (``torch.optim.lr_scheduler`` name, or a dotted ``module.Class``) with
  ``--lr_scheduler_args k=v ...`` replaces the named schedule, as in kohya.
- ``--lr_warmup_steps`` / ``--lr_decay_steps``: a value below 1 (or ``N%``) is a fraction of the training
  steps, as kohya reads them.

``check_scheduler_args`` runs while the command line is parsed, so a typo fails before any model loads.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import inspect

from .errors import ArgumentError

# transformers' names (kohya passes them to transformers.optimization.TYPE_TO_SCHEDULER_FUNCTION)
TRANSFORMERS_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                           "constant_with_warmup", "inverse_sqrt", "cosine_with_min_lr",
                           "cosine_warmup_with_min_lr", "warmup_stable_decay")
# transformers lists these too, but they step on a metric or their own rules; kohya's loop steps every
# scheduler with no argument, so they cannot run there either.
METRIC_SCHEDULERS = ("reduce_lr_on_plateau", "greedy")
DIFFUSERS_SCHEDULERS = ("piecewise_constant",)
NAMES = TRANSFORMERS_SCHEDULERS + DIFFUSERS_SCHEDULERS + ("adafactor",)
# schedules that take no warmup (kohya raises "does not require num_warmup_steps")
NO_WARMUP = ("constant", "adafactor", "piecewise_constant")


def int_or_float(value: str):
    """kohya's ``--lr_warmup_steps`` type: ``"10"`` -> 10 steps, ``"0.1"`` or ``"10%"`` -> a fraction."""
    text = str(value).strip()
    try:
        if text.endswith("%"):
            return float(text[:-1]) / 100.0
        number = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of steps or a fraction (0.1, 10%)") from None
    return int(number) if number >= 1 else number


def parse_scheduler_args(items) -> dict:
    """``--lr_scheduler_args k=v ...``: split at the first ``=``, value through ``ast.literal_eval``
    (kohya's rule; a value that is not a Python literal stays a string, e.g. piecewise ``step_rules``)."""
    kwargs = {}
    for item in items or []:
        key, sep, value = str(item).partition("=")
        if not sep or not key.strip():
            raise ArgumentError(f"--lr_scheduler_args {item!r}: expected key=value")
        try:
            kwargs[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            kwargs[key.strip()] = value.strip()
    return kwargs


def steps_of(value, total: int) -> int:
    """A step count, or a fraction (< 1) of ``total`` steps."""
    if value is None:
        return 0
    return int(value * total) if isinstance(value, float) and value < 1 else int(value)


def check_scheduler_args(args) -> None:
    """Every scheduler choice checked without building anything (called while parsing)."""
    kwargs = parse_scheduler_args(args.lr_scheduler_args)
    for name in ("lr_warmup_steps", "lr_decay_steps"):
        value = getattr(args, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
            raise ArgumentError(f"--{name} {value!r} must be a step count >= 0 or a fraction below 1")
    if args.lr_scheduler_min_lr_ratio is not None and not 0 <= args.lr_scheduler_min_lr_ratio <= 1:
        raise ArgumentError(f"--lr_scheduler_min_lr_ratio {args.lr_scheduler_min_lr_ratio!r} must be in [0, 1]")
    if args.lr_scheduler_type:
        scheduler_class(args.lr_scheduler_type)
        return
    name = str(args.lr_scheduler)
    base = name.split(":", 1)[0]
    if base in METRIC_SCHEDULERS:
        raise ArgumentError(
            f"--lr_scheduler {name!r} steps on a metric, and the training loop steps the scheduler once per "
            f"update without one; valid: {', '.join(NAMES)}")
    if base not in NAMES:
        import difflib

        near = difflib.get_close_matches(base, NAMES, n=2, cutoff=0.6)
        raise ArgumentError(f"--lr_scheduler {name!r} is not a scheduler"
                                     + (f" (did you mean {', '.join(near)}?)" if near else "")
                                     + f"; valid: {', '.join(NAMES)}, or --lr_scheduler_type CLASS")
    if base == "adafactor":
        _adafactor_initial_lr(name, args.learning_rate)
        if "adafactor" not in str(args.optimizer_type).lower():
            raise ArgumentError(f"--lr_scheduler {name!r} works only with --optimizer_type Adafactor "
                                         f"(got {args.optimizer_type!r})")
    if base in NO_WARMUP and args.lr_warmup_steps:
        raise ArgumentError(f"--lr_scheduler {base} takes no warmup; remove --lr_warmup_steps "
                                     f"{args.lr_warmup_steps!r} or use constant_with_warmup")
    if base == "piecewise_constant" and "step_rules" not in kwargs:
        raise ArgumentError("--lr_scheduler piecewise_constant needs --lr_scheduler_args "
                                     "step_rules=\"1:10,0.1:20,0.01\" (multiplier:until_step,...,final)")
    if base == "warmup_stable_decay" and not args.lr_decay_steps:
        raise ArgumentError("--lr_scheduler warmup_stable_decay needs --lr_decay_steps (steps, or a "
                                     "fraction below 1 of the training steps)")


def _adafactor_initial_lr(name: str, learning_rate: float) -> float:
    if ":" not in name:
        return learning_rate
    value = name.split(":", 1)[1]
    try:
        return float(value)
    except ValueError:
        raise ArgumentError(f"--lr_scheduler {name!r}: expected adafactor:LR with a number, "
                                     f"e.g. adafactor:1e-3") from None


def scheduler_class(type_name: str):
    """``--lr_scheduler_type``: a ``torch.optim.lr_scheduler`` class name, or ``module.Class``."""
    import torch

    if "." in type_name:
        module_name, _, class_name = type_name.rpartition(".")
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise ArgumentError(f"--lr_scheduler_type {type_name!r}: cannot import {module_name!r} "
                                         f"({e})") from None
    else:
        module, class_name = torch.optim.lr_scheduler, type_name
    cls = getattr(module, class_name, None)
    if not inspect.isclass(cls):
        raise ArgumentError(f"--lr_scheduler_type {type_name!r} is not a class in {module.__name__} "
                                     f"(e.g. CosineAnnealingLR, OneCycleLR, or module.Class)")
    return cls


def build_scheduler(args, optimizer, num_training_steps: int):
    """The scheduler kohya's ``get_scheduler_fix`` builds for these arguments (stepped once per update)."""
    kwargs = parse_scheduler_args(args.lr_scheduler_args)
    warmup = steps_of(args.lr_warmup_steps, num_training_steps)
    decay = steps_of(args.lr_decay_steps, num_training_steps)
    try:
        if args.lr_scheduler_type:
            return scheduler_class(args.lr_scheduler_type)(optimizer, **kwargs)
        name = str(args.lr_scheduler)
        if name.startswith("adafactor"):
            from transformers.optimization import Adafactor, AdafactorSchedule

            if not isinstance(optimizer, Adafactor):
                raise ArgumentError(f"--lr_scheduler {name!r} works only with the Adafactor optimizer "
                                             f"(got {type(optimizer).__name__})")
            return AdafactorSchedule(optimizer, _adafactor_initial_lr(name, args.learning_rate))
        if name == "piecewise_constant":
            from diffusers.optimization import get_piecewise_constant_schedule

            return get_piecewise_constant_schedule(optimizer, **kwargs)
        from transformers.optimization import TYPE_TO_SCHEDULER_FUNCTION, SchedulerType

        schedule = TYPE_TO_SCHEDULER_FUNCTION[SchedulerType(name)]
        min_lr_ratio = args.lr_scheduler_min_lr_ratio
        cycles = args.lr_scheduler_num_cycles
        if name == "constant":
            return schedule(optimizer, **kwargs)
        if name == "constant_with_warmup":
            return schedule(optimizer, num_warmup_steps=warmup, **kwargs)
        if name == "inverse_sqrt":
            return schedule(optimizer, num_warmup_steps=warmup, timescale=args.lr_scheduler_timescale, **kwargs)
        common = {"num_warmup_steps": warmup, "num_training_steps": num_training_steps}
        if name == "cosine_with_restarts":
            return schedule(optimizer, num_cycles=cycles, **common, **kwargs)
        if name == "polynomial":
            return schedule(optimizer, power=args.lr_scheduler_power, **common, **kwargs)
        if name in ("cosine_with_min_lr", "cosine_warmup_with_min_lr"):
            return schedule(optimizer, num_cycles=cycles / 2, min_lr_rate=min_lr_ratio or 0.0, **common, **kwargs)
        if name == "warmup_stable_decay":
            return schedule(optimizer, num_warmup_steps=warmup, num_decay_steps=decay,
                            num_stable_steps=max(0, num_training_steps - warmup - decay), num_cycles=cycles / 2,
                            min_lr_ratio=min_lr_ratio or 0.0, **kwargs)
        return schedule(optimizer, **common, **kwargs)  # linear, cosine
    except TypeError as e:
        raise ArgumentError(f"--lr_scheduler_args {' '.join(args.lr_scheduler_args or [])!r} do not fit "
                                     f"the scheduler: {e}") from None
