"""HinaAdamW: AdamW for LoRA/LoKr with nine optional techniques, each from its paper.

The recipe, in the order it runs (DESIGN.md's pipeline):

    gradient transforms   ⊥Grad (use_orthogonal_grad), AGR (use_agr)
    moment rule           Adam, or ADOPT (use_adopt_stability); TAM damping of the momentum input (use_tam)
    update transforms     Grams (use_grams), then Cautious (use_cautious)
    learning rates        LoRA+ ratio for B-side tensors and ALLoRA row scaling (use_alora)
    apply                 decoupled weight decay, on the dynamic schedule (dynamic_weight_decay); SPD (use_spd)
    state codec           optim_bits=8: 8-bit blockwise (plain torch, bitsandbytes' dynamic map); 32: fp32

Per chunk of the param group (base.py), ``fused_step`` runs all of it: the stages above and the apply in one
function, ``hina_adamw_chunk``, which decodes 8-bit states at its start and encodes them at its end (one compiled
graph per chunk). When a technique takes per-tensor sums of values computed from the states (TAM, Cautious, SPD),
the states are decoded into chunk-sized fp32 pool buffers before it (``decode_states``) and encoded after it
(``encode_states``) instead: in one graph, each such sum recomputed the decode. Each is compiled with
torch.compile when ``compile_step`` asks.

With ``optim_bits=32`` and every technique off this is ``torch.optim.AdamW`` (tested to 1e-6 relative).
"""

from __future__ import annotations

import math

import torch

from . import naming, techniques
from .base import ADAPTER_MATRIX_ROLES, HinaOptimizer, decoupled_update
from .codec import dynamic_map
from .compiled import MaybeCompiled
from .stages import CODEC, COMPILE, LR, RESIDENT_WEIGHTS, Flag, Recipe, Stage, float_tuple, in_range, tuple_of
from .state_io import load_state, store_state
from .techniques import (ADOPT, AGR, CAUTIOUS, DECOUPLED_WEIGHT_DECAY, GRAMS, LORA_PLUS, ORTHOGONAL_GRAD, SPD, TAM,
                         WEIGHT_DECAY_SCHEDULE)
from .techniques.adopt import adopt_normalize
from .techniques.alora import row_coefficients
from .techniques.tam import tam_step


#: Adam's moment rule (Kingma & Ba, arXiv 1412.6980; AdamW's decoupled decay is its own stage): m from the moment
#: input, v from g, u = m_hat / (sqrt(v_hat) + eps).
ADAM = Stage(
    "Adam",
    (Flag("betas", (0.9, 0.999), "tuple[float, float]", "(beta1, beta2) of the moments, as torch.optim.AdamW",
          tuple_of(2, "beta parameter", 0.0, 1.0), "a pair (beta1, beta2), each 0 <= beta < 1", float_tuple,
          feature=False),
     Flag("eps", 1e-8, "float", "Adam's epsilon", in_range(0.0), "a number >= 0", float, feature=False)),
    states=lambda group, roles: [("exp_avg", True), ("exp_avg_sq", False)],
)

#: HinaAdamW, in the order it runs: ⊥Grad -> AGR -> Adam | ADOPT (+ TAM on the moment input) -> Grams -> Cautious
#: -> LoRA+ / ALLoRA -> decoupled weight decay (dynamic schedule) -> SPD; states fp32 or 8-bit.
RECIPE = Recipe(
    "HinaAdamW",
    (LR, ORTHOGONAL_GRAD, AGR, ADAM, ADOPT, TAM, GRAMS, CAUTIOUS, LORA_PLUS, DECOUPLED_WEIGHT_DECAY,
     WEIGHT_DECAY_SCHEDULE, SPD, CODEC, COMPILE, RESIDENT_WEIGHTS),
    defaults={"use_grams": True},
)


