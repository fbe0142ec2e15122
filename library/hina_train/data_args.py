"""kohya sd-scripts' data, caption, caching, sampling, noise and loss options: names, defaults and help as in
sd-scripts' ``library/train_util.py`` / ``custom_train_functions.py`` / ``train_network.py``, and their checks.

``args.build_parser`` adds them (``add_arguments``) and ``args.check_args`` checks them (``check``); the code
that uses them lives in ``buckets``, ``captions``, ``text_encoding``, ``latent_cache``, ``sampling``,
``noise`` and ``losses``.
"""

from __future__ import annotations

import argparse

from .errors import ArgumentError

# kohya's --sample_sampler names (the diffusers scheduler each maps to is in sampling.SAMPLERS).
SAMPLE_SAMPLERS = ("ddim", "pndm", "lms", "euler", "euler_a", "heun", "dpm_2", "dpm_2_a", "dpmsolver",
                   "dpmsolver++", "dpmsingle", "k_lms", "k_euler", "k_euler_a", "k_dpm_2", "k_dpm_2_a")
LOSS_TYPES = ("l1", "l2", "huber", "smooth_l1")
HUBER_SCHEDULES = ("constant", "exponential", "snr")
MAX_TOKEN_LENGTHS = (75, 150, 225)
RESIZE_INTERPOLATIONS = ("lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic", "area")


def add_arguments(p: argparse.ArgumentParser) -> None:
    a = p.add_argument
    # aspect-ratio buckets
    a("--enable_bucket", action="store_true", help="enable buckets for multi aspect ratio training")
    a("--min_bucket_reso", type=int, default=256, help="minimum resolution for buckets, divisible by bucket_reso_steps")
    a("--max_bucket_reso", type=int, default=1024, help="maximum resolution for buckets, divisible by bucket_reso_steps")
    a("--bucket_reso_steps", type=int, default=64, help="steps of resolution for buckets (SD: multiple of 64, SDXL: 32)")
    a("--bucket_no_upscale", action="store_true", help="make bucket for each image without upscaling")
    a("--random_crop", action="store_true",
      help="crop at a random place instead of the centre (kohya: for style training with face-centred crops)")
    a("--color_aug", action="store_true", help="weak colour augmentation: small random hue shift or gamma")
    a("--cache_info", action="store_true",
      help="cache image sizes and captions in metadata_cache.json per folder for faster dataset loading")
    a("--alpha_mask", action="store_true",
      help="use the images' alpha channel as a loss mask (transparent parts are not trained)")
    a("--debug_dataset", action="store_true",
      help="print every batch of the first epoch (images, buckets, captions) and exit without training")
    a("--dataset_repeats", type=int, default=1, help="num_repeats of dataset-config subsets that do not set it")
    a("--resize_interpolation", type=str, default=None,
      help=f"image resize filter: {', '.join(RESIZE_INTERPOLATIONS)} (default: area down, lanczos up)")
    # captions
    a("--caption_separator", type=str, default=",", help="separator for caption tags")
    a("--keep_tokens_separator", type=str, default="",
      help="tags before this separator are not shuffled (instead of --keep_tokens); a second one fixes a tail")
    a("--secondary_separator", type=str, default=None,
      help="replaced by caption_separator after shuffling/dropping (keeps a multi-part tag together)")
    a("--enable_wildcard", action="store_true",
      help="enable wildcards in captions ('{image|picture|rendition}'; a multi-line caption file: one line at random)")
    a("--caption_prefix", type=str, default=None, help="prefix for caption text")
    a("--caption_suffix", type=str, default=None, help="suffix for caption text")
    a("--caption_dropout_rate", type=float, default=0.0, help="rate of dropping the whole caption (0.0~1.0)")
    a("--caption_dropout_every_n_epochs", type=int, default=0, help="drop all captions every N epochs")
    a("--caption_tag_dropout_rate", type=float, default=0.0, help="rate of dropping each comma-separated tag (0.0~1.0)")
    a("--token_warmup_min", type=int, default=1, help="start learning at N tags (token means comma separated strings)")
    a("--token_warmup_step", type=float, default=0,
      help="tag length reaches maximum on N steps (or N*max_train_steps if N<1)")
    a("--max_token_length", type=int, default=None,
      help="max token length of the text encoder (default 75; 150 or 225: captions encoded in 75-token chunks)")
    # regularisation images, VAE
    a("--reg_data_dir", type=str, default=None, help="folder of regularization images (kohya folder format)")
    a("--prior_loss_weight", type=float, default=1.0, help="loss weight for regularization images")
    a("--vae", type=str, default=None, help="VAE to use instead of the model's: a diffusers folder or a single file")
    # caching
    a("--vae_batch_size", type=int, default=1, help="batch size for encoding images with the VAE (caching and training)")
    a("--cache_latents_to_disk", action="store_true",
      help="cache latents to .npz files beside the images (kohya's format; reused when valid)")
    a("--skip_cache_check", action="store_true",
      help="reuse any existing cache file without checking its content (only that it exists), as kohya")
    a("--cache_text_encoder_outputs", action="store_true", help="cache text encoder outputs (needs a frozen text encoder)")
    a("--cache_text_encoder_outputs_to_disk", action="store_true", help="cache text encoder outputs to disk (.npz)")
    # sample images
    a("--sample_every_n_steps", type=int, default=None, help="generate sample images every N steps")
    a("--sample_every_n_epochs", type=int, default=None,
      help="generate sample images every N epochs (overrides --sample_every_n_steps)")
    a("--sample_at_first", action="store_true", help="generate sample images before training")
    a("--sample_prompts", type=str, default=None, help="file of prompts for sample images (.txt, .toml or .json)")
    a("--sample_sampler", type=str, default="ddim", help=f"sampler for sample images: {', '.join(SAMPLE_SAMPLERS)}")
    # noise
    a("--noise_offset_random_strength", action="store_true",
      help="use a random strength between 0 and noise_offset for the noise offset")
    a("--multires_noise_iterations", type=int, default=None,
      help="enable multires (pyramid) noise with this many iterations (6-10 recommended)")
    a("--multires_noise_discount", type=float, default=0.3, help="discount of multires noise per iteration")
    a("--ip_noise_gamma", type=float, default=None,
      help="input perturbation noise strength (arXiv 2301.11706; about 0.1 recommended)")
    a("--ip_noise_gamma_random_strength", action="store_true",
      help="use a random strength between 0 and ip_noise_gamma for input perturbation noise")
    a("--adaptive_noise_scale", type=float, default=None,
      help="add `latent mean absolute value * this value` to noise_offset (needs --noise_offset)")
    a("--zero_terminal_snr", action="store_true", help="rescale the noise schedule to zero terminal SNR (arXiv 2305.08891)")
    # loss
    a("--loss_type", type=str, default="l2", help=f"loss function: {', '.join(LOSS_TYPES)}")
    a("--huber_schedule", type=str, default="snr",
      help=f"Huber parameter schedule for huber/smooth_l1: {', '.join(HUBER_SCHEDULES)}")
    a("--huber_c", type=float, default=0.1, help="Huber loss parameter (decay parameter of the schedule)")
    a("--huber_scale", type=float, default=1.0, help="Huber loss scale (constant and exponential schedules)")
    a("--debiased_estimation_loss", action="store_true", help="debiased estimation loss weighting (arXiv 2310.08442)")
    a("--scale_v_pred_loss_like_noise_pred", action="store_true",
      help="scale the v-prediction loss like the noise prediction loss (needs --v_parameterization)")
    a("--v_pred_like_loss", type=float, default=None,
      help="add a v-prediction-like loss with this weight (noise prediction only)")
    a("--scale_weight_norms", type=float, default=None,
      help="max-norm regularization: scale each LoRA module's weight so its norm stays below this (1 is a good start)")


