"""kohya's ``ss_*`` metadata for the saved network (what ComfyUI/A1111 and LoRA inspectors display)."""

from __future__ import annotations

import json
import time
import uuid

from . import data_args



def _optimizer_name(plan, optimizer) -> str:
    cls = type(optimizer)
    name = f"{cls.__module__}.{cls.__name__}"
    args = plan.args.optimizer_args or []
    return name + (f"({','.join(map(str, args))})" if args else "")


def _base_model_version(models) -> str:
    if models.is_sdxl:
        return "sdxl_base_v1-0"
    return "sd_v2" if models.v2 else "sd_v1"


def kohya_metadata(plan, optimizer, step: int, epoch: int, started_at: float) -> dict[str, str]:
    args, models = plan.args, plan.models
    dirs = {}
    tags: dict[str, dict[str, int]] = {}
    for subset in plan.spec.subsets:
        items = [it for it in plan.spec.items if it.subset is subset]
        dirs[subset.image_dir.name] = {"n_repeats": subset.num_repeats, "img_count": len(items)}
        counts: dict[str, int] = {}
        for it in items:
            for tag in (t.strip() for t in it.caption.split(",")):
                if tag:
                    counts[tag] = counts.get(tag, 0) + 1
        tags[subset.image_dir.name] = counts
    w, h = plan.resolution
    values = {
        "ss_session_id": uuid.uuid4().hex,
        "ss_training_started_at": started_at,
        "ss_training_finished_at": time.time(),
        "ss_output_name": plan.output_name,
        "ss_learning_rate": args.learning_rate,
        "ss_text_encoder_lr": args.text_encoder_lr,
        "ss_unet_lr": args.unet_lr,
        "ss_num_train_images": len(plan.epochs.indices),
        "ss_num_batches_per_epoch": plan.epochs.batches_per_epoch,
        "ss_num_epochs": plan.num_epochs,
        "ss_epoch": epoch,
        "ss_steps": step,
        "ss_max_train_steps": plan.max_train_steps,
        "ss_gradient_checkpointing": args.gradient_checkpointing,
        "ss_gradient_accumulation_steps": args.gradient_accumulation_steps,
        "ss_lr_warmup_steps": args.lr_warmup_steps,
        "ss_lr_scheduler": args.lr_scheduler,
        "ss_network_module": plan.network_module,
        "ss_network_dim": args.network_dim,
        "ss_network_alpha": args.network_alpha,
        "ss_network_dropout": args.network_dropout,
        "ss_network_args": json.dumps(plan.network_kwargs) if plan.network_kwargs else None,
        "ss_mixed_precision": args.mixed_precision,
        "ss_full_fp16": bool(args.full_fp16),
        "ss_fp8_base": bool(args.fp8_base),
        "ss_fp8_base_unet": bool(args.fp8_base_unet),
        "ss_v2": bool(models.v2),
        "ss_base_model_version": _base_model_version(models),
        "ss_clip_skip": args.clip_skip,
        "ss_max_token_length": None,
        "ss_cache_latents": bool(args.cache_latents),
        "ss_seed": args.seed,
        "ss_noise_offset": args.noise_offset,
        "ss_min_snr_gamma": args.min_snr_gamma,
        "ss_training_comment": args.training_comment,
        "ss_sd_model_name": models.name,
        "ss_new_sd_model_hash": models.model_hash,
        "ss_resolution": f"({w}, {h})",
        "ss_optimizer": _optimizer_name(plan, optimizer),
        "ss_caption_extension": plan.spec.subsets[0].caption_extension,
        "ss_shuffle_caption": any(s.shuffle_caption for s in plan.spec.subsets),
        "ss_keep_tokens": plan.spec.subsets[0].keep_tokens,
        "ss_flip_aug": any(s.flip_aug for s in plan.spec.subsets),
        "ss_dataset_dirs": json.dumps(dirs),
        "ss_tag_frequency": json.dumps(tags),
        "ss_v_parameterization": bool(args.v_parameterization),
        "ss_num_validation_images": len(plan.validation_indices),
        "ss_validation_seed": args.validation_seed,
        "ss_validation_split": args.validation_split,
        "ss_max_validation_steps": args.max_validation_steps,
    }
    values.update(data_args.metadata(plan))  # buckets, captions, noise, loss (part B's options)
    values.update(_modelspec(plan, started_at))
    return {k: str(v) for k, v in values.items() if v is not None}


def _modelspec(plan, started_at: float) -> dict[str, str]:
    """The ModelSpec 1.0.1 keys kohya writes for a LoRA (sai_model_spec.build_metadata), ``--metadata_*`` included."""
    from .train_args import modelspec_metadata

    args, models = plan.args, plan.models
    if models.is_sdxl:
        architecture = "stable-diffusion-xl-v1-base"
    elif models.v2:
        architecture = "stable-diffusion-v2-768-v" if args.v_parameterization else "stable-diffusion-v2-512"
    else:
        architecture = "stable-diffusion-v1"
    w, h = plan.resolution
    values = modelspec_metadata(args, started_at)
    values.update({
        "modelspec.architecture": f"{architecture}/lora",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models" if models.is_sdxl
        else "diffusers",
        "modelspec.resolution": f"{w}x{h}",
        "modelspec.prediction_type": "v" if args.v_parameterization else "epsilon",
    })
    if args.clip_skip is not None:
        values["modelspec.encoder_layer"] = str(args.clip_skip)
    return values
