"""AdamWBF16_HinaAdaptive: AdamW_HinaAdaptive for bfloat16 parameters.

Seed document 002. On top of AdamW_HinaAdaptive (``adaptive.py``):

- bf16 states: every flat state (moments, previous gradient, lr mask, SPD anchor) is stored in bfloat16
  (``Bf16Codec``), decoded to float32 for the step's math and written back with stochastic rounding.
- every write to a bf16 state is stochastically rounded (``techniques/stochastic_rounding.py``), and the
  parameter update goes through a bf16 compensation ("shift") buffer, so updates far below a bf16 ulp
  still add up (Kahan summation; arogozhnikov/adamw_bfloat16, optimi): the params take p + shift + delta
  rounded to nearest, the shift buffer what that rounding lost.
- delayed weight decay: lr * wd is accumulated per tensor and applied as p <- p (1 - acc) once acc reaches
  ``delayed_wd_threshold`` (then acc restarts at 0). The seed names the idea, not the threshold.
- the seed's scratch buffer pool API: ``get_buffer_pool_stats()`` and ``clear_buffer_pool()`` report and release
  the optimizer's work pool (base.py: a few chunk-sized buffers by name, bounded by the chunk size).

The step runs per chunk (``fused_step``): the bf16 states decoded to fp32 pool buffers, AdamW_HinaAdaptive's
compiled chunk step on them, the delayed decay and the compensated write-back (``compensated_write``,
compiled), the states stochastically rounded back (compiled). The random bits of stochastic rounding are a
hash of (seed, element) with the seed from (``sr_seed``, global step, call order within the step):
reproducible, equal on every rank, and a resumed run continues to the bit.
Parameters must be bfloat16 when the step runs (they may still be float32 when the optimizer is built,
as in kohya sd-scripts with ``--full_bf16``).
"""

from __future__ import annotations

import zlib

import torch

from .adaptive import AdamW_HinaAdaptive
from .base import HinaOptimizer
from .compiled import MaybeCompiled
from .pack import FlatPack
from .techniques.stochastic_rounding import compensated_write, store_bf16


class Bf16Codec:
    """Flat bfloat16 storage; decode to a float32 workspace, encode with stochastic rounding."""

    bits = 16

    def __init__(self, pack: FlatPack, optimizer: "AdamWBF16_HinaAdaptive"):
        self.pack = pack
        self.optimizer = optimizer
        self.flat: dict[str, torch.Tensor] = {}

    def create(self, name: str, signed: bool = True) -> None:
        self.flat[name] = self.pack.zeros(torch.bfloat16)

    def state_views(self, name: str) -> dict[str, list[torch.Tensor]]:
        return {name: self.pack.views(self.flat[name])}

    def decode(self, name: str) -> torch.Tensor:
        out = self.pack.buffer(f"bf16_decoded_{name}")
        return out.copy_(self.flat[name])

    def encode(self, name: str, value: torch.Tensor) -> None:
        seed = torch.tensor(self.optimizer._seed(name), dtype=torch.int64, device=value.device)
        _store_bf16(self.optimizer.use_compile(), value, self.flat[name], seed)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.flat.values())