def metadata(plan) -> dict:
    """kohya's ``ss_*`` metadata of these options (train_network.py's names), for the saved network."""
    import json

    args, spec = plan.args, plan.spec
    subsets = spec.subsets
    buckets = spec.buckets
    return {
        "ss_max_token_length": args.max_token_length,
        "ss_multires_noise_iterations": args.multires_noise_iterations,
        "ss_multires_noise_discount": args.multires_noise_discount,
        "ss_zero_terminal_snr": bool(args.zero_terminal_snr),
        "ss_adaptive_noise_scale": args.adaptive_noise_scale,
        "ss_caption_dropout_rate": max(s.caption_dropout_rate for s in subsets),
        "ss_caption_dropout_every_n_epochs": max(s.caption_dropout_every_n_epochs for s in subsets),
        "ss_caption_tag_dropout_rate": max(s.caption_tag_dropout_rate for s in subsets),
        "ss_prior_loss_weight": args.prior_loss_weight,
        "ss_num_reg_images": sum(it.num_repeats for it in spec.items if it.subset.is_reg),
        "ss_scale_weight_norms": args.scale_weight_norms,
        "ss_ip_noise_gamma": args.ip_noise_gamma,
        "ss_ip_noise_gamma_random_strength": bool(args.ip_noise_gamma_random_strength),
        "ss_noise_offset_random_strength": bool(args.noise_offset_random_strength),
        "ss_debiased_estimation": bool(args.debiased_estimation_loss),
        "ss_loss_type": args.loss_type,
        "ss_huber_schedule": args.huber_schedule,
        "ss_huber_scale": args.huber_scale,
        "ss_huber_c": args.huber_c,
        "ss_enable_bucket": bool(buckets.enable_bucket),
        "ss_bucket_no_upscale": bool(buckets.bucket_no_upscale),
        "ss_min_bucket_reso": buckets.min_bucket_reso if buckets.enable_bucket else None,
        "ss_max_bucket_reso": buckets.max_bucket_reso if buckets.enable_bucket else None,
        "ss_bucket_info": json.dumps(spec.bucket_info) if spec.bucket_info else None,
    }


def _positive_int(args, name: str) -> None:
    value = getattr(args, name)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ArgumentError(f"--{name} {value!r} must be a positive integer")


