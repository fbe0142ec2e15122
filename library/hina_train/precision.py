"""kohya's precision switches for the trainer: ``--full_fp16`` / ``--full_bf16`` (the network itself in half
precision, as sd-scripts' train_network.py casts it) and ``--fp8_base`` / ``--fp8_base_unet`` (the frozen base
weights stored as float8_e4m3fn and used through autocast).

fp8: sd-scripts casts the whole U-Net (and text encoder) to float8 and relies on CUDA autocast upcasting every
op's weights. CPU autocast does not upcast normalisation weights, so here only the Linear and Conv weights are
stored in float8 (they hold nearly all the bytes); norms, embeddings and biases keep the weight dtype.
Whether the device's autocast can run a float8 Linear is probed before training; if not, a clear error.
"""

from __future__ import annotations

import torch

from .errors import ArgumentError

FP8 = torch.float8_e4m3fn


def network_dtype(args) -> torch.dtype | None:
    """The dtype the network trains in: float16/bfloat16 with --full_fp16/--full_bf16, else None (float32)."""
    if args.full_fp16:
        return torch.float16
    if args.full_bf16:
        return torch.bfloat16
    return None


def check_fp8_supported(device: torch.device, autocast_dtype: torch.dtype) -> None:
    """Run a float8 Linear and Conv forward and backward under the device's autocast; raise ArgumentError when torch cannot."""
    try:
        linear = torch.nn.Linear(16, 16).to(device)
        conv = torch.nn.Conv2d(4, 4, 3, padding=1).to(device)
        linear.weight.data = linear.weight.data.to(FP8)
        conv.weight.data = conv.weight.data.to(FP8)
        x = torch.randn(2, 16, device=device, requires_grad=True)  # gradients flow through the base layers
        image = torch.randn(1, 4, 8, 8, device=device, requires_grad=True)
        with torch.autocast(device.type, dtype=autocast_dtype):
            loss = linear(x).float().sum() + conv(image).float().sum()
        loss.backward()
    except (RuntimeError, TypeError, NotImplementedError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ArgumentError(f"--fp8_base: torch {torch.__version__} cannot compute with float8 weights on "
                            f"{device.type} under {autocast_dtype} autocast ({first}); drop --fp8_base") from None


def cast_base_to_fp8(module: torch.nn.Module) -> int:
    """Store the weights of ``module``'s Linear and Conv layers in float8_e4m3fn; returns how many."""
    count = 0
    for layer in module.modules():
        if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)) and layer.weight.dtype != FP8:
            layer.weight.data = layer.weight.data.to(FP8)
            count += 1
    return count


def allow_fp16_gradients(accelerator) -> None:
    """With --full_fp16 the network's gradients are float16, which torch's GradScaler refuses to unscale;
    kohya patches accelerate's scaler to allow them (``train_util.patch_accelerator_for_fp16_training``)."""
    scaler = getattr(accelerator, "scaler", None)
    if scaler is None:
        return
    original = scaler._unscale_grads_

    def unscale(optimizer, inv_scale, found_inf, allow_fp16):
        return original(optimizer, inv_scale, found_inf, True)

    scaler._unscale_grads_ = unscale
