"""What the trainer logs to TensorBoard, and where, as kohya's ``train_network.py`` does.

- ``--logging_dir`` alone turns TensorBoard on (kohya's ``prepare_accelerator``); each run writes into its
  own folder ``<logging_dir>/<log_prefix><YYYYmmddHHMMSS>/<log_tracker_name or network_train>``, so repeated
  runs never share one TensorBoard run.
- one ``lr/<kind>`` tag per parameter group, named by the network's group descriptions (``textencoder``,
  ``unet``, a block name for block-wise lrs), kohya's ``generate_step_logs`` names when there are none.
- ``--log_config`` stores the arguments as the run's hyperparameters; ``--log_tracker_config FILE`` (TOML)
  gives the trackers' init arguments.
"""

from __future__ import annotations

import time
from pathlib import Path

from .errors import ArgumentError

LOG_WITH = ("tensorboard",)
DEFAULT_TRACKER_NAME = "network_train"


def log_with(args) -> str | None:
    """The tracker to use: ``--log_with``, else TensorBoard when ``--logging_dir`` is given (kohya)."""
    if args.log_with is not None:
        return args.log_with
    return "tensorboard" if args.logging_dir else None


def check_logging_args(args) -> None:
    if args.log_with is not None and args.log_with not in LOG_WITH:
        raise ArgumentError(f"--log_with {args.log_with!r} is not supported; valid: {', '.join(LOG_WITH)}")
    if args.log_with == "tensorboard" and not args.logging_dir:
        raise ArgumentError("--log_with tensorboard needs --logging_dir DIR (where the TensorBoard files go)")
    if args.log_tracker_config is not None:
        tracker_init_kwargs(args.log_tracker_config)


def run_log_dir(logging_dir: str, log_prefix: str | None, now: float | None = None) -> Path:
    """``<logging_dir>/<log_prefix><timestamp>`` (kohya's name); ``-2``, ``-3``... when a run of the same
    second already made it."""
    stamp = time.strftime("%Y%m%d%H%M%S", time.localtime(time.time() if now is None else now))
    base = Path(logging_dir) / f"{log_prefix or ''}{stamp}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def tracker_init_kwargs(path: str) -> dict:
    """``--log_tracker_config``: a TOML file of per-tracker init arguments (``[tensorboard] ...``)."""
    import toml

    if not Path(path).is_file():
        raise ArgumentError(f"--log_tracker_config {path!r} does not exist")
    try:
        return toml.load(path)
    except (toml.TomlDecodeError, UnicodeDecodeError) as e:
        raise ArgumentError(f"--log_tracker_config {path!r} is not valid TOML: {e}") from None


def hparams(args) -> dict | None:
    """``--log_config``: the arguments as hyperparameters (kohya's ``get_sanitized_config_or_none``:
    numbers, strings and booleans as they are, anything else as its string, unset ones left out)."""
    if not getattr(args, "log_config", None):
        return None
    out = {}
    for key, value in sorted(vars(args).items()):
        if value is None:
            continue
        out[key] = value if isinstance(value, (bool, int, float, str)) else str(value)
    return out


def lr_tags(descriptions: list[str], num_groups: int, train_unet_only: bool) -> list[str]:
    """One ``lr/...`` tag per optimizer param group.

    With the network's group descriptions (``textencoder``, ``unet``, ``unet plus``, a block name) each tag is
    ``lr/<description>``; a description given twice gets ``/<n>`` so no tag overwrites another. Without them
    (older network modules), as kohya: the first group is the text encoder's unless
    ``--network_train_unet_only`` or there is one group; the others are ``unet`` (one) or ``group<i>``.
    """
    if len(descriptions) == num_groups:
        names = [d.strip() or f"group{i}" for i, d in enumerate(descriptions)]
    else:
        first_is_te = not train_unet_only and num_groups > 1
        rest = num_groups - first_is_te
        names = (["textencoder"] if first_is_te else []) + (["unet"] if rest == 1 else
                                                            [f"group{i}" for i in range(rest)])
    seen: dict[str, int] = {}
    tags = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        tags.append(f"lr/{name}" if seen[name] == 1 else f"lr/{name}/{seen[name]}")
    return tags


def shown_lr_index(tags: list[str]) -> int:
    """The group whose lr the progress bar shows: the first U-Net group (the last group when none is named)."""
    for i, tag in enumerate(tags):
        if tag.startswith("lr/unet"):
            return i
    return len(tags) - 1