class AdamWBF16_HinaAdaptive(AdamW_HinaAdaptive):
    """AdamW_HinaAdaptive for bfloat16 parameters (bf16 states, stochastic rounding, compensation buffer).

    Args: as AdamW_HinaAdaptive (seed defaults: lr=1e-4; LoRA+ off, as there), without optim_bits (states are
    bf16), plus
        delayed_wd_threshold: accumulated lr * wd at which weight decay is applied (0: every step).
        sr_seed: seed of the stochastic-rounding random stream.
    """

    optimizer_type = "AdamWBF16_HinaAdaptive"
    feature_flags = AdamW_HinaAdaptive.feature_flags + ("delayed_wd_threshold",)

    def __init__(self, params, lr: float = 1e-4, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, use_spd: bool = True, spd_lambda: float = 0.06,
                 use_cautious: bool = True, use_orthogonal_grad: bool = False, use_adopt_stability: bool = True,
                 use_grams: bool = True, use_agr: bool = True, use_tam: bool = True, tam_beta: float = 0.999,
                 dynamic_weight_decay: bool = True, wd_transition_steps: int = 1000, wd_decay_factor: float = 0.7,
                 wd_min_ratio: float = 0.1, use_dynamic_adaptation: bool = True, adaptation_strength: float = 1.0,
                 relationship_discovery_interval: int = 100, importance_decay: float = 0.95,
                 compatibility_threshold: float = 0.3, use_lr_mask: bool = True, lr_bump: float = 3e-6,
                 min_lr: float = 1e-7, max_lr: float | None = None, warmup_steps: int = 500,
                 use_alora: bool = False, alora_ratio: float = 16.0, delayed_wd_threshold: float = 1e-4, sr_seed: int = 0,
                 compile_step: bool | None = None):
        if delayed_wd_threshold < 0.0:
            raise ValueError(f"Invalid delayed_wd_threshold: {delayed_wd_threshold!r} (must be >= 0)")
        self._sr_seed = int(sr_seed)
        self._sr_calls = 0
        self._sr_step = 0
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, use_spd=use_spd,
                         spd_lambda=spd_lambda, use_cautious=use_cautious, use_orthogonal_grad=use_orthogonal_grad,
                         use_adopt_stability=use_adopt_stability, use_grams=use_grams, use_agr=use_agr,
                         use_tam=use_tam, tam_beta=tam_beta, dynamic_weight_decay=dynamic_weight_decay,
                         wd_transition_steps=wd_transition_steps, wd_decay_factor=wd_decay_factor,
                         wd_min_ratio=wd_min_ratio, use_dynamic_adaptation=use_dynamic_adaptation,
                         adaptation_strength=adaptation_strength,
                         relationship_discovery_interval=relationship_discovery_interval,
                         importance_decay=importance_decay, compatibility_threshold=compatibility_threshold,
                         use_lr_mask=use_lr_mask, lr_bump=lr_bump, min_lr=min_lr, max_lr=max_lr,
                         warmup_steps=warmup_steps, use_alora=use_alora, alora_ratio=alora_ratio, optim_bits=32,
                         compile_step=compile_step)
        self._add_defaults({"delayed_wd_threshold": float(delayed_wd_threshold)})

    def _check_bf16(self) -> None:
        """Parameters must be bfloat16 when the step runs. Not checked at construction: kohya sd-scripts
        builds the optimizer first and casts the network to bf16 afterwards (``--full_bf16``); Module.to
        keeps the Parameter objects, so the optimizer sees the cast."""
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                if p.dtype != torch.bfloat16:
                    raise TypeError(f"{self.optimizer_type} steps bfloat16 parameters only, but group {gi} param {pi} "
                                    f"(shape {tuple(p.shape)}) is {p.dtype}. In kohya sd-scripts train with "
                                    "--mixed_precision bf16 --full_bf16 (the network is cast after the optimizer "
                                    "is built, which is fine); elsewhere call model.to(torch.bfloat16) before "
                                    "the first step, or use AdamW_HinaAdaptive for float32 parameters")

    # --- bf16 storage ------------------------------------------------------------------------------------------
    def make_codec(self, chunk, eight_bit):
        # bf16 flat states from the start: building fp32 ones first and swapping them kept the fp32 buffers alive
        # (the chunk's cached views of them), 20 B/param of the model (measured 36 vs 14 B/param at SD1.5 r16)
        return Bf16Codec(chunk, self)

    def state_specs(self, group, roles):
        return super().state_specs(group, roles) + [("shift", True)]

    def vector_specs(self, group):
        return super().vector_specs(group) + ["wd_accum"]

    def _seed(self, stream: str) -> int:
        """The stochastic-rounding seed of the next write: from (seed, step, call order, stream)."""
        self._sr_calls += 1
        return zlib.crc32(f"{self._sr_seed}:{self._sr_step}:{self._sr_calls}:{stream}".encode())

    @torch.no_grad()
    def step(self, closure=None):
        self._check_bf16()
        self._sr_step = max(g.get("global_step", 0) for g in self.param_groups)
        self._sr_calls = 0
        return super().step(closure)

    # --- the step: AdamW_HinaAdaptive's chunk step on decoded states, delayed weight decay, compensated write ---
    def current_weight_decay(self, group: dict) -> float:
        return 0.0  # applied by the compensated write-back, delayed (``_delayed_decay``)

    def fused_step(self, group, pack, grad, weight, steps, active) -> torch.Tensor:
        """One chunk: the bf16 states decoded to fp32, AdamW_HinaAdaptive's chunk step on them (without weight
        decay), the delayed weight decay and the compensated write-back (``compensated_write``), the states
        stochastically rounded back to bf16. ``weight`` holds the new weights, which the core rounds into the
        bf16 params (round to nearest: ``compensated_write`` has kept what that loses in the shift buffer)."""
        codec = pack.codec
        names = [name for name, _ in self.state_specs(group, pack.roles)]
        states = {name: codec.decode(name) for name in names}
        before = pack.buffer("bf16_weight_before")
        before.copy_(weight)
        step_vectors = self._step_vectors(group, pack, steps, active)
        nonfinite = self._adaptive_chunk(group, pack, grad, weight, step_vectors, states)
        live = (step_vectors[5] > 0) & ~nonfinite
        _compensated_write(self.use_compile(), weight, before, states["shift"], self._delayed_decay(group, pack, live),
                           live, pack.segments)
        for name in names:
            codec.encode(name, states[name])
        return nonfinite

    def _delayed_decay(self, group, pack, live: torch.Tensor) -> torch.Tensor:
        """Delayed weight decay: per tensor, lr * wd accumulates (``wd_accum``) while it steps; once it reaches
        ``delayed_wd_threshold`` it is returned (and restarts at 0), to be applied as p <- p (1 - acc). (slots,)"""
        acc = pack.vectors["wd_accum"]
        wd = HinaOptimizer.current_weight_decay(self, group)
        if not wd:
            return torch.zeros_like(acc)
        acc.add_(self._lr_vector(group, pack, pack.roles) * wd * live)
        due = acc >= group["delayed_wd_threshold"]
        decay = torch.where(due, acc, torch.zeros_like(acc))
        acc.masked_fill_(due, 0.0)
        return decay

    # --- monitoring --------------------------------------------------------------------------------------------
    def get_buffer_pool_stats(self) -> dict:
        """The step's scratch buffers (the optimizer's work pool, sized by the largest chunk), in the seed's format."""
        buffers = self._work._buffers
        details = [{"name": name, "shape": list(t.shape), "dtype": str(dtype), "device": device,
                    "bytes": t.numel() * t.element_size()} for (name, dtype, device), t in buffers.items()]
        return {"total_buffer_types": len({(d["dtype"], d["device"]) for d in details}), "buffer_details": details,
                "total_buffers": len(details), "estimated_memory_mb": sum(d["bytes"] for d in details) / 2 ** 20}

    def clear_buffer_pool(self) -> None:
        """Release the scratch buffers (the next step allocates them again)."""
        self._work.clear()


_compensated_write = MaybeCompiled(compensated_write)
_store_bf16 = MaybeCompiled(store_bf16)
