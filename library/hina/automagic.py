"""Automagic_CameAMP family: CAME with the Automagic lr mask, 8-bit states, and the C-Optim context.

Seed document 004 (and 000 for the series). The recipe, in the order it runs:

    observe            (C-Optim) sketch of the raw gradient for the context (``techniques/contextual.py``)
    gradient           ⊥Grad (use_orthogonal_grad), AGR (use_agr), FFT high-frequency suppression
                       (use_fft_suppression), SVD low-rank penalty on LoRA/LoKr matrices (use_lowrank_reg)
    moment rule        CAME normalisation and clipping (``techniques/came.py``), TAM damping of its input
                       (use_tam), then momentum: CAME's beta1 EMA, or (C-Optim) the multi-scale momentum
                       (``techniques/multiscale_momentum.py``); CAME confidence
    update transforms  Grams (use_grams), then Cautious (use_cautious)
    learning rates     Automagic lr mask relative to the group lr (use_lr_mask, ``techniques/lr_mask.py``),
                       polarity from CAME's normalised update U as in ostris' Automagic; ALLoRA row scaling
                       of LoRA/LoKr matrices (use_alora); (C-Optim) the bounded contextual multiplier
    apply              decoupled weight decay at the group lr (the reference Automagic decays with the
                       per-element lr), by the optimizer core
    state codec        fp32, or 8-bit blockwise for every large flat state (momentum buffers, lr mask):
                       ``Automagic_CameAMP8bit``, ``Automagic_CameAMP_COptim8bit`` (``block_size``, seed name ``blocksize``: 4096)

Seed defaults: lr=1e-6, min_lr=1e-7, max_lr=1e-3, lr_bump=3e-6, betas=(0.8, 0.99, 0.999),
eps=(1e-30, 1e-16, 1e-8), clip_threshold=1.0, weight_decay=5e-4, warmup_steps=500. The paper's CAME
defaults are betas=(0.9, 0.999, 0.9999), eps=(1e-30, 1e-16); the seed's are kept (they are explicit).
"""

from __future__ import annotations

import torch

from .base import ADAPTER_MATRIX_ROLES, MIN_8BIT_SIZE, HinaOptimizer, StepContext
from . import techniques
from .techniques import came, lr_mask
from .techniques import multiscale_momentum as msm
from .techniques.contextual import ContextualModule, sketch, sketch_length
from .techniques.frequency import suppress_high_frequency_
from .techniques.lowrank import add_lowrank_penalty_
from .techniques.tam import tam_step

SIDE_KEYS = ("exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_res_row", "exp_avg_res_col", "exp_avg_sq")


def _check_triple(name, values, low, high, high_open=True):
    if not isinstance(values, (tuple, list)) or len(values) != 3:
        raise ValueError(f"Invalid {name}: {values!r} (expected three values)")
    for i, v in enumerate(values):
        if not (low <= v < high if high_open else low <= v <= high):
            raise ValueError(f"Invalid {name}[{i}]: {v!r} (valid: {low} <= value < {high})")
    return tuple(float(v) for v in values)


