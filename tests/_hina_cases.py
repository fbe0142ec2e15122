"""Shared cases for the reliability tests (issue 7): every Hina optimizer, settings that switch its
mechanisms on early, and kohya-named LoRA parameters. Not collected by pytest."""

from __future__ import annotations

import torch

from library.hina import (AdamW_HinaAdaptive, AdamWBF16_HinaAdaptive, Automagic_CameAMP, Automagic_CameAMP8bit,
                          Automagic_CameAMP_COptim, Automagic_CameAMP_COptim8bit, HinaAdamW)

# Small warm-ups and intervals so every mechanism (lr masks, relationship discovery, 8-bit) runs in a few steps.
ACTIVE = {
    HinaAdamW: dict(lr=1e-2, min_8bit_size=0, compile_step=False),
    AdamW_HinaAdaptive: dict(lr=1e-2, max_lr=1e-1, warmup_steps=1, relationship_discovery_interval=2,
                             min_8bit_size=0),
    AdamWBF16_HinaAdaptive: dict(lr=1e-2, max_lr=1e-1, warmup_steps=1, relationship_discovery_interval=2),
    Automagic_CameAMP: dict(lr=1e-3, warmup_steps=1, use_tam=True, use_grams=True, use_cautious=True),
    Automagic_CameAMP8bit: dict(lr=1e-3, warmup_steps=1, blocksize=256, min_8bit_size=0),
    Automagic_CameAMP_COptim: dict(lr=1e-3, warmup_steps=1, context_window=4),
    Automagic_CameAMP_COptim8bit: dict(lr=1e-3, warmup_steps=1, context_window=4, blocksize=256, min_8bit_size=0),
}
CLASSES = list(ACTIVE)
IDS = [c.__name__ for c in CLASSES]


def dtype_of(cls) -> torch.dtype:
    return torch.bfloat16 if cls is AdamWBF16_HinaAdaptive else torch.float32


def lora_params(cls, modules=2, rank=4, dim=24, seed=0) -> list[tuple[str, torch.nn.Parameter]]:
    """kohya-named (lora_down, lora_up) pairs, plus a 4-D conv pair and a bias-like vector."""
    g = torch.Generator().manual_seed(seed)
    dtype = dtype_of(cls)
    out = []
    for m in range(modules):
        prefix = f"lora_unet_down_blocks_{m}_attentions_0_proj_in"
        out.append((f"{prefix}.lora_down.weight", torch.randn(rank, dim, generator=g) * 0.1))
        out.append((f"{prefix}.lora_up.weight", torch.randn(dim, rank, generator=g) * 0.01))
    out.append(("lora_unet_conv_in.lora_down.weight", torch.randn(rank, 4, 3, 3, generator=g) * 0.1))
    out.append(("lora_unet_conv_in.lora_up.weight", torch.randn(8, rank, 1, 1, generator=g) * 0.01))
    out.append(("lora_unet_time_embedding.alpha_like", torch.randn(16, generator=g)))
    return [(n, torch.nn.Parameter(t.to(dtype))) for n, t in out]


def make(cls, named, **overrides):
    return cls([{"params": [p for _, p in named], "named": [n for n, _ in named]}], **{**ACTIVE[cls], **overrides})


def set_grads(params, step: int, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed * 100_003 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(p.dtype)


def skipped(opt) -> int:
    return opt.get_optimization_info()["training_stats"]["skipped_updates"]


def bits(t: torch.Tensor) -> torch.Tensor:
    """A bit-exact comparable copy (NaN == NaN)."""
    t = t.detach().clone().contiguous()
    if t.is_floating_point():
        return t.reshape(-1).view(torch.uint8) if t.dim() else t.reshape(1).view(torch.uint8)
    return t


# Optimizer-wide bookkeeping that AdamW_HinaAdaptive keeps in its first tensor's state and re-derives on a
# schedule (every relationship_discovery_interval steps) from the per-tensor evidence; not per-tensor state.
GLOBAL_KEYS = ("relationships", "relationship_scores", "relationship_step")


def state_bits(opt, p) -> dict:
    return {k: (bits(v) if isinstance(v, torch.Tensor) else v) for k, v in opt.state[p].items()
            if k not in GLOBAL_KEYS}


def same_state(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, torch.Tensor):
            if not (isinstance(y, torch.Tensor) and x.shape == y.shape and torch.equal(x, y)):
                return False
        elif x != y:
            return False
    return True


def workspace_by_model_size(cls, totals=(500_000, 4_000_000), chunk_elements: int = 1 << 16) -> dict[int, int]:
    """``workspace_bytes`` after two steps of ``cls`` on LoRA-shaped params of each total size (elements),
    chunked at ``chunk_elements``: the work pool must not grow with the model."""
    workspace = {}
    for total in totals:
        g = torch.Generator().manual_seed(0)
        shapes = [(16, 320), (320, 16)] * (total // (2 * 16 * 320))
        params = [torch.nn.Parameter(torch.randn(s, generator=g) * 0.01) for s in shapes]
        opt = cls(params, lr=1e-4, compile_step=False)
        opt.chunk_elements = chunk_elements
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
        opt.step()
        workspace[total] = opt.get_optimization_info()["training_stats"]["workspace_bytes"]
    return workspace
