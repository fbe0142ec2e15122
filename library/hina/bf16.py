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
compiled chunk step on them, the delayed decay, then one compiled function (``write_back``) for the compensated
write-back of the weights (``compensated_write``) and the states stochastically rounded back. The random bits of stochastic rounding are a
hash of (seed, element) with the seed from (``sr_seed``, global step, call order within the step):
reproducible, equal on every rank, and a resumed run continues to the bit.
Parameters must be bfloat16 when the step runs (they may still be float32 when the optimizer is built,
as in kohya sd-scripts with ``--full_bf16``).
"""

from __future__ import annotations

import zlib

import torch

from .adaptive import RECIPE as ADAPTIVE_RECIPE
from .adaptive import AdamW_HinaAdaptive
from .hina_adamw import ADAM
from .base import HinaOptimizer
from .compiled import MaybeCompiled
from .pack import FlatPack
from .stages import COMPILE, LR, Flag, Recipe, Stage, in_range, is_number
from .techniques import (ADOPT, AGR, CAUTIOUS, DECOUPLED_WEIGHT_DECAY, GRAMS, IMPORTANCE, LORA_PLUS, LR_MASK,
                         ORTHOGONAL_GRAD, RELATIONSHIPS, SPD, TAM, WEIGHT_DECAY_SCHEDULE)
from .techniques.stochastic_rounding import ROUND_TRIP_OPTIONS, compensated_write, store_bf16


class Bf16Codec:
    """Flat bfloat16 storage (``flat``, by state name); ``fused_step`` decodes it to float32 pool buffers and writes
    it back with stochastic rounding (``write_back``)."""

    bits = 16

    def __init__(self, pack: FlatPack):
        self.pack = pack
        self.flat: dict[str, torch.Tensor] = {}

    def create(self, name: str, signed: bool = True) -> None:
        self.flat[name] = self.pack.zeros(torch.bfloat16)

    def state_views(self, name: str) -> dict[str, list[torch.Tensor]]:
        return {name: self.pack.views(self.flat[name])}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.flat.values())


#: bf16 states rounded stochastically, and the compensated (Kahan) write-back of the new weights.
BF16_WRITE_BACK = Stage(
    "bf16 compensated write-back",
    (Flag("sr_seed", 0, "int", "seed of the stochastic-rounding random stream", lambda v: is_number(v)
          and float(v).is_integer(), "an int", int, group=False, feature=False),),
    states=lambda group, roles: [("shift", True)],  # the compensation: what rounding the weights to bf16 lost
)

#: Weight decay applied once lr * wd has accumulated to a threshold, so that it is not lost below a bf16 ulp.
DELAYED_WEIGHT_DECAY = Stage(
    "delayed weight decay",
    (Flag("delayed_wd_threshold", 1e-4, "float", "accumulated lr * wd at which weight decay is applied (0: every "
          "step)", in_range(0.0), "a number >= 0", float),),
    vectors=lambda group: ["wd_accum"],
)

#: AdamW_HinaAdaptive's recipe (adaptive.py) with bf16 states and write-back in place of the codec; weight decay is
#: delayed and applied by the write-back (seed defaults: lr=1e-4).
RECIPE = Recipe(
    "AdamWBF16_HinaAdaptive",
    (LR, ORTHOGONAL_GRAD, AGR, ADAM, ADOPT, TAM, GRAMS, CAUTIOUS, LORA_PLUS, DECOUPLED_WEIGHT_DECAY,
     WEIGHT_DECAY_SCHEDULE, SPD, IMPORTANCE, RELATIONSHIPS, LR_MASK, DELAYED_WEIGHT_DECAY, BF16_WRITE_BACK, COMPILE),
    defaults={**ADAPTIVE_RECIPE.defaults, "lr": 1e-4},
)


class AdamWBF16_HinaAdaptive(AdamW_HinaAdaptive):
    """AdamW_HinaAdaptive for bfloat16 parameters (bf16 states, stochastic rounding, compensation buffer).

    Arguments: the recipe's flags (``RECIPE`` above, ``help(AdamWBF16_HinaAdaptive.__init__)``): AdamW_HinaAdaptive's
    (seed defaults: lr=1e-4; LoRA+ off, as there) without optim_bits (states are bf16), plus delayed_wd_threshold
    and sr_seed.
    """

    optimizer_type = "AdamWBF16_HinaAdaptive"
    recipe = RECIPE

    def __init__(self, params, *args, **kwargs):
        super().__init__(params, *args, **kwargs)
        self._sr_seed = self.settings["sr_seed"]
        self._sr_calls = 0
        self._sr_step = 0

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
        return Bf16Codec(chunk)

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
        names = [name for name, _ in pack.state_specs]
        stored = [codec.flat[name] for name in names]
        states = {name: pack.buffer(f"bf16_decoded_{name}") for name in names}
        torch._foreach_copy_(list(states.values()), stored)  # decode: bf16 -> fp32, one call for all states
        before = pack.buffer("bf16_weight_before")
        before.copy_(weight)
        step_vectors = self._step_vectors(group, pack, steps, active)
        nonfinite = self._adaptive_chunk(group, pack, grad, weight, step_vectors, states)
        live = (step_vectors[5] > 0) & ~nonfinite
        seeds = torch.tensor([self._seed(name) for name in names], dtype=torch.int64, device=pack.device)
        blocks = pack.segments.blocks  # the shape compensated_write computes in: no chunk-sized temporary (1.05x)
        _write_back(self.use_compile(), blocks(weight), blocks(before), blocks(states["shift"]),
                    self._delayed_decay(group, pack, live), live, pack.segments, [blocks(s) for s in states.values()],
                    [blocks(s) for s in stored], seeds)
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


def write_back(weight, before, shift, decay, live, segments, values, stored, seeds) -> None:
    """The end of a chunk's bf16 step in one function: ``compensated_write`` of the new weights (``shift`` is the
    decoded compensation buffer, one of ``values``), then every fp32 state in ``values`` stochastically rounded into
    its bf16 storage ``stored`` with its seed (``seeds``, (n,) int64). One compiled call per chunk instead of one per
    state plus one for the weights (7 at the defaults): SD1.5 r16, 1 thread, thread CPU per step, the two interleaved
    in one process, median 165 -> 151 ms."""
    compensated_write(weight, before, shift, decay, live, segments)
    for value, out, seed in zip(values, stored, seeds.unbind(0)):
        store_bf16(value, out, seed)


#: Compiled, the rounding to bf16 survives only with ROUND_TRIP_OPTIONS: eager where this torch's inductor lacks them.
_write_back = MaybeCompiled(write_back, options=ROUND_TRIP_OPTIONS, needs_options=True)
