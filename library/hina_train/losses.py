"""The training loss and its weightings, with kohya sd-scripts' options (``train_util.conditional_loss``,
``get_huber_threshold_if_needed``, ``custom_train_functions``, ``networks/lora.py``).

- ``--loss_type``: l2 (x−y)², l1 |x−y|, and the pseudo-Huber forms of Khrapov et al., "Improving Diffusion
  Models's Data-Corruption Resistance using Scheduled Pseudo-Huber Loss" (arXiv 2403.16728):
  huber 2c·(√((x−y)² + c²) − c), smooth_l1 2·(√((x−y)² + c²) − c), with c per sample from
  ``--huber_schedule``: constant c = huber_c·huber_scale; exponential c = huber_scale·exp(−α·t) with
  α = −ln(huber_c)/T (so c falls from huber_scale at t=0 to huber_c·huber_scale at t=T); snr
  c = (1 − huber_c)/(1 + σ_t)² + huber_c with σ_t = √((1−ᾱ_t)/ᾱ_t).
- ``--prior_loss_weight w``: the loss of a regularisation image (``is_reg`` subset) is multiplied by w.
- ``--debiased_estimation_loss`` (Yu et al., arXiv 2310.08442): weight 1/√SNR_t (v-prediction: 1/(SNR_t+1)),
  SNR_t = ᾱ_t/(1−ᾱ_t) capped at 1000 as kohya does (SNR_0 is very large).
- ``--alpha_mask`` (kohya's ``apply_masked_loss``): the elementwise loss is multiplied by the image's alpha
  channel, area-downsampled to the latent size, before the per-sample mean; transparent parts train nothing.
- ``--scale_v_pred_loss_like_noise_pred`` (kohya's ``scale_v_prediction_loss_like_noise_prediction``, with
  ``--v_parameterization``): weight SNR_t/(SNR_t+1), SNR_t capped at 1000, so a v-prediction loss weighs the
  timesteps as an ε-prediction loss would; ``--v_pred_like_loss w`` (kohya's ``add_v_prediction_like_loss``,
  ε-prediction only): loss ← loss + w·loss·(SNR_t+1)/SNR_t, adding a v-prediction-like term.
- ``--scale_weight_norms m`` (max-norm regularisation, kohya's ``apply_max_norm_regularization``): for each
  LoRA module, ΔW = up·down·alpha/dim; when ‖ΔW‖_F > m, up and down are each scaled by √(m/‖ΔW‖_F), so
  ‖ΔW‖_F becomes m. Returns (keys scaled, mean norm, max norm) after scaling, which the loop logs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def huber_c(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, schedule: str, c: float, scale: float,
            num_train_timesteps: int) -> torch.Tensor:
    """The per-sample Huber parameter of ``schedule`` (see the module docstring)."""
    t = timesteps.cpu()
    if schedule == "exponential":
        alpha = -math.log(c) / num_train_timesteps
        return torch.exp(-alpha * t.float()) * scale
    if schedule == "snr":
        ac = alphas_cumprod.cpu()[t]
        sigmas = ((1.0 - ac) / ac) ** 0.5
        return (1 - c) / (1 + sigmas) ** 2 + c
    if schedule == "constant":
        return torch.full(t.shape, c * scale)
    raise ValueError(f"huber_schedule {schedule!r}; valid: constant, exponential, snr")


def elementwise_loss(pred: torch.Tensor, target: torch.Tensor, loss_type: str,
                     c: torch.Tensor | None = None) -> torch.Tensor:
    """Unreduced loss of ``loss_type``; ``c`` (one value per sample) for huber and smooth_l1."""
    if loss_type == "l2":
        return F.mse_loss(pred, target, reduction="none")
    if loss_type == "l1":
        return F.l1_loss(pred, target, reduction="none")
    if loss_type in ("huber", "smooth_l1"):
        c = c.to(pred.device, pred.dtype).view(-1, *([1] * (pred.ndim - 1)))
        root = torch.sqrt((pred - target) ** 2 + c**2) - c
        return 2 * c * root if loss_type == "huber" else 2 * root
    raise ValueError(f"loss_type {loss_type!r}; valid: l1, l2, huber, smooth_l1")


def masked(loss: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """``loss`` (B, C, h, w) times ``masks`` (B, H, W) area-downsampled to (h, w)."""
    masks = F.interpolate(masks.to(loss.device, loss.dtype).unsqueeze(1), size=loss.shape[2:], mode="area")
    return loss * masks


def snr(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    ac = alphas_cumprod.to(timesteps.device)[timesteps]
    return ac / (1 - ac)


def debiased_weights(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, v_prediction: bool) -> torch.Tensor:
    snr_t = torch.clamp(snr(timesteps, alphas_cumprod), max=1000)
    return 1 / (snr_t + 1) if v_prediction else 1 / torch.sqrt(snr_t)


def snr_scale(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """kohya's ``get_snr_scale``: SNR_t/(SNR_t+1) with SNR_t capped at 1000."""
    snr_t = torch.clamp(snr(timesteps, alphas_cumprod), max=1000)
    return snr_t / (snr_t + 1)


def v_pred_like_loss(loss: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor,
                     weight: float) -> torch.Tensor:
    """``--v_pred_like_loss``: loss + weight·loss/snr_scale (kohya's ``add_v_prediction_like_loss``)."""
    return loss + loss / snr_scale(timesteps, alphas_cumprod) * weight


def prior_weights(items, prior_loss_weight: float) -> torch.Tensor:
    """1 per training image, ``prior_loss_weight`` per regularisation image."""
    return torch.tensor([prior_loss_weight if item.subset.is_reg else 1.0 for item in items])


def lora_pairs(network) -> list[tuple[str, str, str]]:
    """(down, up, alpha) state-dict keys of every LoRA module of ``network`` (kohya's key names)."""
    keys = network.state_dict().keys()
    return [(k, k.replace("lora_down", "lora_up"), k.replace("lora_down.weight", "alpha"))
            for k in keys if "lora_down" in k and k.endswith("weight")]


@torch.no_grad()
def apply_max_norm(network, max_norm: float) -> tuple[int, float, float]:
    """Scale every LoRA module whose ΔW has Frobenius norm above ``max_norm`` (in place); returns
    (modules scaled, mean norm, max norm) after scaling."""
    state = network.state_dict()
    scaled, norms = 0, []
    for down_key, up_key, alpha_key in lora_pairs(network):
        down, up = state[down_key].float(), state[up_key].float()
        dim = down.shape[0]
        alpha = float(state[alpha_key]) if alpha_key in state else dim
        if up.ndim == 4 and up.shape[2:] == (1, 1) and down.shape[2:] == (1, 1):
            delta = (up.flatten(1) @ down.flatten(1))
        elif up.ndim == 4:  # k x k conv: compose the two convolutions
            delta = F.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)
        else:
            delta = up @ down
        norm = (delta * (alpha / dim)).norm()
        ratio = min(1.0, max_norm / max(float(norm), max_norm / 2))
        if ratio != 1.0:
            scaled += 1
            state[up_key].mul_(ratio**0.5)
            state[down_key].mul_(ratio**0.5)
        norms.append(float(norm) * ratio)
    if not norms:
        return 0, 0.0, 0.0
    return scaled, sum(norms) / len(norms), max(norms)
