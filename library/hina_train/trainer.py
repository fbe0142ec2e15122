"""Set-up of a training run: every check that can fail happens here, before any training time is spent.

Order: output folder writable (nothing created yet) -> data found and every image decoded -> base model
loaded -> network built and applied -> ``--network_weights`` / ``--resume`` checked against it ->
optimizer and scheduler built. Only then does ``loop.train`` create the output folder and start.

The built-in default (no ``--pretrained_model_name_or_path``, no data): the tiny SD model from
``tiny_model``, the demo dataset from ``demo_data`` written to ``<output_dir>/demo_data``, and the demo
settings below unless the command line or config file sets them.
"""

from __future__ import annotations

import argparse
import importlib
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import dataset as data
from .args import ArgumentError
from .notices import upscale_notice
from .demo_data import DEMO_PROMPTS
from .saving import SaveError, check_state, check_state_files, check_writable, weights_fit

# Used only for the built-in default, for arguments left at their kohya default.
DEMO_SETTINGS = {
    "resolution": "64", "train_batch_size": 4, "max_train_steps": 100, "learning_rate": 1e-3,
    "network_dim": 8, "network_alpha": 8.0, "seed": 42, "caption_extension": ".txt", "cache_latents": True,
    "output_name": "demo", "lr_scheduler": "constant", "optimizer_type": "HinaAdamW",
    "sample_prompts": str(DEMO_PROMPTS), "sample_at_first": True, "sample_every_n_steps": 100,
}


class SetupError(ValueError):
    """Wraps any set-up failure so the CLI prints one clean line."""


def is_builtin_default(args) -> bool:
    return args.pretrained_model_name_or_path is None and args.train_data_dir is None and args.dataset_config is None


def apply_demo_defaults(args, argv_given: set[str]) -> None:
    """Fill the demo settings into arguments the user did not give (kohya defaults are too slow for CPU)."""
    from .args import build_parser, parse_resolution

    defaults = vars(build_parser().parse_args([]))
    for key, value in DEMO_SETTINGS.items():
        if key in argv_given:
            continue
        if getattr(args, key) == defaults.get(key):
            setattr(args, key, value)
    if args.resolution is not None and getattr(args, "resolution_wh", None) is None:
        args.resolution_wh = parse_resolution(args.resolution)


@dataclass
class Plan:
    args: argparse.Namespace
    output_dir: Path
    output_name: str
    models: object
    spec: data.DatasetSpec
    resolution: tuple[int, int]
    batch_size: int
    network: torch.nn.Module
    network_module: str
    network_kwargs: dict
    train_unet: bool
    train_text_encoder: bool
    optimizer: torch.optim.Optimizer
    param_descriptions: list
    epochs: data.Epochs
    max_train_steps: int
    num_epochs: int
    resume_state: dict | None
    builtin: bool
    validation_indices: list = field(default_factory=list)  # held-out items (the last ones of spec.items)
    initial_step: int | None = None  # --initial_step / --initial_epoch as a step count (kohya)


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def network_kwargs_from(items) -> dict:
    """kohya's ``--network_args``: "key=value" split at the first "=", values kept as strings (kohya passes
    strings; the network module parses them)."""
    out = {}
    for item in items or []:
        key, _, value = str(item).partition("=")
        out[key.strip()] = value.strip()
    return out


def choose_seed(args) -> None:
    """kohya: no ``--seed`` means a random one. On ``--resume`` the saved run's seed is reused, since the
    sample order is derived from it."""
    import json
    import random

    if args.seed is not None:
        return
    if args.resume is not None:
        try:
            args.seed = json.loads((Path(args.resume) / "trainer_state.json").read_text()).get("seed")
        except ValueError as e:
            raise SaveError(f"--resume {args.resume!r}: trainer_state.json is not valid JSON: {e}") from None
    if args.seed is None:
        args.seed = random.randint(0, 2**32 - 1)
        print(f"note: no --seed given; using {args.seed}")


def _dataset(args, builtin: bool, output_dir: Path) -> data.DatasetSpec:
    if builtin:
        from .demo_data import make_demo_dataset

        from accelerate import PartialState

        from .distributed import use_cpu

        with PartialState(cpu=use_cpu()).main_process_first():  # under accelerate launch: rank 0 writes, the others read
            root = make_demo_dataset(output_dir / "demo_data")
        spec = data.DatasetSpec(subsets=data.subsets_from_folder(root, args), buckets=data.bucket_settings({}, args))
    elif args.dataset_config:
        spec = data.spec_from_config(args.dataset_config, args)
    elif args.train_data_dir:
        spec = data.spec_from_folders(args)
    else:
        raise ArgumentError("--pretrained_model_name_or_path was given without data: add --train_data_dir DIR "
                            "(kohya folder format) or --dataset_config FILE")
    return data.collect(spec)


