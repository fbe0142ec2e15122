"""kohya ``train_network.py`` options of the run itself: precision, saving, model-card metadata, the validation
split, console logging, DDP and kohya's legacy optimizer switches (same names, defaults and rules as
sd-scripts' ``train_util`` / ``sai_model_spec``). ``args.py`` adds them to its parser and calls ``check``.

The data and loss options live in ``data_args``; the lr schedule in ``schedulers``; logging in ``tracking``.
"""

from __future__ import annotations

import argparse
import logging

from .errors import ArgumentError

# kohya's --dynamo_backend choices (train_util.add_training_arguments); torch must also have the backend
DYNAMO_BACKENDS = ("eager", "aot_eager", "inductor", "aot_ts_nvfuser", "nvprims_nvfuser", "cudagraphs", "ofi", "fx2trt",
                   "onnxrt", "tensort", "ipex", "tvm")
# kohya's sai_model_spec.add_model_spec_arguments: each --metadata_X goes into the file as modelspec.X
METADATA_FIELDS = ("title", "author", "description", "license", "tags", "usage_hint", "thumbnail", "merged_from",
                   "trigger_phrase", "preprocessor", "is_negative_embedding")
SAVE_MODEL_AS = ("safetensors", "ckpt", "pt")
CONSOLE_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def add_arguments(p: argparse.ArgumentParser) -> None:
    a = p.add_argument
    # precision
    a("--full_fp16", action="store_true", help="train the network itself in float16 (needs --mixed_precision fp16)")
    a("--full_bf16", action="store_true", help="train the network itself in bfloat16 (needs --mixed_precision bf16)")
    a("--fp8_base", action="store_true", help="keep the frozen base model's Linear/Conv weights in float8_e4m3fn")
    a("--fp8_base_unet", action="store_true", help="as --fp8_base for the U-Net only")
    # saving
    a("--save_last_n_epochs", type=int, default=None, help="keep only the last N epoch saves")
    a("--save_last_n_epochs_state", type=int, default=None, help="keep only the last N epoch states")
    a("--save_last_n_steps", type=int, default=None, help="keep only the step saves of the last N steps")
    a("--save_last_n_steps_state", type=int, default=None, help="keep only the step states of the last N steps")
    a("--save_n_epoch_ratio", type=int, default=None, help="save N times over the run (at least every epoch)")
    a("--save_state_on_train_end", action="store_true", help="write a state folder at the end only")
    a("--dim_from_weights", action="store_true", help="take the network's dims from --network_weights")
    # network files merged into the base model before training
    a("--base_weights", type=str, default=None, nargs="*",
      help="network weights to merge into the model before training")
    a("--base_weights_multiplier", type=float, default=None, nargs="*",
      help="multiplier for each --base_weights file (default 1)")
    # compilation
    a("--torch_compile", action="store_true", help="compile the U-Net with torch.compile")
    a("--dynamo_backend", type=str, default="inductor",
      help=f"torch.compile backend for --torch_compile: {', '.join(DYNAMO_BACKENDS)} (default inductor)")
    # where the run starts (kohya: lr scheduler untouched; only --resume restores it)
    a("--initial_epoch", type=int, default=None,
      help="initial epoch number, 1 means first epoch (same as not specifying); the lr schedule starts at 0 "
           "without --resume")
    a("--initial_step", type=int, default=None,
      help="initial step number including all epochs, 0 means first step (same as not specifying); overrides "
           "--initial_epoch")
    a("--skip_until_initial_step", action="store_true",
      help="skip training until initial_step is reached (the data of the skipped steps is passed over)")
    # model-card metadata (--metadata_title is in args.py since the first version)
    for field in METADATA_FIELDS[1:]:
        a(f"--metadata_{field}", type=str, default=None, help=f"modelspec.{field} in the saved file's metadata")
    # validation split (kohya: a share of the images held out, their loss logged as loss/validation)
    a("--validation_split", type=float, default=0.0, help="share of the images held out for validation (0..1)")
    a("--validation_seed", type=int, default=None, help="seed of the split and of the validation noise")
    a("--validate_every_n_steps", type=int, default=None, help="validate every N steps")
    a("--validate_every_n_epochs", type=int, default=None, help="validate every N epochs (default: every epoch)")
    a("--max_validation_steps", type=int, default=None, help="at most N validation batches per validation")
    # console logging (Python logging records: diffusers, transformers, accelerate and the trainer's warnings)
    a("--console_log_level", type=str, default=None, choices=CONSOLE_LOG_LEVELS)
    a("--console_log_file", type=str, default=None, help="also write the log records to this file")
    a("--console_log_simple", action="store_true", help="plain log lines (no time, no logger name)")
    # distributed
    a("--ddp_timeout", type=int, default=None, help="minutes the processes wait for each other (torch default 30)")
    # kohya's old switches for --optimizer_type
    a("--use_8bit_adam", action="store_true", help="old kohya switch: --optimizer_type AdamW8bit")
    a("--use_lion_optimizer", action="store_true", help="old kohya switch: --optimizer_type Lion")


