"""HinaAdamW: AdamW for LoRA/LoKr with nine optional techniques, each from its paper.

The recipe, in the order it runs (DESIGN.md's pipeline):

    gradient transforms   ⊥Grad (use_orthogonal_grad), AGR (use_agr)
    moment rule           Adam, or ADOPT (use_adopt_stability); TAM damping of the momentum input (use_tam)
    update transforms     Grams (use_grams), then Cautious (use_cautious)
    learning rates        LoRA+ ratio for B-side tensors and ALLoRA row scaling (use_alora)
    apply                 decoupled weight decay, on the dynamic schedule (dynamic_weight_decay); SPD (use_spd)
    state codec           optim_bits=8: 8-bit blockwise (bitsandbytes); 32: fp32

With ``optim_bits=32`` and every technique off this is ``torch.optim.AdamW`` (tested to 1e-6 relative).
"""

from __future__ import annotations

import math

import torch

from . import naming
from .compiled import MaybeCompiled
from .base import ADAPTER_MATRIX_ROLES, ZERO_ANCHOR_ROLES, HinaOptimizer, StepContext
from . import techniques
from .techniques.adopt import adopt_normalize
from .techniques.agr import agr_
from .techniques.orthogonal import orthogonalize_


def _check_betas(betas) -> tuple[float, float]:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"Invalid betas: {betas!r} (expected a pair (beta1, beta2))")
    for i, beta in enumerate(betas):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {beta!r} (valid: 0 <= beta < 1)")
    return tuple(float(b) for b in betas)