def _network_module(name: str):
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise ArgumentError(f"--network_module {name!r} cannot be imported ({e}); "
                            "valid here: networks.lora, networks.lokr") from None


def prepare(args, argv_given: set[str] = frozenset()) -> Plan:
    from .model_loading import load_models

    from .distributed import check_supported

    check_supported()  # FSDP / DeepSpeed requested through accelerate launch
    builtin = is_builtin_default(args)
    if builtin:
        apply_demo_defaults(args, argv_given)
    output_dir = Path(args.output_dir or "output")
    output_name = args.output_name or "last"
    if any(c in output_name for c in "/\\") or output_name in ("", ".", ".."):
        raise ArgumentError(f"--output_name {output_name!r} must be a plain file name without folders")
    check_writable(output_dir)
    if args.resume is not None:
        check_state_files(Path(args.resume))
    if args.network_weights is not None and not Path(args.network_weights).is_file():
        raise SaveError(f"--network_weights {args.network_weights!r} does not exist")
    for path in args.base_weights or []:
        if not Path(path).is_file():
            raise SaveError(f"--base_weights {path!r} does not exist")
    if args.dim_from_weights and args.network_weights is None:
        raise ArgumentError("--dim_from_weights needs --network_weights FILE (the dims are read from it)")

    choose_seed(args)
    seed_everything(args.seed)  # the network's initial weights depend on it
    spec = _dataset(args, builtin, output_dir)
    held_out = 0
    if args.validation_split:  # kohya's split: the held-out images go last in spec.items, never trained on
        from .validation import split_items

        spec.items, held_out = split_items(spec.items, args.validation_split,
                                           args.validation_seed if args.validation_seed is not None else args.seed)
    models = load_models(args)
    resolution = args.resolution_wh or spec.resolution or (models.default_resolution,) * 2
    if not args.resolution_wh and spec.resolution is None:
        print(f"note: no --resolution given; using {resolution[0]},{resolution[1]}")
    if resolution[0] % 64 or resolution[1] % 64:
        if not builtin:
            print(f"note: resolution {resolution[0]},{resolution[1]} is not a multiple of 64 (SD's usual step); "
                  "it works, but the UNet pads internally")
    batch_size = spec.batch_size or args.train_batch_size
    from .buckets import assign_buckets

    assign_buckets(spec, resolution, models.unet)
    notice = upscale_notice(spec.items, resolution)
    if notice:
        print(notice)
    if args.cache_text_encoder_outputs:
        from .text_encoding import check_cacheable

        check_cacheable(spec.subsets)

    # network
    module = _network_module(args.network_module)
    merge_base_weights(args, module, models)
    network_kwargs = network_kwargs_from(args.network_args)
    train_unet = not args.network_train_text_encoder_only
    train_text_encoder = not args.network_train_unet_only
    try:
        if args.dim_from_weights:  # kohya: the network's shape (dims, alphas, modules) from --network_weights
            network, _ = module.create_network_from_weights(args.network_multiplier, args.network_weights,
                                                            models.vae, models.text_encoder_for_network,
                                                            models.unet, **network_kwargs)
        else:
            network = module.create_network(args.network_multiplier, args.network_dim, args.network_alpha,
                                            models.vae, models.text_encoder_for_network, models.unet,
                                            neuron_dropout=args.network_dropout, **network_kwargs)
    except (ValueError, TypeError) as e:
        raise ArgumentError(f"--network_module {args.network_module} rejected the arguments: {e}") from None
    except Exception as e:  # noqa: BLE001 - a foreign module's failure (lycoris asserts) as one clear line
        raise ArgumentError(f"--network_module {args.network_module} failed to build the network for this model "
                            f"({type(e).__name__}: {e or 'no message'}); check --network_args "
                            f"{' '.join(args.network_args or []) or '(none)'}") from None
    network.apply_to(models.text_encoder_for_network, models.unet, train_text_encoder, train_unet)
    if args.scale_weight_norms:
        from .losses import lora_pairs

        if not lora_pairs(network):
            raise ArgumentError(f"--scale_weight_norms needs a LoRA network (lora_down/lora_up weights); "
                                f"--network_module {args.network_module} has none")
    if args.network_weights is not None:
        weights_fit(network, Path(args.network_weights), "--network_weights")
        network.load_weights(args.network_weights)
    resume_state = check_state(Path(args.resume), network) if args.resume else None

    # optimizer
    from library.hina.registry import create_optimizer

    groups, descriptions = _param_groups(network, args)
    if not groups:
        raise ArgumentError("nothing to train: every learning rate is 0 or the network has no modules "
                            "(check --unet_lr/--text_encoder_lr/--network_train_*_only)")
    try:
        optimizer = create_optimizer(args.optimizer_type, groups, args.learning_rate, args.optimizer_args)
    except (ValueError, TypeError, ImportError) as e:
        raise ArgumentError(f"--optimizer_type {args.optimizer_type!r}: {e}") from None
    if not all("param_names" in g for g in optimizer.param_groups) and hasattr(optimizer, "attach_names"):
        optimizer.attach_names(network)
    if "bf16" in type(optimizer).__name__.lower() and not args.full_bf16:
        raise ArgumentError(f"--optimizer_type {args.optimizer_type!r} steps bfloat16 parameters: add "
                            "--mixed_precision bf16 --full_bf16 (the network then trains in bfloat16), as in kohya")

    epochs = data.Epochs(spec.items[:len(spec.items) - held_out], batch_size, args.seed)
    from accelerate import PartialState

    from .distributed import use_cpu
    from .loop import updates_per_epoch

    epoch_updates = updates_per_epoch(epochs.batches_per_epoch, args.gradient_accumulation_steps,
                                      PartialState(cpu=use_cpu()).num_processes)
    if args.max_train_epochs is not None:
        max_train_steps = args.max_train_epochs * epoch_updates
    else:
        max_train_steps = args.max_train_steps
    num_epochs = math.ceil(max_train_steps / epoch_updates)
    if args.save_n_epoch_ratio:  # kohya: save N times over the run, at least every epoch
        args.save_every_n_epochs = max(1, num_epochs // args.save_n_epoch_ratio)
    initial_step = initial_step_of(args, epoch_updates)
    if initial_step is not None and initial_step >= max_train_steps:
        raise ArgumentError(f"--initial_step/--initial_epoch start at step {initial_step}, but the run plans "
                            f"{max_train_steps} steps: nothing to train (kohya: max_train_steps must be greater)")
    if resume_state is not None and initial_step is None:
        check_resume_has_work(args, resume_state, max_train_steps)
    return Plan(args=args, output_dir=output_dir, output_name=output_name, models=models, spec=spec,
                resolution=resolution, batch_size=batch_size, network=network, network_module=args.network_module,
                network_kwargs=network_kwargs, train_unet=train_unet, train_text_encoder=train_text_encoder,
                optimizer=optimizer, param_descriptions=descriptions, epochs=epochs,
                max_train_steps=max_train_steps, num_epochs=num_epochs, resume_state=resume_state,
                builtin=builtin, validation_indices=list(range(len(spec.items) - held_out, len(spec.items))),
                initial_step=initial_step)


def initial_step_of(args, epoch_updates: int) -> int | None:
    """kohya's start step: ``--initial_step``, else ``(--initial_epoch - 1) × steps per epoch``; None if neither."""
    if args.initial_step is not None:
        return args.initial_step
    if args.initial_epoch is not None:
        return (args.initial_epoch - 1) * epoch_updates
    return None


def merge_base_weights(args, module, models) -> None:
    """kohya's ``--base_weights``: each file, read by the network module, is merged into the base model (its
    ΔW times ``--base_weights_multiplier``, 1 where none is given) before the trained network is built."""
    multipliers = list(args.base_weights_multiplier or [])
    for i, path in enumerate(args.base_weights or []):
        multiplier = multipliers[i] if i < len(multipliers) else 1.0
        try:
            merged, weights_sd = module.create_network_from_weights(multiplier, path, models.vae,
                                                                    models.text_encoder_for_network, models.unet,
                                                                    for_inference=True)
        except (ValueError, KeyError) as e:
            raise ArgumentError(f"--base_weights {path!r} does not fit --network_module {args.network_module} "
                                f"on this model: {e}") from None
        merged.merge_to(models.text_encoder_for_network, models.unet, weights_sd, None, "cpu")
        print(f"merged {path} into the model (multiplier {multiplier})")


def check_resume_has_work(args, resume_state: dict, max_train_steps: int) -> None:
    """A state at or past the planned steps has nothing left to train: say so instead of rewriting the final
    files with zero steps."""
    done = int(resume_state.get("global_step", 0))
    if done >= max_train_steps:
        plan = (f"--max_train_epochs {args.max_train_epochs} = {max_train_steps} steps"
                if args.max_train_epochs is not None else f"--max_train_steps {max_train_steps}")
        raise SaveError(f"--resume {args.resume!r} has already trained {done} steps and this run plans {plan}: "
                        "nothing left to train (raise --max_train_steps or --max_train_epochs to continue)")


def _param_groups(network, args):
    result = network.prepare_optimizer_params(args.text_encoder_lr, args.unet_lr, args.learning_rate)
    if isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], list) \
            and all(isinstance(d, str) for d in result[1]):
        groups, descriptions = result
    else:  # older kohya modules return the groups alone
        groups, descriptions = result, []
    groups = [g if isinstance(g, dict) else {"params": list(g)} for g in groups]
    return groups, descriptions