def check(args, optimizer_type_default: str) -> None:
    """Value checks and kohya's implied settings; raises ArgumentError naming the value and what is valid."""
    if args.save_model_as not in SAVE_MODEL_AS:
        raise ArgumentError(f"--save_model_as {args.save_model_as!r} is not supported; valid: {', '.join(SAVE_MODEL_AS)}")
    if args.full_fp16 and args.full_bf16:
        raise ArgumentError("--full_fp16 and --full_bf16 exclude each other")
    for flag, precision in (("full_fp16", "fp16"), ("full_bf16", "bf16")):
        if getattr(args, flag) and args.mixed_precision != precision:
            raise ArgumentError(f"--{flag} needs --mixed_precision {precision} (got {args.mixed_precision!r}), "
                                "as in kohya")
    if (args.fp8_base or args.fp8_base_unet) and args.mixed_precision == "no":
        raise ArgumentError("--fp8_base/--fp8_base_unet need --mixed_precision fp16 or bf16 (the float8 weights are "
                            "used through autocast)")
    if args.dynamo_backend not in DYNAMO_BACKENDS:
        raise ArgumentError(f"--dynamo_backend {args.dynamo_backend!r}; valid: {', '.join(DYNAMO_BACKENDS)}")
    if args.torch_compile:
        import torch._dynamo

        available = torch._dynamo.list_backends(exclude_tags=())
        if args.dynamo_backend not in available:
            raise ArgumentError(f"--dynamo_backend {args.dynamo_backend!r} is not available in this torch; "
                                f"available: {', '.join(b for b in DYNAMO_BACKENDS if b in available)}")
    if args.initial_epoch is not None and (isinstance(args.initial_epoch, bool) or not isinstance(args.initial_epoch, int)
                                           or args.initial_epoch < 1):
        raise ArgumentError(f"--initial_epoch {args.initial_epoch!r} must be an epoch number >= 1 (1: the first)")
    if args.initial_step is not None and (isinstance(args.initial_step, bool) or not isinstance(args.initial_step, int)
                                          or args.initial_step < 0):
        raise ArgumentError(f"--initial_step {args.initial_step!r} must be a step number >= 0 (0: the first)")
    for name in ("save_last_n_epochs", "save_last_n_epochs_state", "save_last_n_steps", "save_last_n_steps_state",
                 "save_n_epoch_ratio", "validate_every_n_steps", "validate_every_n_epochs", "max_validation_steps",
                 "ddp_timeout"):
        value = getattr(args, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ArgumentError(f"--{name} {value!r} must be a positive integer")
    for name, every in (("save_last_n_epochs", "save_every_n_epochs"), ("save_last_n_epochs_state", "save_every_n_epochs"),
                        ("save_last_n_steps", "save_every_n_steps"), ("save_last_n_steps_state", "save_every_n_steps")):
        if getattr(args, name) and not getattr(args, every) and not (every == "save_every_n_epochs"
                                                                    and args.save_n_epoch_ratio):
            raise ArgumentError(f"--{name} keeps the last saves of --{every}, which is not given: add --{every} N")
    split = args.validation_split
    if isinstance(split, bool) or not isinstance(split, (int, float)) or not 0 <= split < 1:
        raise ArgumentError(f"--validation_split {split!r} must be a share in [0, 1), e.g. 0.1")
    if not split and (args.validate_every_n_steps or args.validate_every_n_epochs or args.max_validation_steps):
        raise ArgumentError("--validate_every_n_steps/--validate_every_n_epochs/--max_validation_steps need "
                            "--validation_split (the share of images to hold out), e.g. 0.1")
    if args.use_8bit_adam or args.use_lion_optimizer:
        if args.use_8bit_adam and args.use_lion_optimizer:
            raise ArgumentError("--use_8bit_adam and --use_lion_optimizer exclude each other")
        flag, name = ("use_8bit_adam", "AdamW8bit") if args.use_8bit_adam else ("use_lion_optimizer", "Lion")
        if args.optimizer_type not in (optimizer_type_default, name):
            raise ArgumentError(f"--{flag} means --optimizer_type {name}, but --optimizer_type "
                                f"{args.optimizer_type!r} is given too: keep one")
        print(f"note: --{flag} is kohya's old switch for --optimizer_type {name}")
        args.optimizer_type = name
    if args.base_weights_multiplier and len(args.base_weights_multiplier) > len(args.base_weights or []):
        raise ArgumentError(f"--base_weights_multiplier has {len(args.base_weights_multiplier)} values for "
                            f"{len(args.base_weights or [])} --base_weights file(s): give one per file (or fewer; "
                            "the rest are 1)")
    if args.metadata_thumbnail is not None and not str(args.metadata_thumbnail).startswith("data:"):
        from pathlib import Path

        if not Path(args.metadata_thumbnail).is_file():
            raise ArgumentError(f"--metadata_thumbnail {args.metadata_thumbnail!r} does not exist (give an image "
                                "file or a data: URL)")
    setup_console_logging(args)


def setup_console_logging(args) -> None:
    """kohya's ``--console_log_level/_file/_simple`` (``utils.setup_logging``) for Python logging records."""
    if not (args.console_log_level or args.console_log_file or args.console_log_simple):
        return
    level = getattr(logging, args.console_log_level or "INFO")
    fmt = "%(message)s" if args.console_log_simple else "%(asctime)s %(levelname)s %(name)s: %(message)s"
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_hina_console", False):
            root.removeHandler(handler)
    handlers = [logging.StreamHandler()]
    if args.console_log_file:
        try:
            handlers.append(logging.FileHandler(args.console_log_file, encoding="utf-8"))
        except OSError as e:
            raise ArgumentError(f"--console_log_file {args.console_log_file!r} cannot be written: {e.strerror}") from None
    for handler in handlers:
        handler.setFormatter(logging.Formatter(fmt))
        handler._hina_console = True
        root.addHandler(handler)
    root.setLevel(level)


def modelspec_metadata(args, timestamp: float) -> dict[str, str]:
    """``modelspec.*`` keys from ``--metadata_*`` (kohya's sai_model_spec, ModelSpec 1.0.1): the title defaults
    to ``LoRA@<timestamp>`` and a thumbnail file is embedded as a data URL; unset fields are left out."""
    import datetime

    values = {"sai_model_spec": "1.0.1",
              "title": args.metadata_title or f"LoRA@{timestamp}",
              "date": datetime.datetime.fromtimestamp(int(timestamp)).isoformat()}
    for field in METADATA_FIELDS[1:]:
        value = getattr(args, f"metadata_{field}", None)
        if value is not None:
            values[field] = _data_url(value) if field == "thumbnail" else str(value)
    return {f"modelspec.{k}": v for k, v in values.items()}


def _data_url(value: str) -> str:
    if value.startswith("data:"):
        return value
    import base64
    import mimetypes

    mime = mimetypes.guess_type(value)[0] or "application/octet-stream"
    with open(value, "rb") as f:
        return f"data:{mime};base64,{base64.b64encode(f.read()).decode('ascii')}"