class HinaAdamW(HinaOptimizer):
    """AdamW with SPD, Cautious, ⊥Grad, ADOPT, Grams, AGR, TAM, LoRA+/ALLoRA and dynamic weight decay.

    Defaults (issue 16, docs/BENCHMARKS.md): Grams, 8-bit states and the weight-decay schedule on, every other
    technique off (the seed also had SPD, Cautious, AGR, TAM and LoRA+/ALLoRA on). Each setting at its best lr
    of the same grid, paired seeds, held-out loss against bitsandbytes AdamW8bit: on a real pretrained model
    (all-MiniLM-L6-v2 + peft LoRA, 500 steps, warm-up + cosine, 5 seeds; docs/convergence_minilm_defaults.json)
    the seed's set +11.7 % (worse), Grams alone -0.2 % (no clear difference); on the tiny from-scratch tasks
    (docs/convergence_defaults.json, 3 seeds) Grams alone -0.9 % (LLM LoRA, better), -2.4 % (SD LoRA, better),
    -0.3 % (LoKr, no clear difference). Its best lr was about 3x AdamW8bit's (equal on LoKr; the top of the
    tiny tasks' grid).

    Arguments: the recipe's flags (``RECIPE`` above; each declared once beside its stage in techniques/, listed with
    its default by ``help(HinaAdamW.__init__)``). Why the techniques that are off are off:
        use_spd: no measurable effect on any task (ablations in docs/BENCHMARKS.md).
        use_cautious: after Grams it cannot act (Grams gives the update the gradient's sign).
        use_adopt_stability: unlike the seed: a 40-step ablation (3 seeds) found it hurt on the SD LoRA task
            (+1.1 % final eval loss), and the 120-step, 5-seed run (docs/BENCHMARKS.md) found no effect either way
            (SD LoRA with it on: -0.04 %; LLM LoRA with it off: -0.18 %, 1 standard error). Off costs nothing; the
            LLM recipe (configs/llm_lora.toml) keeps it on, as the seed does.
        use_agr: no measurable effect.
        use_tam: it damps the update; with the seed's set at LoRA+ ratio 1 (TAM, AGR, SPD, Cautious on) the
            pretrained task ended 4 % behind Grams alone (seed 0, each at its best lr).
        use_alora (alora_ratio): on the pretrained task every ratio measured lost to AdamW8bit (seed 0, each at its
            best lr; docs/convergence_minilm_screen.json): with the seed's other techniques ratio 16 +10.9 %, 4 +5.4 %,
            2 +3.8 %, 1 +7.1 %; with Grams only, ratio 2 +7.8 %, 4 +6.2 %, none +2.8 % (that seed). The ratio
            helps only when training from scratch (tiny tasks, docs/convergence.json).
    """

    optimizer_type = "HinaAdamW"
    recipe = RECIPE

    # --- LoRA-aware learning rates and decay ---------------------------------------------------------------
    def lr_multipliers(self, group, roles):
        if not group["use_alora"]:
            return [1.0] * len(roles)
        # kohya's LoRA+ (loraplus_*lr_ratio) already put the B side in a group with a larger lr: apply one ratio.
        ratio = 1.0 if group.get("lora_plus_from_groups") else group["alora_ratio"]
        return [ratio if role in naming.B_SIDE_ROLES else 1.0 for role in roles]

    def weight_decay_multipliers(self, group, roles):
        if not group["use_alora"]:
            return [1.0] * len(roles)
        return [0.0 if role in (*naming.NORM_ROLES, "dora_scale") else 1.0 for role in roles]

    def row_scaled(self, group, roles):
        return [group["use_alora"] and role in ADAPTER_MATRIX_ROLES for role in roles]

    # --- the update -----------------------------------------------------------------------------------------
    def _step_vectors(self, group, pack, steps, active) -> torch.Tensor:
        """Per-tensor inputs of a chunk's step, one (7, slots) tensor: lr, 1 - lr wd, 1 / (1 - b1^t),
        1 / sqrt(1 - b2^t), ADOPT's clip t^(1/4) (t: completed steps), active, first step. Computed on the host in
        Python floats (float64; the powers once per distinct step count, usually one per chunk) and copied to the
        device once per chunk; the role multipliers are cached per chunk. (List comprehensions: the earlier loop of
        appends cost ~0.1 ms per chunk, 2.8 ms of a 69 ms SD1.5 r16 step at 1 thread, cProfile.)"""
        beta1, beta2 = group["betas"]
        cached = getattr(pack, "_multipliers", None)
        if cached is None or cached[0] is not group:
            pad = [0.0] * (pack.slots - len(pack))
            cached = pack._multipliers = (group, self.lr_multipliers(group, pack.roles) + pad,
                                          self.weight_decay_multipliers(group, pack.roles) + pad)
        _, lr_mult, wd_mult = cached
        lr = float(group["lr"])
        wd = self.current_weight_decay(group)
        steps = list(steps) + [0] * (pack.slots - len(steps))
        powers = {t: (1.0 / (1.0 - beta1 ** (t + 1)), 1.0 / math.sqrt(1.0 - beta2 ** (t + 1)), max(t, 1) ** 0.25)
                  for t in set(steps)}
        first = [1.0 if t == 0 else 0.0 for t in steps]
        lrs = [m * lr for m in lr_mult]
        if group["use_adopt_stability"]:  # ADOPT's first step only initialises v: no parameter change at all
            lrs = [lr_i * (1.0 - f) for lr_i, f in zip(lrs, first)]
        rows = [lrs, [1.0 - lr_i * w * wd for lr_i, w in zip(lrs, wd_mult)],
                *([powers[t][k] for t in steps] for k in range(3)),
                [1.0 if a else 0.0 for a in active] + [0.0] * (pack.slots - len(active)), first]
        return torch.tensor(rows, dtype=torch.float32, device=pack.device)

    def fused_step(self, group, pack, grad, weight, steps, active) -> torch.Tensor:
        """One chunk: the recipe and apply, reading and writing the states where they are stored.

        8-bit states are decoded and re-encoded inside ``hina_adamw_chunk`` (one compiled graph per chunk: two
        chunk-sized pool buffers, the gathered gradient and weights), unless a technique reduces over values
        computed from the states (``reduces_over_states``): then they are decoded into fp32 pool buffers first
        and encoded after (three graphs), since inside one graph every such reduction recomputed the decode
        (measured 1.4x slower with TAM, Cautious, SPD and AGR on, the earlier defaults)."""
        beta1, beta2 = group["betas"]
        codec = pack.codec
        specs = pack.state_specs
        names = [name for name, _ in specs]
        stored = [codec.storage(name) for name in names]
        scaled = self.row_scaled(group, pack.roles)
        row_coef = None
        if any(scaled):
            row_coef = row_coefficients(weight, pack, scaled, pack.buffer("row_coef"))
        use_compile = self.use_compile()
        step_vectors = self._step_vectors(group, pack, steps, active)
        signs = tuple(signed for _, signed in specs)
        qmaps = (None,) * len(specs)
        decode_first = codec.bits == 8 and reduces_over_states(group)
        if codec.bits == 8:
            qmaps = tuple(dynamic_map(signed, pack.device) for signed in signs)
        if decode_first:
            codes, stored = stored, [pack.buffer(f"decoded_{name}") for name in names]
            _decode_states(use_compile, codes, qmaps, stored, block=codec.block_size)
        anchor = stored[2] if "spd_anchor" in names else None
        nonfinite = _fused(use_compile, grad, weight, row_coef, stored[0], stored[1], anchor,
                           pack.vectors.get("tam_smoothed"), step_vectors, pack.segments,
                           None if decode_first else qmaps, signs, beta1=beta1,
                           beta2=beta2, eps=group["eps"], tam_beta=group["tam_beta"],
                           spd_lambda=float(group["spd_lambda"]), orthogonal=group["use_orthogonal_grad"],
                           agr=group["use_agr"], adopt=group["use_adopt_stability"], tam=group["use_tam"],
                           grams=group["use_grams"], cautious=group["use_cautious"], spd=group["use_spd"])
        if decode_first:
            _encode_states(use_compile, stored, codes, qmaps, step_vectors, nonfinite, pack.segments, signs=signs)
        return nonfinite


