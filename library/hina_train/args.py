"""Command line of ``train_network_hina.py``: kohya sd-scripts' argument names, defaults and TOML config files.

Semantics follow sd-scripts:
- ``--config_file FILE`` (``.toml`` may be omitted): tables are flattened (section names do not matter) and
  their keys become defaults; anything on the command line overrides the file.
- ``--output_config --config_file FILE`` writes the effective arguments to FILE and exits without training.
- Deviations, on purpose: ``--optimizer_type`` defaults to ``HinaAdamW`` (this is the Hina trainer) and
  ``--network_module`` to ``networks.lora``; ``--save_model_as`` accepts ``safetensors``, ``ckpt``, ``pt``.

A kohya flag this trainer does not implement is still recognised and fails with a message naming it
(``UNSUPPORTED``); a few pure performance hints are accepted with a printed notice (``INERT``). Nothing
given on the command line or in a config file is silently ignored.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import toml

from . import data_args
from .errors import ArgumentError
from .schedulers import NAMES as SCHEDULER_NAMES, int_or_float
from .tracking import check_logging_args
from . import train_args
from .train_args import SAVE_MODEL_AS

# kohya flags that exist in sd-scripts but that this standalone trainer does not implement.
UNSUPPORTED = (
    "in_json", "dataset_class", "conditioning_data_dir", "face_crop_aug_range", "weighted_captions", "masked_loss",
    "huggingface_repo_id", "huggingface_repo_type", "huggingface_path_in_repo", "huggingface_token",
    "huggingface_repo_visibility", "save_state_to_huggingface", "resume_from_huggingface", "async_upload",
    "stop_text_encoder_training", "deepspeed", "zero_stage", "wandb_api_key", "wandb_run_name",
    "training_comment_file", "fused_backward_pass", "fused_optimizer_groups", "unet_lr_weights",
    "network_train_text_encoder_only_lr", "no_token_padding", "train_text_encoder", "cpu_offload_checkpointing",
    "immiscible_noise", "min_snr_gamma_scale", "text_encoder_lr_list", "offload_optimizer_device",
    "offload_optimizer_nvme_path", "offload_param_device", "offload_param_nvme_path", "zero3_init_flag",
    "zero3_save_16bit_model", "fp16_master_weights_and_gradients",
)

# kohya performance hints that do not change what is computed; accepted with a printed notice.
INERT = {
    "sdpa": "attention already runs through torch's scaled_dot_product_attention",
    "no_half_vae": "the VAE always runs in float32 here",
    "lowram": "models are loaded to the CPU first in any case",
    "max_data_loader_n_workers": "images are loaded in the main process",
    "persistent_data_loader_workers": "images are loaded in the main process",
    "xformers": "attention already runs through torch's scaled_dot_product_attention (memory-efficient kernels)",
    "mem_eff_attn": "attention already runs through torch's scaled_dot_product_attention (memory-efficient kernels)",
    "highvram": "nothing is moved off the device between steps here",
    "tokenizer_cache_dir": "tokenizers are read from the model (folder or built-in); nothing is downloaded",
    "ddp_gradient_as_bucket_view": "the trainer averages the network's gradients itself, not DDP's reducer",
    "ddp_static_graph": "the trainer averages the network's gradients itself, not DDP's reducer",
}

# Keys that --output_config never writes (kohya's list, plus ours).
NOT_SAVED = {"config_file", "output_config", "sd_scripts"}

MIXED_PRECISION = ("no", "fp16", "bf16")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train_network_hina.py",
        description="Train a LoRA/LoKr with kohya sd-scripts' arguments. With no model and no data it trains the "
                    "built-in tiny demo.")
    a = p.add_argument
    # set-up
    a("--config_file", type=str, default=None, help="TOML file with arguments (command line overrides it)")
    a("--output_config", action="store_true", help="write the arguments to --config_file and exit")
    a("--sd_scripts", type=str, default=None, help="path of an sd-scripts checkout: run its NetworkTrainer")
    # model
    a("--pretrained_model_name_or_path", type=str, default=None,
      help="diffusers folder or single-file checkpoint (.safetensors/.ckpt); none: the built-in tiny model")
    a("--v2", action="store_true", help="SD 2.x checkpoint")
    a("--v_parameterization", action="store_true", help="v-prediction loss (SD 2.x 768-v)")
    a("--sdxl", action="store_true", help="SDXL model")
    a("--clip_skip", type=int, default=None, help="use the output of the n-th last text encoder layer")
    # data
    a("--train_data_dir", type=str, default=None, help="kohya folder: <repeats>_<class>/ with images + captions")
    a("--dataset_config", type=str, default=None, help="kohya dataset TOML (common subset)")
    a("--resolution", type=str, default=None, help='"W,H" or "S"; multiples of 8 (default 512, SDXL 1024)')
    a("--caption_extension", type=str, default=".caption", help="caption file extension (kohya default .caption)")
    a("--caption_extention", type=str, default=None, help=argparse.SUPPRESS)  # kohya's old misspelling
    a("--shuffle_caption", action="store_true", help="shuffle comma-separated caption tags")
    a("--keep_tokens", type=int, default=0, help="keep the first N tags in place when shuffling")
    a("--flip_aug", action="store_true", help="random horizontal flips")
    a("--cache_latents", action="store_true", help="encode all images once before training")
    # schedule
    a("--train_batch_size", type=int, default=1)
    a("--max_train_steps", type=int, default=1600)
    a("--max_train_epochs", type=int, default=None, help="overrides --max_train_steps")
    a("--gradient_accumulation_steps", type=int, default=1)
    a("--gradient_checkpointing", action="store_true")
    a("--max_grad_norm", type=float, default=1.0, help="clip gradient norm (0: off)")
    a("--mixed_precision", type=str, default="no", choices=MIXED_PRECISION)
    a("--seed", type=int, default=None)
    a("--noise_offset", type=float, default=None)
    a("--min_snr_gamma", type=float, default=None, help="Min-SNR loss weighting gamma (arXiv 2303.09556)")
    a("--min_timestep", type=int, default=None)
    a("--max_timestep", type=int, default=None)
    # network
    a("--network_module", type=str, default="networks.lora")
    a("--network_dim", type=int, default=None)
    a("--network_alpha", type=float, default=1.0)
    a("--network_dropout", type=float, default=None)
    a("--network_args", type=str, default=None, nargs="*", help="k=v network arguments")
    a("--network_weights", type=str, default=None, help="start from these network weights")
    a("--network_multiplier", type=float, default=1.0)
    a("--network_train_unet_only", action="store_true")
    a("--network_train_text_encoder_only", action="store_true")
    # optimizer
    a("--optimizer_type", type=str, default="HinaAdamW")
    a("--optimizer_args", type=str, default=None, nargs="*", help="k=v optimizer arguments")
    a("--learning_rate", type=float, default=2.0e-6)
    a("--unet_lr", type=float, default=None)
    a("--text_encoder_lr", type=float, default=None, nargs="*",
      help="text encoder lr; several values: one per text encoder (SDXL)")
    a("--lr_scheduler", type=str, default="constant", help=f"one of: {', '.join(SCHEDULER_NAMES)}")
    a("--lr_warmup_steps", type=int_or_float, default=0, help="steps, or below 1 (or N%%): a fraction of the steps")
    a("--lr_decay_steps", type=int_or_float, default=0, help="warmup_stable_decay: steps, or a fraction below 1")
    a("--lr_scheduler_num_cycles", type=int, default=1)
    a("--lr_scheduler_power", type=float, default=1.0)
    a("--lr_scheduler_timescale", type=int, default=None, help="inverse_sqrt timescale (default: the warmup)")
    a("--lr_scheduler_min_lr_ratio", type=float, default=None,
      help="cosine_with_min_lr / warmup_stable_decay: final lr as a ratio of the initial lr")
    a("--lr_scheduler_type", type=str, default="", help="torch.optim.lr_scheduler class, or module.Class")
    a("--lr_scheduler_args", type=str, default=None, nargs="*", help="k=v arguments of the scheduler")
    # output
    a("--output_dir", type=str, default=None, help="default: output/")
    a("--output_name", type=str, default=None, help="default: last (demo: demo)")
    a("--save_model_as", type=str, default="safetensors", help=f"one of: {', '.join(SAVE_MODEL_AS)}")
    a("--save_precision", type=str, default=None, choices=(None, "float", "fp16", "bf16"))
    a("--save_every_n_steps", type=int, default=None)
    a("--save_every_n_epochs", type=int, default=None)
    a("--save_state", action="store_true", help="also write resumable state folders")
    a("--resume", type=str, default=None, help="state folder written by --save_state")
    a("--no_metadata", action="store_true")
    a("--training_comment", type=str, default=None)
    a("--metadata_title", type=str, default=None, help="modelspec.title in the saved file's metadata")
    train_args.add_arguments(p)  # precision, saving, metadata, validation, console logging, ddp
    a("--logging_dir", type=str, default=None)
    a("--log_with", type=str, default=None)
    a("--log_prefix", type=str, default=None, help="prefix of each run's timestamped folder in --logging_dir")
    a("--log_tracker_name", type=str, default=None, help="TensorBoard run name (default network_train)")
    a("--log_tracker_config", type=str, default=None, help="TOML file of tracker init arguments")
    a("--log_config", action="store_true", help="log the arguments as the run's hyperparameters")
    data_args.add_arguments(p)  # buckets, captions, caching, sample images, noise, loss
    for name in INERT:
        a(f"--{name}", nargs="?", const=True, default=None, help=f"accepted, no effect: {INERT[name]}")
    for name in UNSUPPORTED:
        a(f"--{name}", nargs="*", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return p


def config_path(name: str) -> Path:
    path = Path(name)
    if not path.suffix:
        path = path.with_suffix(".toml")
    return path


def read_config(path: Path, parser: argparse.ArgumentParser) -> dict:
    """The file's keys as defaults, read by the project's one TOML argument reader (``library.hina.config_toml``,
    which the recipes use too); a key the parser does not know is an error naming the nearest ones."""
    from library.hina.config_toml import ConfigFileError, read_flat

    try:
        flat = read_flat(path)
    except ConfigFileError as e:
        raise ArgumentError(f"--config_file {e}") from None
    known = {action.dest for action in parser._actions}
    for key in flat:
        if key not in known:
            near = _nearest(key, known)
            raise ArgumentError(f"--config_file {str(path)!r}: unknown key {key!r}"
                                + (f" (did you mean {', '.join(near)}?)" if near else ""))
    return flat


def _nearest(name: str, names) -> list[str]:
    import difflib

    return difflib.get_close_matches(name, sorted(names), n=3, cutoff=0.6)


def write_config(args: argparse.Namespace, path: Path) -> None:
    known = {action.dest for action in build_parser()._actions} - set(UNSUPPORTED) - NOT_SAVED
    values = {k: v for k, v in sorted(vars(args).items()) if k in known and v is not None}
    from .saving import atomic_write

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            toml.dump(values, f)

    atomic_write(path, write)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse ``argv`` (and ``--config_file``), check values, return the namespace. Raises ArgumentError."""
    parser = build_parser()
    first = parser.parse_args(argv)
    if first.config_file and not first.output_config:
        values = read_config(config_path(first.config_file), parser)
        args = parser.parse_args(argv, namespace=argparse.Namespace(**values))
    else:
        args = first
    check_args(args)
    return args