class HinaAdamW(HinaOptimizer):
    """AdamW with SPD, Cautious, ⊥Grad, ADOPT, Grams, AGR, TAM, LoRA+/ALLoRA and dynamic weight decay.

    Args (seed names and defaults):
        lr, betas, eps, weight_decay: as torch.optim.AdamW.
        use_spd, spd_lambda: Selective Projection Decay (arXiv 2411.01713).
        use_cautious: Cautious mask (arXiv 2411.16085).
        use_orthogonal_grad: ⊥Grad (arXiv 2501.04697).
        use_adopt_stability: ADOPT moment rule (arXiv 2411.02853). Off by default, unlike the seed: a
            40-step ablation (3 seeds) found it hurt on the SD LoRA task (+1.1 % final eval loss), and the
            120-step, 5-seed run (docs/BENCHMARKS.md) found no effect either way (SD LoRA with it on:
            -0.04 %; LLM LoRA with it off: -0.18 %, 1 standard error). Off costs nothing; the LLM recipe
            (configs/llm_lora.toml) keeps it on, as the seed does.
        use_grams: Grams update direction (arXiv 2412.17107).
        use_agr: Adaptive Gradient Regularization (arXiv 2407.16944).
        use_tam, tam_beta: Torque-Aware Momentum (arXiv 2412.18790), tam_beta smooths the cosine.
        use_alora, alora_ratio: LoRA+ lr ratio for B-side tensors (arXiv 2402.12354), ALLoRA row scaling
            (arXiv 2410.09692), and no weight decay on norm deltas / DoRA magnitudes.
        dynamic_weight_decay, wd_transition_steps, wd_decay_factor, wd_min_ratio: the decay schedule.
        optim_bits: 8 (blockwise 8-bit states via bitsandbytes) or 32.
        block_size: 8-bit quantisation block. min_8bit_size: smaller tensors keep fp32 states.
        compile_step: fuse the update with torch.compile: True, False, or None (auto: large packs).
    """

    optimizer_type = "HinaAdamW"
    feature_flags = ("use_spd", "spd_lambda", "use_cautious", "use_orthogonal_grad", "use_adopt_stability",
                     "use_grams", "use_agr", "use_tam", "tam_beta", "use_alora", "alora_ratio",
                     "dynamic_weight_decay", "wd_transition_steps", "wd_decay_factor", "wd_min_ratio")

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, use_spd: bool = True, spd_lambda: float = 0.06,
                 use_cautious: bool = True, use_orthogonal_grad: bool = False, use_adopt_stability: bool = False,
                 use_grams: bool = True, use_agr: bool = True, use_tam: bool = True, tam_beta: float = 0.999,
                 use_alora: bool = True, alora_ratio: float = 16.0, dynamic_weight_decay: bool = True,
                 wd_transition_steps: int = 1000, wd_decay_factor: float = 0.7, wd_min_ratio: float = 0.1,
                 optim_bits: int = 8, block_size: int = 256, min_8bit_size: int = 1024,
                 compile_step: bool | None = None):
        betas = _check_betas(betas)
        if eps < 0.0:
            raise ValueError(f"Invalid epsilon value: {eps!r}")
        if spd_lambda < 0.0:
            raise ValueError(f"Invalid spd_lambda: {spd_lambda!r} (must be >= 0)")
        if not 0.0 <= tam_beta < 1.0:
            raise ValueError(f"Invalid tam_beta: {tam_beta!r} (valid: 0 <= tam_beta < 1)")
        if alora_ratio <= 0.0:
            raise ValueError(f"Invalid alora_ratio: {alora_ratio!r} (must be > 0)")
        if int(wd_transition_steps) < 1:
            raise ValueError(f"Invalid wd_transition_steps: {wd_transition_steps!r} (must be >= 1)")
        if not 0.0 < wd_decay_factor <= 1.0:
            raise ValueError(f"Invalid wd_decay_factor: {wd_decay_factor!r} (valid: 0 < factor <= 1)")
        if not 0.0 <= wd_min_ratio <= 1.0:
            raise ValueError(f"Invalid wd_min_ratio: {wd_min_ratio!r} (valid: 0 <= ratio <= 1)")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, use_spd=use_spd,
                        spd_lambda=spd_lambda, use_cautious=use_cautious, use_orthogonal_grad=use_orthogonal_grad,
                        use_adopt_stability=use_adopt_stability, use_grams=use_grams, use_agr=use_agr,
                        use_tam=use_tam, tam_beta=tam_beta, use_alora=use_alora, alora_ratio=alora_ratio,
                        dynamic_weight_decay=dynamic_weight_decay, wd_transition_steps=int(wd_transition_steps),
                        wd_decay_factor=wd_decay_factor, wd_min_ratio=wd_min_ratio)
        super().__init__(params, defaults, optim_bits=optim_bits, block_size=block_size,
                         min_8bit_size=min_8bit_size, compile_step=compile_step)

    # --- states ----------------------------------------------------------------------------------------
    def state_specs(self, group, roles):
        specs = [("exp_avg", True), ("exp_avg_sq", False)]
        if group["use_spd"] and any(role not in ZERO_ANCHOR_ROLES for role in roles):
            specs.append(("spd_anchor", True))
        return specs

    def vector_specs(self, group):
        return ["tam_smoothed"] if group["use_tam"] else []

    # --- LoRA-aware learning rates and decay ---------------------------------------------------------------
    def lr_multipliers(self, group, roles):
        if not group["use_alora"]:
            return [1.0] * len(roles)
        return [group["alora_ratio"] if role in naming.B_SIDE_ROLES else 1.0 for role in roles]

    def weight_decay_multipliers(self, group, roles):
        if not group["use_alora"]:
            return [1.0] * len(roles)
        return [0.0 if role in (*naming.NORM_ROLES, "dora_scale") else 1.0 for role in roles]

    def row_scaled(self, group, roles):
        return [group["use_alora"] and role in ADAPTER_MATRIX_ROLES for role in roles]

    # --- the update -----------------------------------------------------------------------------------------
    def compute_update(self, ctx: StepContext, states, vectors):
        group, pack, grad = ctx.group, ctx.pack, ctx.grad
        beta1, beta2 = group["betas"]
        exp_avg, exp_avg_sq = states["exp_avg"], states["exp_avg_sq"]
        adopt = group["use_adopt_stability"]
        uniform = len(set(ctx.steps)) == 1
        if adopt and uniform and ctx.steps[0] == 0:
            # ADOPT's first step only initialises v = g^2; there is no parameter update.
            if group["use_orthogonal_grad"]:
                orthogonalize_(grad, ctx.weight, pack)
            if group["use_agr"]:
                agr_(grad, pack)
            torch.mul(grad, grad, out=exp_avg_sq)
            return None

        if uniform:
            t = ctx.steps[0] + 1  # this step, 1-based
            clip = float(max(ctx.steps[0], 1)) ** 0.25
            bias1, bias2_sqrt = 1.0 - beta1 ** t, math.sqrt(1.0 - beta2 ** t)
        else:  # tensors at different steps (some were skipped): per-tensor values
            steps = torch.tensor(ctx.steps, dtype=torch.float64)
            clip = steps.clamp(min=1).pow(0.25).float()
            bias1 = (1.0 - beta1 ** (steps + 1)).float()
            bias2_sqrt = (1.0 - beta2 ** (steps + 1)).sqrt().float()
            clip, bias1, bias2_sqrt = (pack.segments.expand(x.to(pack.device)) for x in (clip, bias1, bias2_sqrt))
        scalars = torch.tensor([clip, bias1, bias2_sqrt], device=pack.device) if uniform else None
        update = ctx.scratch("update")
        weight = ctx.weight if group["use_orthogonal_grad"] else None
        use_compile = _direction.wanted(self.compile_step, pack.total) and uniform
        _direction(use_compile, grad, exp_avg, exp_avg_sq, vectors.get("tam_smoothed"), weight, update,
                   pack.segments, scalars if uniform else (clip, bias1, bias2_sqrt),
                   beta1=beta1, beta2=beta2, eps=group["eps"], tam_beta=group["tam_beta"],
                   orthogonal=group["use_orthogonal_grad"], agr=group["use_agr"], adopt=adopt,
                   tam=group["use_tam"], grams=group["use_grams"], cautious=group["use_cautious"])

        first = [i for i, s in enumerate(ctx.steps) if s == 0 and ctx.active[i]]
        if adopt and first:
            # Tensors seen for the first time among older ones: ADOPT's initialisation step for them.
            for i in first:
                pack.views(exp_avg_sq)[i].copy_(pack.views(grad)[i].square())
                pack.views(exp_avg)[i].zero_()
                pack.views(update)[i].zero_()
        return update


