"""The noise a training step adds, with kohya sd-scripts' options (``train_util.get_noise_noisy_latents_and_
timesteps``, ``custom_train_functions``). Every draw comes from the micro-batch's CPU ``torch.Generator``.

- Offset noise (``--noise_offset o``, Guttenberg 2023, crosslabs.org "diffusion with offset noise"):
  ε ← ε + o·n with n ~ N(0, 1) of shape (B, C, 1, 1); ``--noise_offset_random_strength``: o ~ U(0, o).
  ``--adaptive_noise_scale s`` (kohya's ``apply_noise_offset``): per sample and channel
  o_bc = max(0, o + s·|mean_hw(latents_bc)|), so brighter/darker latents get a larger offset.
- Multi-resolution ("pyramid") noise (``--multires_noise_iterations k``, ``--multires_noise_discount d``;
  J. Whitaker, "Multi-Resolution Noise for Diffusion Model Training", 2023): for i = 0..k-1 with
  r_i ~ U(2, 4): ε ← ε + d^i · upsample_bilinear(N(0, 1) of size (H/r_i^i, W/r_i^i)), stopping once a side
  reaches 1; then ε ← ε / std(ε).
- Input perturbation (``--ip_noise_gamma γ``, Ning et al., arXiv 2301.11706, eq. 5): the model input is
  x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·(ε + γ·ξ), ξ ~ N(0, 1), while the target stays ε;
  ``--ip_noise_gamma_random_strength``: γ ~ U(0, γ).
- Zero terminal SNR (``--zero_terminal_snr``, Lin et al., arXiv 2305.08891, Algorithm 1): √ᾱ is shifted so
  its last value is 0 and scaled so its first value is unchanged,
  √ᾱ'_t = (√ᾱ_t − √ᾱ_T) · √ᾱ_1 / (√ᾱ_1 − √ᾱ_T); β' follows from ᾱ'.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def offset_noise(noise: torch.Tensor, offset: float, random_strength: bool, generator: torch.Generator,
                 latents: torch.Tensor | None = None, adaptive_scale: float | None = None) -> torch.Tensor:
    if random_strength:
        offset = float(torch.rand(1, generator=generator)) * offset
    b, c = noise.shape[:2]
    if adaptive_scale is not None:
        latent_mean = latents.detach().float().mean(dim=(2, 3), keepdim=True).abs().cpu()
        offset = torch.clamp(offset + adaptive_scale * latent_mean, min=0.0)
    return noise + offset * torch.randn((b, c, 1, 1), generator=generator)


def pyramid_noise(noise: torch.Tensor, iterations: int, discount: float, generator: torch.Generator) -> torch.Tensor:
    b, c, h, w = noise.shape
    noise = noise.clone()
    for i in range(iterations):
        r = float(torch.rand((), generator=generator)) * 2 + 2
        hn, wn = max(1, int(h / r**i)), max(1, int(w / r**i))
        low = torch.randn((b, c, hn, wn), generator=generator)
        noise += F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False) * discount**i
        if hn == 1 or wn == 1:
            break
    return noise / noise.std()


def training_noise(latents: torch.Tensor, args, generator: torch.Generator) -> torch.Tensor:
    """ε (on the CPU) for ``latents`` with ``--noise_offset``/``--adaptive_noise_scale``/``--multires_noise_*``."""
    noise = torch.randn(latents.shape, generator=generator)
    if args.noise_offset:
        noise = offset_noise(noise, args.noise_offset, getattr(args, "noise_offset_random_strength", False), generator,
                             latents, getattr(args, "adaptive_noise_scale", None))
    if getattr(args, "multires_noise_iterations", None):
        noise = pyramid_noise(noise, args.multires_noise_iterations, args.multires_noise_discount, generator)
    return noise


def input_noise(noise: torch.Tensor, args, generator: torch.Generator) -> torch.Tensor:
    """The noise the model input is made with: ε + γ·ξ with ``--ip_noise_gamma`` γ, else ε itself."""
    gamma = getattr(args, "ip_noise_gamma", None)
    if not gamma:
        return noise
    if getattr(args, "ip_noise_gamma_random_strength", False):
        gamma = float(torch.rand(1, generator=generator)) * gamma
    return noise + gamma * torch.randn(noise.shape, generator=generator).to(noise.device)


def zero_terminal_snr_betas(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023, Algorithm 1: betas whose schedule ends at SNR 0."""
    alphas_bar_sqrt = (1 - betas).cumprod(0).sqrt()
    first, last = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * first / (first - last)
    alphas_bar = alphas_bar_sqrt**2
    alphas = torch.cat([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1 - alphas


def apply_zero_terminal_snr(scheduler) -> None:
    """Rescale a diffusers DDPM-style scheduler in place (``betas``, ``alphas``, ``alphas_cumprod``)."""
    betas = zero_terminal_snr_betas(scheduler.betas.double()).float()
    scheduler.betas = betas
    scheduler.alphas = 1.0 - betas
    scheduler.alphas_cumprod = torch.cumprod(scheduler.alphas, dim=0)