def adamw_math(g, exp_avg, exp_avg_sq, tam_smoothed, weight, segments, inv_bias1, inv_bias2_sqrt, clip, *, beta1: float,
               beta2: float, eps: float, tam_beta: float, orthogonal: bool, agr: bool, adopt: bool, tam: bool,
               grams: bool, cautious: bool):
    """HinaAdamW's direction over a chunk's flat fp32 buffers, purely functional.

    Order (each stage's paper in its module): ⊥Grad, AGR on g; the moment input x = g (Adam) or ADOPT's
    clip(g / max(sqrt(v), eps), t^(1/4)); TAM damps x by the smoothed cosine of (m, x); m = lerp(m, x, 1 - b1);
    v from g; u = Adam's bias-corrected m / (sqrt(v) + eps) (ADOPT: u = m); Grams, then Cautious.
    ``inv_bias1`` = 1 / (1 - b1^t), ``inv_bias2_sqrt`` = 1 / sqrt(1 - b2^t) and ``clip`` are per-block columns
    (``segments.expand`` of per-tensor values).
    Returns (g, m, v, u, tam_smoothed): the transformed gradient (SPD reads it), the new states, the update.
    """
    block = segments.block
    if orthogonal:
        g = techniques.orthogonalize(g, weight, segments)
    if agr:
        g = techniques.agr(g, segments)
    x = adopt_normalize(g, exp_avg_sq, eps, clip, block) if adopt else g
    if tam:
        damping, tam_smoothed = tam_step(exp_avg, x, tam_smoothed, tam_beta, segments)
        x = (x.view(-1, block) * segments.expand(damping)).view_as(g)
    m = torch.lerp(exp_avg, x, 1.0 - beta1)
    v = exp_avg_sq * beta2 + (1.0 - beta2) * g * g
    if adopt:
        u = m  # ADOPT uses the raw momentum, no bias correction; v is updated after (above, from g)
    else:
        # u = (m / (1 - b1^t)) / (sqrt(v) / sqrt(1 - b2^t) + eps), in torch.optim.AdamW's order, with the bias
        # corrections' reciprocals (computed once per tensor on the host) multiplied in: one vector division per
        # element instead of three (measured: 0.96x the whole HinaAdamW 8-bit step, SD1.5 r16, 1 thread);
        # torch.optim.AdamW's results to a few float32 ulps (tests/test_hina_adamw.py)
        denom = v.view(-1, block).sqrt() * inv_bias2_sqrt + eps
        u = (m.view(-1, block) / denom * inv_bias1).view_as(m)
    if grams:
        u = techniques.grams(u, g)
    if cautious:
        u = techniques.cautious(u, g, segments)
    return g, m, v, u, tam_smoothed