def adamw_direction(grad, exp_avg, exp_avg_sq, tam_smoothed, weight, update, segments, step_scalars, *,
                    beta1: float, beta2: float, eps: float, tam_beta: float, orthogonal: bool, agr: bool,
                    adopt: bool, tam: bool, grams: bool, cautious: bool):
    """HinaAdamW's update direction u over a pack's flat buffers; states and ``update`` written in place.

    ``step_scalars`` = (ADOPT clip t^(1/4), 1 - b1^t, sqrt(1 - b2^t)), each a 0-d tensor or a per-block
    column. Written functionally (new tensors, one write per output) so that ``torch.compile`` fuses
    the chain into a few loops; it runs eagerly as well (see compiled.py).
    """
    block = segments.block
    clip, bias1, bias2_sqrt = step_scalars[0], step_scalars[1], step_scalars[2]
    g = grad
    if orthogonal:
        g = techniques.orthogonalize(g, weight, segments)
    if agr:
        g = techniques.agr(g, segments)

    # Moment input x: the gradient (Adam) or the ADOPT-normalised gradient (arXiv 2411.02853).
    if adopt:
        x = adopt_normalize(g, exp_avg_sq, eps, clip, block)
    else:
        x = g
    if tam:
        damping = techniques.tam_damping(exp_avg, x, tam_smoothed, tam_beta, segments)
        x = (x.view(-1, block) * segments.expand(damping)).view(-1)
    m = torch.lerp(exp_avg, x, 1.0 - beta1)
    v = exp_avg_sq * beta2 + (1.0 - beta2) * g * g

    if adopt:
        u = m  # ADOPT uses the raw momentum, no bias correction; v is updated after (above, from g)
    else:
        # u = (m / (1 - b1^t)) / (sqrt(v) / sqrt(1 - b2^t) + eps), in torch.optim.AdamW's order.
        denom = v.view(-1, block).sqrt() / bias2_sqrt + eps
        u = (m.view(-1, block) / denom / bias1).view(-1)
    if grams:
        u = techniques.grams(u, g)
    if cautious:
        u = techniques.cautious(u, g, segments)
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)
    update.copy_(u)
    grad.copy_(g)  # the transformed gradient, for SPD's condition in the apply stage
    return update


_direction = MaybeCompiled(adamw_direction)