class _AutomagicCame(HinaOptimizer):
    """Shared implementation; the public classes below fix the signature and the state codec."""

    optimizer_type = "Automagic_CameAMP"
    feature_flags = ("use_lr_mask", "lr_bump", "min_lr", "max_lr", "warmup_steps", "clip_threshold",
                     "confidence_bias_correction", "use_grams",
                     "use_cautious", "use_tam", "tam_beta", "use_orthogonal_grad", "use_agr", "use_alora",
                     "use_fft_suppression", "fft_cutoff", "fft_strength", "use_lowrank_reg", "lowrank_rank",
                     "lowrank_strength")
    contextual = False

    def _setup(self, params, *, lr, min_lr, max_lr, lr_bump, betas, eps, clip_threshold, confidence_bias_correction,
               weight_decay, warmup_steps, use_lr_mask, use_grams, use_cautious, use_tam, tam_beta, use_orthogonal_grad,
               use_agr, use_alora, use_fft_suppression, fft_cutoff, fft_strength, use_lowrank_reg, lowrank_rank,
               lowrank_strength, optim_bits, block_size=256, blocksize=None, min_8bit_size=0, compile_step=None,
               context=None):
        betas = _check_triple("betas", betas, 0.0, 1.0)
        eps = _check_triple("eps", eps, 0.0, float("inf"))
        if clip_threshold <= 0.0:
            raise ValueError(f"Invalid clip_threshold: {clip_threshold!r} (must be > 0)")
        if not isinstance(confidence_bias_correction, bool):
            raise ValueError(f"Invalid confidence_bias_correction: {confidence_bias_correction!r} (valid: True or False)")
        if use_lr_mask:
            lr_mask.validate(lr_bump, min_lr, max_lr, warmup_steps)
            if lr <= 0.0:
                raise ValueError(f"Invalid learning rate: {lr!r} (the lr mask is relative to lr, which must be > 0)")
        if not 0.0 <= tam_beta < 1.0:
            raise ValueError(f"Invalid tam_beta: {tam_beta!r} (valid: 0 <= tam_beta < 1)")
        if not 0.0 <= fft_cutoff <= 1.0:
            raise ValueError(f"Invalid fft_cutoff: {fft_cutoff!r} (valid: 0..1, fraction of the spectrum kept)")
        if not 0.0 <= fft_strength <= 1.0:
            raise ValueError(f"Invalid fft_strength: {fft_strength!r} (valid: 0..1)")
        if int(lowrank_rank) < 1:
            raise ValueError(f"Invalid lowrank_rank: {lowrank_rank!r} (must be >= 1)")
        if lowrank_strength < 0.0:
            raise ValueError(f"Invalid lowrank_strength: {lowrank_strength!r} (must be >= 0)")
        defaults = dict(lr=lr, min_lr=float(min_lr), max_lr=float(max_lr), lr_bump=float(lr_bump), betas=betas,
                        eps=eps, clip_threshold=float(clip_threshold),
                        confidence_bias_correction=confidence_bias_correction, weight_decay=weight_decay,
                        warmup_steps=int(warmup_steps), use_lr_mask=bool(use_lr_mask), use_grams=bool(use_grams),
                        use_cautious=bool(use_cautious), use_tam=bool(use_tam), tam_beta=float(tam_beta),
                        use_orthogonal_grad=bool(use_orthogonal_grad), use_agr=bool(use_agr),
                        use_alora=bool(use_alora), use_fft_suppression=bool(use_fft_suppression),
                        fft_cutoff=float(fft_cutoff), fft_strength=float(fft_strength),
                        use_lowrank_reg=bool(use_lowrank_reg), lowrank_rank=int(lowrank_rank),
                        lowrank_strength=float(lowrank_strength))
        if context is not None:
            scales = context["momentum_scales"]
            if not isinstance(scales, (list, tuple)) or not scales or any(float(s) < 1 for s in scales) \
                    or len(set(scales)) != len(scales):
                raise ValueError(f"Invalid momentum_scales: {scales!r} (distinct numbers >= 1, e.g. [1, 5, 10, 25])")
            if int(context["context_window"]) < 2:
                raise ValueError(f"Invalid context_window: {context['context_window']!r} (must be >= 2)")
            if not 0.0 < context["edge_threshold"] < 1.0:
                raise ValueError(f"Invalid edge_threshold: {context['edge_threshold']!r} (valid: 0 < t < 1)")
            if not 0.0 < context["adaptation_rate"] <= 1.0:
                raise ValueError(f"Invalid adaptation_rate: {context['adaptation_rate']!r} (valid: 0 < rate <= 1)")
            defaults["momentum_scales"] = [int(s) if float(s).is_integer() else float(s) for s in scales]
        if blocksize is not None and blocksize != block_size and block_size != 4096:
            raise ValueError(f"block_size={block_size!r} and blocksize={blocksize!r} disagree: pass one of them "
                             "(blocksize is the seed's spelling of block_size)")
        block_size = block_size if blocksize is None else blocksize
        super().__init__(params, defaults, optim_bits=optim_bits, block_size=block_size, min_8bit_size=min_8bit_size,
                         compile_step=compile_step)
        if context is not None:
            self.c_optim = ContextualModule(self, context["context_window"], context["edge_threshold"],
                                            context["adaptation_rate"], context["verbose"])
            self._sketches: dict[tuple[int, int], torch.Tensor] = {}
            self._grad_sq: list[torch.Tensor] = []
            self._pending_loss = None

    # --- states ------------------------------------------------------------------------------------------------
    def _momentum_names(self, group) -> list[str]:
        if self.contextual:
            return [msm.state_name(s) for s in group["momentum_scales"]]
        return ["exp_avg"]

    def state_specs(self, group, roles):
        specs = [(name, True) for name in self._momentum_names(group)]
        if group["use_lr_mask"]:
            specs.append(("lr_mask", True))  # |value| = lr ratio, sign = last polarity
        return specs

    def vector_specs(self, group):
        return ["tam_smoothed"] if group["use_tam"] else []

    def _side_state(self, p: torch.Tensor) -> dict:
        """CAME's factored statistics (or a 1-D tensor's full v), kept per tensor in optimizer.state."""
        state = self.state[p]
        if came.is_factored(p.shape):
            if "exp_avg_sq_row" not in state:
                state.update(came.factored_states(p.shape, p.device))
        elif "exp_avg_sq" not in state:
            state["exp_avg_sq"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
        return state

    def state_nbytes(self) -> int:
        side = sum(v.numel() * v.element_size() for s in self.state.values() for k, v in s.items()
                   if k in SIDE_KEYS and isinstance(v, torch.Tensor))
        return super().state_nbytes() + side

    def row_scaled(self, group, roles):
        return [group["use_alora"] and role in ADAPTER_MATRIX_ROLES for role in roles]

    # --- the update ----------------------------------------------------------------------------------------------
    def compute_update(self, ctx: StepContext, states, vectors):
        group, pack, grad = ctx.group, ctx.pack, ctx.grad
        beta1, beta2, beta3 = group["betas"]
        eps1, eps2, eps3 = group["eps"]
        active = [i for i, a in enumerate(ctx.active) if a]
        first = [i for i in active if ctx.steps[i] == 0]
        if self.contextual:
            self._observe(ctx)

        # gradient transforms
        if group["use_orthogonal_grad"]:
            grad.copy_(techniques.orthogonalize(grad, ctx.weight, pack.segments))
        if group["use_agr"]:
            grad.copy_(techniques.agr(grad, pack.segments))
        grads = pack.views(grad)
        if group["use_fft_suppression"]:
            for i in active:
                suppress_high_frequency_(grads[i], group["fft_cutoff"], group["fft_strength"])
        if group["use_lowrank_reg"]:
            for i in active:
                if ctx.roles[i] in ADAPTER_MATRIX_ROLES:
                    add_lowrank_penalty_(grads[i], pack.params[i].detach(), group["lowrank_rank"],
                                         group["lowrank_strength"])

        # CAME: U = G / sqrt(V_hat), clipped per tensor
        normalized = ctx.scratch("came_u")
        units = pack.views(normalized)
        sides = {}
        for i, p in enumerate(pack.params):
            if i not in sides and ctx.active[i]:
                sides[i] = self._side_state(p)
                came.normalize_(grads[i], units[i], sides[i], beta2, eps1)
            else:
                units[i].zero_()
        pack.scale_(normalized, came.clip_factor(normalized, pack, group["clip_threshold"]))

        names = self._momentum_names(group)
        if group["use_tam"]:
            damping, smoothed = tam_step(states[names[0]], normalized, vectors["tam_smoothed"], group["tam_beta"],
                                         pack.segments)
            vectors["tam_smoothed"].copy_(smoothed)
            momentum_input = torch.mul(normalized, 1.0, out=ctx.scratch("momentum_input"))
            pack.scale_(momentum_input, damping)
        else:
            momentum_input = normalized
        if self.contextual:
            momentum = msm.multiscale_update_([states[n] for n in names], momentum_input, beta1,
                                              group["momentum_scales"], ctx.scratch("momentum"))
        else:
            momentum = states["exp_avg"].mul_(beta1).add_(momentum_input, alpha=1.0 - beta1)

        # CAME confidence
        update = ctx.scratch("update")
        updates, moments = pack.views(update), pack.views(momentum)
        for i in range(len(pack.params)):
            if ctx.active[i]:
                correction = came.confidence_correction(beta3, ctx.steps[i] + 1, group["confidence_bias_correction"])
                came.confidence_(moments[i], units[i], updates[i], sides[i], beta3, eps2, eps3, correction)
            else:
                updates[i].zero_()

        if group["use_grams"]:
            update.copy_(techniques.grams(update, grad))
        if group["use_cautious"]:
            update.copy_(techniques.cautious(update, grad, pack.segments))
        if group["use_lr_mask"]:
            update.mul_(lr_mask.mask_ratio(pack, states["lr_mask"], normalized, first, group,
                                           ctx.scratch("lr_ratio")))
        if self.contextual:
            update.mul_(self.c_optim.multiplier_tensor())
        return update

    # --- C-Optim context --------------------------------------------------------------------------------------------
    def _observe(self, ctx: StepContext) -> None:
        gi = next(i for i, g in enumerate(self.param_groups) if g is ctx.group)
        pi = next(i for i, p in enumerate(self._layouts[gi].chunks) if p is ctx.pack)
        self._sketches[(gi, pi)] = sketch(ctx.grad)
        self._grad_sq.append(torch.dot(ctx.grad, ctx.grad))

    def observe_loss(self, loss) -> None:
        if self.contextual:
            self._pending_loss = loss.detach().float() if isinstance(loss, torch.Tensor) else torch.tensor(float(loss))

    @torch.no_grad()
    def step(self, closure=None):
        if not self.contextual:
            return super().step(closure)
        self._sketches, self._grad_sq = {}, []
        loss = super().step(closure)
        if self._sketches:
            parts = []
            for gi in range(len(self.param_groups)):
                layout = self._layouts.get(gi)
                for pi, pack in enumerate(layout.chunks if layout else []):
                    part = self._sketches.get((gi, pi))
                    parts.append(part if part is not None
                                 else torch.zeros(sketch_length(pack.total), device=pack.device))
            device = parts[0].device
            grad_norm = torch.stack([g.to(device) for g in self._grad_sq]).sum().sqrt()
            self.c_optim.update(torch.cat([p.to(device) for p in parts]), grad_norm, self._pending_loss)
        self._pending_loss = None
        self._sketches, self._grad_sq = {}, []
        return loss

    def get_optimization_info(self) -> dict:
        info = super().get_optimization_info()
        if self.contextual:
            info["c_optim"] = self.c_optim.summary()
        return info


_COMMON_DOC = """
    Args (seed names and defaults):
        lr: base learning rate (the lr mask and all multipliers are relative to the group's current lr).
        min_lr, max_lr, lr_bump, warmup_steps, use_lr_mask: the Automagic mask (``techniques/lr_mask.py``).
        betas: (beta1, beta2, beta3) of CAME: momentum, second moment, confidence.
        eps: (eps1, eps2, eps3): CAME's two epsilons and the confidence floor (``techniques/came.py``).
        clip_threshold: CAME's update clipping d. weight_decay: decoupled.
        confidence_bias_correction: divide CAME's confidence EMA S by (1 - b3^t) (default True; False: the
            paper's update). Without it the first ~30 steps are 2-6x the lr (``techniques/came.py``).
        use_grams, use_cautious, use_tam, tam_beta, use_orthogonal_grad, use_agr: as in HinaAdamW.
        use_alora: ALLoRA row scaling of LoRA/LoKr matrices (arXiv 2410.09692).
        use_fft_suppression, fft_cutoff, fft_strength: ``techniques/frequency.py`` (off by default).
        use_lowrank_reg, lowrank_rank, lowrank_strength: ``techniques/lowrank.py`` (off by default).
        compile_step: torch.compile the core's apply stage: True, False, or None (auto: models of 1M+ elements).
"""
_CODEC_DOC = ("        block_size: 8-bit quantisation block (seed: 4096; ``blocksize``, the seed's spelling, is "
              "accepted too).\n        min_8bit_size: smaller tensors keep fp32 states (1024: every rank-4..64 "
              "LoRA matrix is quantised, base.MIN_8BIT_SIZE).\n")


class Automagic_CameAMP(_AutomagicCame):
    __doc__ = "CAME with the Automagic lr mask (fp32 states)." + _COMMON_DOC
    optimizer_type = "Automagic_CameAMP"

    def __init__(self, params, lr: float = 1e-6, min_lr: float = 1e-7, max_lr: float = 1e-3, lr_bump: float = 3e-6,
                 betas=(0.8, 0.99, 0.999), eps=(1e-30, 1e-16, 1e-8), clip_threshold: float = 1.0,
                 confidence_bias_correction: bool = True, weight_decay: float = 5e-4, warmup_steps: int = 500,
                 use_lr_mask: bool = True,
                 use_grams: bool = False, use_cautious: bool = False, use_tam: bool = False, tam_beta: float = 0.999,
                 use_orthogonal_grad: bool = False, use_agr: bool = False, use_alora: bool = True,
                 use_fft_suppression: bool = False, fft_cutoff: float = 0.5, fft_strength: float = 0.5,
                 use_lowrank_reg: bool = False, lowrank_rank: int = 4, lowrank_strength: float = 1e-2,
                 compile_step: bool | None = None):
        self._setup(params, **_args(locals()), optim_bits=32)


class Automagic_CameAMP8bit(_AutomagicCame):
    __doc__ = ("CAME with the Automagic lr mask, 8-bit blockwise states (momentum, lr mask)." + _COMMON_DOC + _CODEC_DOC)
    optimizer_type = "Automagic_CameAMP8bit"

    def __init__(self, params, lr: float = 1e-6, min_lr: float = 1e-7, max_lr: float = 1e-3, lr_bump: float = 3e-6,
                 betas=(0.8, 0.99, 0.999), eps=(1e-30, 1e-16, 1e-8), clip_threshold: float = 1.0,
                 confidence_bias_correction: bool = True, weight_decay: float = 5e-4, warmup_steps: int = 500,
                 use_lr_mask: bool = True,
                 use_grams: bool = False, use_cautious: bool = False, use_tam: bool = False, tam_beta: float = 0.999,
                 use_orthogonal_grad: bool = False, use_agr: bool = False, use_alora: bool = True,
                 use_fft_suppression: bool = False, fft_cutoff: float = 0.5, fft_strength: float = 0.5,
                 use_lowrank_reg: bool = False, lowrank_rank: int = 4, lowrank_strength: float = 1e-2,
                 block_size: int = 4096, min_8bit_size: int = MIN_8BIT_SIZE, compile_step: bool | None = None,
                 blocksize: int | None = None):
        self._setup(params, **_args(locals()), optim_bits=8)


class Automagic_CameAMP_COptim(_AutomagicCame):
    __doc__ = ("Automagic_CameAMP with the C-Optim context (``optimizer.c_optim``) and multi-scale momentum." +
               _COMMON_DOC +
               "        context_window, edge_threshold, adaptation_rate, verbose: ``techniques/contextual.py``.\n"
               "        momentum_scales: ``techniques/multiscale_momentum.py``.\n")
    optimizer_type = "Automagic_CameAMP_COptim"
    contextual = True
    feature_flags = _AutomagicCame.feature_flags + ("momentum_scales",)

    def __init__(self, params, lr: float = 1e-6, min_lr: float = 1e-7, max_lr: float = 1e-3, lr_bump: float = 3e-6,
                 betas=(0.8, 0.99, 0.999), eps=(1e-30, 1e-16, 1e-8), clip_threshold: float = 1.0,
                 confidence_bias_correction: bool = True, weight_decay: float = 5e-4, warmup_steps: int = 500,
                 use_lr_mask: bool = True,
                 use_grams: bool = False, use_cautious: bool = False, use_tam: bool = False, tam_beta: float = 0.999,
                 use_orthogonal_grad: bool = False, use_agr: bool = False, use_alora: bool = True,
                 use_fft_suppression: bool = False, fft_cutoff: float = 0.5, fft_strength: float = 0.5,
                 use_lowrank_reg: bool = False, lowrank_rank: int = 4, lowrank_strength: float = 1e-2,
                 context_window: int = 100, edge_threshold: float = 0.95, adaptation_rate: float = 0.1,
                 momentum_scales=(1, 5, 10, 25), verbose: bool = False, compile_step: bool | None = None):
        self._setup(params, **_args(locals()), optim_bits=32,
                    context=_context(locals()))


class Automagic_CameAMP_COptim8bit(_AutomagicCame):
    __doc__ = ("Automagic_CameAMP_COptim with 8-bit blockwise states (momentum buffers, lr mask)." + _COMMON_DOC +
               "        context_window, edge_threshold, adaptation_rate, verbose: ``techniques/contextual.py``.\n"
               "        momentum_scales: ``techniques/multiscale_momentum.py``.\n" + _CODEC_DOC)
    optimizer_type = "Automagic_CameAMP_COptim8bit"
    contextual = True
    feature_flags = _AutomagicCame.feature_flags + ("momentum_scales",)

    def __init__(self, params, lr: float = 1e-6, min_lr: float = 1e-7, max_lr: float = 1e-3, lr_bump: float = 3e-6,
                 betas=(0.8, 0.99, 0.999), eps=(1e-30, 1e-16, 1e-8), clip_threshold: float = 1.0,
                 confidence_bias_correction: bool = True, weight_decay: float = 5e-4, warmup_steps: int = 500,
                 use_lr_mask: bool = True,
                 use_grams: bool = False, use_cautious: bool = False, use_tam: bool = False, tam_beta: float = 0.999,
                 use_orthogonal_grad: bool = False, use_agr: bool = False, use_alora: bool = True,
                 use_fft_suppression: bool = False, fft_cutoff: float = 0.5, fft_strength: float = 0.5,
                 use_lowrank_reg: bool = False, lowrank_rank: int = 4, lowrank_strength: float = 1e-2,
                 context_window: int = 100, edge_threshold: float = 0.95, adaptation_rate: float = 0.1,
                 momentum_scales=(1, 5, 10, 25), verbose: bool = False, block_size: int = 4096,
                 min_8bit_size: int = MIN_8BIT_SIZE, compile_step: bool | None = None, blocksize: int | None = None):
        self._setup(params, **_args(locals()), optim_bits=8, context=_context(locals()))


_CONTEXT_KEYS = ("context_window", "edge_threshold", "adaptation_rate", "momentum_scales", "verbose")


def _args(local: dict) -> dict:
    return {k: v for k, v in local.items() if k not in ("self", "params", "__class__", *_CONTEXT_KEYS)}


def _context(local: dict) -> dict:
    return {k: local[k] for k in _CONTEXT_KEYS}