def check_args(args: argparse.Namespace) -> None:
    given = [name for name in UNSUPPORTED if hasattr(args, name)]
    if given:
        raise ArgumentError(
            f"--{given[0]} is a kohya sd-scripts option that train_network_hina.py does not support; remove it, "
            "or run inside an sd-scripts checkout with --sd_scripts PATH")
    for name, why in INERT.items():
        if getattr(args, name) is not None:
            print(f"note: --{name} has no effect here ({why})")
    if args.caption_extention is not None:
        args.caption_extension = args.caption_extention
    train_args.check(args, optimizer_type_default=build_parser().get_default("optimizer_type"))
    check_logging_args(args)
    if args.mixed_precision not in MIXED_PRECISION:
        raise ArgumentError(f"--mixed_precision {args.mixed_precision!r}; valid: {', '.join(MIXED_PRECISION)}")
    positive = ("train_batch_size", "max_train_steps", "gradient_accumulation_steps", "max_train_epochs",
                "save_every_n_steps", "save_every_n_epochs", "network_dim")
    for name in positive:
        value = getattr(args, name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ArgumentError(f"--{name} {value!r} must be a positive integer")
    args.text_encoder_lr = text_encoder_lrs(args.text_encoder_lr)
    for name in ("learning_rate", "unet_lr", "text_encoder_lr"):
        value = getattr(args, name)
        for number in value if isinstance(value, list) else [value]:
            if number is not None and (isinstance(number, bool) or not isinstance(number, (int, float)) or number < 0):
                raise ArgumentError(f"--{name} {number!r} must be a number >= 0")
    from .schedulers import check_scheduler_args

    check_scheduler_args(args)
    data_args.check(args)
    if args.network_train_unet_only and args.network_train_text_encoder_only:
        raise ArgumentError("--network_train_unet_only and --network_train_text_encoder_only exclude each other")
    if args.train_data_dir and args.dataset_config:
        raise ArgumentError("give either --train_data_dir or --dataset_config, not both")
    for name in ("network_args", "optimizer_args"):
        for item in getattr(args, name) or []:
            if "=" not in str(item):
                raise ArgumentError(f"--{name} {item!r}: expected key=value")
    if args.resolution is not None:
        args.resolution_wh = parse_resolution(args.resolution)
    else:
        args.resolution_wh = None


def text_encoder_lrs(value):
    """kohya's ``--text_encoder_lr``: none, one value, or one per text encoder. A TOML file may give a plain
    number; an empty list means none."""
    if value is None or isinstance(value, (int, float)):
        return value
    values = list(value)
    if not values:
        return None
    return values[0] if len(values) == 1 else values


def parse_resolution(value) -> tuple[int, int]:
    """kohya's ``--resolution``: "512", "512,768" (width,height), or an int / [w, h] from TOML."""
    if isinstance(value, (list, tuple)):
        parts = list(value)
    else:
        parts = [s.strip() for s in str(value).split(",")]
    try:
        nums = [int(p) for p in parts]
    except ValueError:
        raise ArgumentError(f"--resolution {value!r}: expected \"SIZE\" or \"WIDTH,HEIGHT\" in pixels") from None
    if len(nums) == 1:
        nums = nums * 2
    if len(nums) != 2 or min(nums) <= 0:
        raise ArgumentError(f"--resolution {value!r}: expected \"SIZE\" or \"WIDTH,HEIGHT\", positive")
    bad = [n for n in nums if n % 8]
    if bad:
        raise ArgumentError(
            f"--resolution {value!r}: {bad[0]} is not a multiple of 8 (the VAE downsamples by 8; "
            f"nearest valid: {bad[0] // 8 * 8 or 8} or {bad[0] // 8 * 8 + 8})")
    return nums[0], nums[1]