def reduces_over_states(group) -> bool:
    """True when a technique of the group's recipe takes per-tensor sums of values computed from the states
    (TAM's cosine with m, Cautious's kept count, SPD's norms of the new weights)."""
    return bool(group["use_tam"] or group["use_cautious"] or group["use_spd"])


def hina_adamw_chunk(grad, weight, row_coef, exp_avg, exp_avg_sq, anchor, tam_smoothed, step_vectors, segments,
                     qmaps=None, signs=(True, False, True), *, spd_lambda: float, spd: bool, **flags):
    """HinaAdamW's whole step for one chunk: ``adamw_math``, ALLoRA, decoupled weight decay and SPD. Mutates the
    states, ``tam_smoothed`` and ``weight`` (which becomes the new weights) in place; ``grad`` is read only.

    The states are fp32 buffers, or 8-bit ``(codes, absmax)`` with ``qmaps`` (one dynamic map per state, in
    order; ``signs`` their signedness): those are decoded at the start and encoded at the end of this function,
    so that compiled it is one graph that reads and writes the codes (``state_io``).

    A tensor whose gradient is not finite, or whose sum of squares overflows float32 (a finite 1e20 gradient
    would make g^2 inf), counts as inactive, like one without a gradient: its states and weights stay
    exactly as they were (kept block by block, codes included). Returns that skipped set, a bool per slot.

    Compiled with 8-bit states, the graph writes the new m and v to two chunk-sized temporaries: a block's codes
    need its absmax first, so inductor computes the values, reduces them per block and reads them back. Its CPU
    outer-loop fusion with per-block local buffers (codegen/cpp.py) is what would keep them in cache; in torch
    2.13 it does not apply here (tried, session 13): the per-block absmax store is vectorised across blocks, which
    stops the fusion, and with the absmax returned instead, inductor's local-buffer check fails (KeyError) on the
    in-place codes write, which depends on the reads of the old codes without reading the temporaries. With the
    codes returned too (the caller copying them into the storage) the fusion applies and nothing faults, but the
    step measured 1.10x slower at SD1.5 r16 and 1.09x at SDXL r32 (1 thread), so the temporaries stay.
    """
    block = segments.block
    qmaps = qmaps or (None, None, None)
    grad, weight, row_coef, exp_avg, exp_avg_sq, anchor = map(segments.blocks, (grad, weight, row_coef, exp_avg,
                                                                                exp_avg_sq, anchor))
    lr, decay, inv_bias1, inv_bias2_sqrt, clip, active, first = step_vectors.unbind(0)
    finite = torch.isfinite(segments.sum(grad * grad))
    live = (active > 0) & finite
    keep = ~segments.expand(live)                      # (blocks, 1): blocks whose tensor does not step
    m, v = load_state(exp_avg, qmaps[0], block), load_state(exp_avg_sq, qmaps[1], block)
    g = torch.where(keep, 0.0, grad)
    anchor_value = None
    if anchor is not None:
        anchor_value = torch.where(segments.expand(first > 0), weight, load_state(anchor, qmaps[2], block))
    expand = segments.expand
    flags_adopt = flags["adopt"]
    g, m_new, v_new, u, smoothed = adamw_math(g, m, v, tam_smoothed, weight, segments, expand(inv_bias1, 1.0),
                                              expand(inv_bias2_sqrt, 1.0), expand(clip), **flags)
    if flags_adopt:  # a tensor's first ADOPT step: v = g^2, m stays 0, no update (lr is 0 for it)
        starting = expand(first > 0)
        v_new = torch.where(starting, g * g, v_new)
        m_new = torch.where(starting, 0.0, m_new)
        u = torch.where(starting, 0.0, u)
    if row_coef is not None:
        u = u * row_coef
    new_weight = decoupled_update(weight, u, g, anchor_value, segments, lr, decay, spd_lambda, spd=spd)
    new_values = [m_new, v_new] + ([anchor_value] if anchor is not None else [])
    for stored, value, qmap, signed in zip((exp_avg, exp_avg_sq, anchor), new_values, qmaps, signs):
        store_state(stored, value, keep, qmap, block, signed)
    if tam_smoothed is not None:
        tam_smoothed.copy_(torch.where(live, smoothed, tam_smoothed))
    weight.copy_(torch.where(keep, weight, new_weight))
    return (active > 0) & ~finite


def decode_states(codes, qmaps, out, *, block: int) -> None:
    """8-bit states ``[(codes, absmax), ...]`` decoded into the fp32 buffers ``out``."""
    for stored, qmap, buffer in zip(codes, qmaps, out):
        buffer.copy_(load_state(stored, qmap, block))


def encode_states(values, codes, qmaps, step_vectors, nonfinite, segments, *, signs: tuple) -> None:
    """fp32 ``values`` encoded into their 8-bit storage ``[(codes, absmax), ...]``; tensors that did not step
    (inactive, or skipped as non-finite) keep their codes exactly."""
    live = (step_vectors[5] > 0) & ~nonfinite
    keep = ~segments.expand(live)
    for value, stored, qmap, signed in zip(values, codes, qmaps, signs):
        store_state(stored, value, keep, qmap, segments.block, signed)


_decode_states = MaybeCompiled(decode_states)
_encode_states = MaybeCompiled(encode_states)
_fused = MaybeCompiled(hina_adamw_chunk)
