"""Load the base model: a diffusers folder, a single-file checkpoint, or (none given) the built-in tiny model.

- diffusers folder (has ``model_index.json``): ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline``
  ``.from_pretrained`` with ``--sdxl``.
- single file (``.safetensors``/``.ckpt``): ``from_single_file``. diffusers needs the model's config for
  that; it comes from the local Hugging Face cache (nothing is downloaded when HF_HUB_OFFLINE=1).
- nothing: ``tiny_model.build_tiny_sd`` (SD 1.x architecture, random weights, generated tokenizer).
- ``--vae PATH`` replaces the model's VAE, as kohya's ``load_vae``: a diffusers ``AutoencoderKL`` folder (or a
  pipeline folder with ``vae/``), or a single ``.safetensors``/``.ckpt`` file (``from_single_file``).

The noise scheduler is kohya's: DDPM, scaled-linear betas 0.00085..0.012, 1000 steps, no sample clipping.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch


class ModelError(ValueError):
    """The base model cannot be loaded; the message names the path and what was expected."""


@dataclass
class Models:
    tokenizers: list
    text_encoders: list
    vae: torch.nn.Module
    unet: torch.nn.Module
    is_sdxl: bool = False
    v2: bool = False
    name: str = "tiny"
    model_hash: str | None = None
    default_resolution: int = 512
    extra: dict = field(default_factory=dict)

    @property
    def text_encoder_for_network(self):
        """kohya passes a single text encoder for SD 1/2 and a list for SDXL."""
        return self.text_encoders if self.is_sdxl else self.text_encoders[0]


def noise_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         num_train_timesteps=1000, clip_sample=False)


def legacy_model_hash(path: Path) -> str:
    """kohya/A1111's cheap checkpoint hash: sha256 of 64 KiB at offset 1 MiB, first 8 hex digits."""
    with open(path, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


def _from_pipeline(pipe, is_sdxl: bool, name: str, model_hash: str | None, v2: bool) -> Models:
    if is_sdxl:
        tokenizers = [pipe.tokenizer, pipe.tokenizer_2]
        text_encoders = [pipe.text_encoder, pipe.text_encoder_2]
    else:
        tokenizers, text_encoders = [pipe.tokenizer], [pipe.text_encoder]
    for model in (*text_encoders, pipe.vae, pipe.unet):
        model.requires_grad_(False)
        model.eval()
    return Models(tokenizers=tokenizers, text_encoders=text_encoders, vae=pipe.vae, unet=pipe.unet,
                  is_sdxl=is_sdxl, v2=v2, name=name, model_hash=model_hash,
                  default_resolution=1024 if is_sdxl else (768 if v2 else 512))


def load_vae(path: str):
    """kohya's ``--vae``: an AutoencoderKL from a diffusers folder or a single file, float32, frozen."""
    from diffusers import AutoencoderKL

    p = Path(path)
    if not p.exists():
        raise ModelError(f"--vae {path!r} does not exist (give a diffusers VAE folder or a .safetensors/.ckpt file)")
    try:
        if p.is_dir():
            folder = p / "vae" if (p / "vae" / "config.json").is_file() else p
            if not (folder / "config.json").is_file():
                raise ModelError(f"--vae {path!r} is a folder without config.json (expected a diffusers "
                                 "AutoencoderKL folder, or a pipeline folder with vae/)")
            vae = AutoencoderKL.from_pretrained(str(folder), torch_dtype=torch.float32)
        elif p.suffix.lower() in (".safetensors", ".ckpt", ".pt", ".bin"):
            vae = AutoencoderKL.from_single_file(str(p), torch_dtype=torch.float32)
        else:
            raise ModelError(f"--vae {path!r}: expected a diffusers folder or a .safetensors/.ckpt file")
    except ModelError:
        raise
    except Exception as e:
        raise ModelError(f"cannot load --vae {path!r}: {type(e).__name__}: {e}") from None
    vae.requires_grad_(False)
    vae.eval()
    return vae


def load_models(args) -> Models:
    models = _load_base(args)
    if getattr(args, "vae", None):
        vae = load_vae(args.vae)
        if vae.config.latent_channels != models.unet.config.in_channels:
            raise ModelError(f"--vae {args.vae!r} makes {vae.config.latent_channels}-channel latents; the UNet "
                             f"takes {models.unet.config.in_channels}")
        models.vae = vae
    return models


def _load_base(args) -> Models:
    path = args.pretrained_model_name_or_path
    if path is None:
        from .demo_data import caption_words
        from .tiny_model import build_tiny_sd

        if args.sdxl:
            raise ModelError("--sdxl needs --pretrained_model_name_or_path (the built-in tiny model is SD 1.x)")
        tokenizer, text_encoder, vae, unet = build_tiny_sd(caption_words(), seed=0)
        return Models(tokenizers=[tokenizer], text_encoders=[text_encoder], vae=vae, unet=unet,
                      name="hina-tiny-sd", default_resolution=64)
    p = Path(path)
    if not p.exists():
        raise ModelError(f"--pretrained_model_name_or_path {path!r} does not exist (give a diffusers folder "
                         "with model_index.json or a .safetensors/.ckpt checkpoint; Hub ids are not downloaded)")
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionXLPipeline if args.sdxl else StableDiffusionPipeline
    extra = {} if args.sdxl else {"safety_checker": None, "requires_safety_checker": False}
    try:
        if p.is_dir():
            if not (p / "model_index.json").is_file():
                raise ModelError(f"--pretrained_model_name_or_path {path!r} is a folder without model_index.json "
                                 "(expected a diffusers pipeline folder)")
            pipe = cls.from_pretrained(str(p), dtype=torch.float32, **extra)
            model_hash = None
        else:
            if p.suffix.lower() not in (".safetensors", ".ckpt"):
                raise ModelError(f"--pretrained_model_name_or_path {path!r}: expected .safetensors or .ckpt")
            pipe = cls.from_single_file(str(p), dtype=torch.float32, **extra)
            model_hash = legacy_model_hash(p)
    except ModelError:
        raise
    except Exception as e:
        raise ModelError(f"cannot load --pretrained_model_name_or_path {path!r} as "
                         f"{'SDXL' if args.sdxl else 'SD 1.x/2.x'}: {type(e).__name__}: {e}") from None
    return _from_pipeline(pipe, args.sdxl, p.name, model_hash, args.v2)