def _number(args, name: str, low: float, high: float | None = None, text: str = "") -> None:
    value = getattr(args, name)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < low or (high is not None and value > high):
        raise ArgumentError(f"--{name} {value!r} must be {text or f'a number >= {low}'}")


def check(args: argparse.Namespace) -> None:
    """Check the options above; raises ArgumentError naming the bad value and what is valid."""
    for name in ("min_bucket_reso", "max_bucket_reso", "bucket_reso_steps", "sample_every_n_steps", "dataset_repeats",
                 "sample_every_n_epochs", "multires_noise_iterations", "vae_batch_size"):
        _positive_int(args, name)
    if args.sample_sampler not in SAMPLE_SAMPLERS:
        raise ArgumentError(f"--sample_sampler {args.sample_sampler!r} is not a sampler; valid: {', '.join(SAMPLE_SAMPLERS)}")
    if args.resize_interpolation is not None and args.resize_interpolation not in RESIZE_INTERPOLATIONS:
        raise ArgumentError(f"--resize_interpolation {args.resize_interpolation!r}; valid: {', '.join(RESIZE_INTERPOLATIONS)}")
    if args.loss_type not in LOSS_TYPES:
        raise ArgumentError(f"--loss_type {args.loss_type!r}; valid: {', '.join(LOSS_TYPES)}")
    if args.huber_schedule not in HUBER_SCHEDULES:
        raise ArgumentError(f"--huber_schedule {args.huber_schedule!r}; valid: {', '.join(HUBER_SCHEDULES)}")
    if args.max_token_length is not None and args.max_token_length not in MAX_TOKEN_LENGTHS:
        raise ArgumentError(f"--max_token_length {args.max_token_length!r}; valid: 75 (the default), 150, 225")
    _number(args, "caption_dropout_rate", 0.0, 1.0, "a number from 0 to 1")
    _number(args, "caption_tag_dropout_rate", 0.0, 1.0, "a number from 0 to 1")
    _number(args, "multires_noise_discount", 0.0, 1.0, "a number from 0 to 1")
    _number(args, "huber_c", 0.0, 1.0, "a number in (0, 1]")
    if args.huber_c == 0:  # the exponential schedule takes its logarithm
        raise ArgumentError(f"--huber_c {args.huber_c!r} must be a number in (0, 1]")
    _number(args, "token_warmup_step", 0.0)
    if isinstance(args.token_warmup_min, bool) or not isinstance(args.token_warmup_min, int) or args.token_warmup_min < 0:
        raise ArgumentError(f"--token_warmup_min {args.token_warmup_min!r} must be an integer >= 0")
    _number(args, "adaptive_noise_scale", float("-inf"), text="a number")
    if args.adaptive_noise_scale is not None and not args.noise_offset:
        raise ArgumentError(f"--adaptive_noise_scale {args.adaptive_noise_scale!r} needs --noise_offset "
                            "(it is added to the offset; kohya's rule)")
    if args.scale_v_pred_loss_like_noise_pred and not args.v_parameterization:
        raise ArgumentError("--scale_v_pred_loss_like_noise_pred needs --v_parameterization (it rescales a "
                            "v-prediction loss; kohya's rule)")
    if args.v_pred_like_loss is not None and args.v_parameterization:
        raise ArgumentError(f"--v_pred_like_loss {args.v_pred_like_loss!r} cannot be used with --v_parameterization "
                            "(it adds a v-prediction-like term to a noise-prediction loss; kohya's rule)")
    for name in ("prior_loss_weight", "ip_noise_gamma", "huber_scale", "v_pred_like_loss"):
        _number(args, name, 0.0)
    if args.scale_weight_norms is not None:
        _number(args, "scale_weight_norms", 0.0)
        if args.scale_weight_norms <= 0:
            raise ArgumentError(f"--scale_weight_norms {args.scale_weight_norms!r} must be a number > 0")
    if not isinstance(args.caption_dropout_every_n_epochs, int) or args.caption_dropout_every_n_epochs < 0:
        raise ArgumentError(f"--caption_dropout_every_n_epochs {args.caption_dropout_every_n_epochs!r} "
                            "must be an integer >= 0 (0: off)")
    if not args.caption_separator:
        raise ArgumentError("--caption_separator must not be empty (kohya's default: ',')")
    if args.sample_prompts is None and (args.sample_every_n_steps or args.sample_every_n_epochs or args.sample_at_first):
        raise ArgumentError("--sample_every_n_steps/--sample_every_n_epochs/--sample_at_first need --sample_prompts FILE")
    if args.sample_prompts is not None:
        from .sampling import load_prompts

        load_prompts(args.sample_prompts)  # a bad file fails now, not at the first sample
    if args.cache_latents_to_disk:
        args.cache_latents = True  # kohya: cache_latents_to_disk implies cache_latents
    if args.cache_text_encoder_outputs_to_disk:
        args.cache_text_encoder_outputs = True
    if args.cache_text_encoder_outputs and not args.network_train_unet_only:
        raise ArgumentError("--cache_text_encoder_outputs needs --network_train_unet_only (a text encoder "
                            "that trains changes its outputs; kohya's rule)")
