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
                       per-element lr)
    state codec        fp32, or 8-bit blockwise for every large flat state (momentum buffers, lr mask):
                       ``Automagic_CameAMP8bit``, ``Automagic_CameAMP_COptim8bit`` (``block_size``, seed name
                       ``blocksize``: 4096); CAME's factored statistics stay fp32 (O(rows + cols) per tensor)

Per chunk of the param group (base.py), ``fused_step`` runs all of it in three functions over the chunk's buffers
(each viewed (blocks, block), the one shape they compute in), each compiled with torch.compile when ``compile_step``
asks for it, with CAME's row and column statistics between them:

    prepare_chunk   which tensors step (gradient present and finite), G (⊥Grad, AGR), V = G^2 + eps1; decode
                    the 8-bit states into fp32 pool buffers
    (came.second_moment_factor: r, c from V, batched per run of one shape; V_hat into a flat buffer)
    moments_chunk   U = G / sqrt(V_hat), clipping, TAM, momentum, lr mask, CAME's residual (U - m)^2 + eps2
    (came.confidence_factor: R, C from the residual; S into the same flat buffer)
    apply_chunk     update m / sqrt(max(S, eps3)) (ALLoRA's rows folded into S: ``alora_row_scales``), Grams,
                    Cautious, lr ratio, C-Optim, weight decay, the new weights; encode the 8-bit states

The row and column means are plain reductions over batched (k, rows, cols) views of runs of equally shaped
tensors (techniques/came.py), so no stage loops over tensors in Python or scatters per element. The two
optional per-tensor transforms (FFT suppression, low-rank penalty: an FFT or SVD per tensor) run eagerly
before them when switched on.

Seed defaults: lr=1e-6, min_lr=1e-7, max_lr=1e-3, lr_bump=3e-6, betas=(0.8, 0.99, 0.999),
eps=(1e-30, 1e-16, 1e-8), clip_threshold=1.0, weight_decay=5e-4, warmup_steps=500. The paper's CAME
defaults are betas=(0.9, 0.999, 0.9999), eps=(1e-30, 1e-16); the seed's are kept (they are explicit).
"""

from __future__ import annotations

import torch

from . import techniques
from .base import ADAPTER_MATRIX_ROLES, HinaOptimizer, decoupled_update
from .codec import dynamic_map
from .compiled import MaybeCompiled
from .stages import BLOCK_SIZES, COMPILE, LR, RESIDENT_WEIGHTS, Flag, Recipe, Stage, codec_flags, is_number
from .state_io import load_state, store_state
from .techniques import (AGR, ALLORA_ROWS, CAME, CAME_MOMENTUM, CAUTIOUS, CONTEXT, DECOUPLED_WEIGHT_DECAY,
                         FFT_SUPPRESSION, GRAMS, LOWRANK_PENALTY, LR_MASK, MULTISCALE_MOMENTUM, ORTHOGONAL_GRAD, TAM)
from .techniques import alora, came, lr_mask
from .techniques import multiscale_momentum as msm
from .techniques.contextual import ContextualModule, sketch, sketch_length, sketch_signs
from .techniques.frequency import suppress_high_frequency_
from .techniques.lowrank import add_lowrank_penalty_
from .techniques.tam import tam_step


def _seed_blocksize(settings: dict) -> None:
    """``blocksize`` (the seed's spelling) stands for ``block_size`` when given."""
    blocksize, block_size = settings["blocksize"], settings["block_size"]
    if blocksize is not None and blocksize != block_size and block_size != 4096:
        raise ValueError(f"block_size={block_size!r} and blocksize={blocksize!r} disagree: pass one of them "
                         "(blocksize is the seed's spelling of block_size)")
    if blocksize is not None:
        settings["block_size"] = blocksize


#: The 8-bit classes' codec: blockwise 8-bit for every large flat state (momentum buffers, lr mask), seed block 4096.
CODEC_8BIT = Stage(
    "state codec (8-bit)",
    (*codec_flags(4096),
     Flag("blocksize", None, "int | None", "the seed's spelling of block_size",
          lambda v: v is None or (is_number(v) and v in BLOCK_SIZES), ", ".join(map(str, BLOCK_SIZES)), int,
          group=False, feature=False, label="blocksize (the seed's spelling of block_size)")),
    check=_seed_blocksize,
)

#: Seed defaults where they differ from the stages': lr=1e-6, max_lr=1e-3, weight_decay=5e-4. max_lr stays the seed's:
#: at lr 1e-3 a cap of 1e-2 changed nothing (-0.1 %), and with it lr 3e-3 was 2.8-7.1 % better than these defaults
#: at 1,500 steps (5 seeds, three tiny tasks, docs/convergence_long_max_lr*.json), but below lr 1e-3 the mask's bump
#: per step (lr_bump / lr) is large and a 10x higher cap there is not measured; the lr warning says to raise it.
SEED_DEFAULTS = {"lr": 1e-6, "max_lr": 1e-3, "weight_decay": 5e-4}


def automagic_recipe(name: str, *, contextual: bool, eight_bit: bool) -> Recipe:
    """The family's recipe, in the order it runs (module docstring): (C-Optim: observe the context) -> ⊥Grad -> AGR
    -> FFT suppression -> low-rank penalty -> CAME (+ TAM on the momentum input) -> momentum (C-Optim: multi-scale)
    -> Grams -> Cautious -> lr mask -> ALLoRA -> decoupled weight decay; states fp32 or 8-bit."""
    return Recipe(name, (
        LR, *((CONTEXT,) if contextual else ()), ORTHOGONAL_GRAD, AGR, FFT_SUPPRESSION, LOWRANK_PENALTY, CAME, TAM,
        MULTISCALE_MOMENTUM if contextual else CAME_MOMENTUM, GRAMS, CAUTIOUS, LR_MASK, ALLORA_ROWS,
        DECOUPLED_WEIGHT_DECAY, *((CODEC_8BIT,) if eight_bit else ()), COMPILE, RESIDENT_WEIGHTS,
    ), defaults=SEED_DEFAULTS, fixed={"optim_bits": 8 if eight_bit else 32})


class _AutomagicCame(HinaOptimizer):
    """Shared implementation; the public classes below set the recipe (and with it the state codec)."""

    optimizer_type = "Automagic_CameAMP"
    contextual = False

    def __init__(self, params, *args, **kwargs):
        super().__init__(params, *args, **kwargs)
        self._vectors_cache: tuple | None = None  # (inputs, tensor) of the last _step_vectors
        if self.contextual:
            settings = self.settings
            self.c_optim = ContextualModule(self, settings["context_window"], settings["edge_threshold"],
                                            settings["adaptation_rate"], settings["verbose"])
            self._sketches: dict[tuple[int, int], torch.Tensor] = {}
            self._grad_sq: list[torch.Tensor] = []
            self._stepped: list[torch.Tensor] = []
            self._pending_loss = None

    # --- states ------------------------------------------------------------------------------------------------
    def _momentum_names(self, group) -> list[str]:
        if self.contextual:
            return [msm.state_name(s) for s in group["momentum_scales"]]
        return ["exp_avg"]

    # --- CAME's statistics: one flat side vector per chunk (techniques/came.py) --------------------------------
    def _build_layout(self, group, roles):
        layout = super()._build_layout(group, roles)
        for pack in layout.chunks:
            geometry = came.side_layout(pack)
            pack.came = geometry
            pack.came_side = torch.zeros(geometry.used, device=pack.device)
            self._adopt_side(pack)
        return layout

    def _adopt_side(self, pack) -> None:
        """Per-parameter views of the chunk's side vector in ``optimizer.state`` (``exp_avg_sq_row``/``_col``,
        ``exp_avg_res_row``/``_col``; a 1-D tensor's ``exp_avg_sq``), taking over loaded or earlier values."""
        geometry, side = pack.came, pack.came_side
        for i, p in enumerate(pack.params):
            rows, cols = geometry.rows[i], geometry.cols[i]
            if came.is_factored(p.shape) and pack.numels[i]:
                views = {"exp_avg_sq_row": side.narrow(0, geometry.row_base[i], rows),
                         "exp_avg_res_row": side.narrow(0, geometry.res_base[i], rows),
                         "exp_avg_sq_col": side.narrow(0, geometry.col_base[i], cols),
                         "exp_avg_res_col": side.narrow(0, geometry.res_col_base[i], cols)}
            else:
                views = {"exp_avg_sq": side.narrow(0, geometry.row_base[i], rows).view(p.shape)}
            state = self.state[p]
            for key, view in views.items():
                if key in state and state[key] is not view:
                    view.copy_(state[key].reshape(view.shape))
                state[key] = view

    def state_nbytes(self) -> int:
        side = sum(pack.came_side.numel() * 4 for layout in self._layouts.values() for pack in layout.chunks)
        return super().state_nbytes() + side

    def row_scaled(self, group, roles):
        return [group["use_alora"] and role in ADAPTER_MATRIX_ROLES for role in roles]

    # --- the update ----------------------------------------------------------------------------------------------
    def _step_vectors(self, group, pack, steps, active) -> torch.Tensor:
        """Per-tensor inputs of a chunk's step, one (10, slots) tensor: lr, 1 - lr wd, the confidence correction
        1 / (1 - b3^t), active, first step, and the lr mask's adapt flag, bump, min, max and start ratios (the
        same for every tensor). Built on the host in float64 and copied to the device once per distinct set of inputs:
        the chunks of a step mostly share one, and share the tensor (its consumers only read it)."""
        beta3 = group["betas"][2]
        lr = group["lr"]
        lr = float(lr) if isinstance(lr, torch.Tensor) else lr
        wd = self.current_weight_decay(group)
        correct = group["confidence_bias_correction"]
        mask = lr_mask.step_constants(group) if group["use_lr_mask"] else (0.0, 0.0, 1.0, 1.0, 1.0)
        # the chunks of a step mostly share every input (steps, active, slots): one build serves them all
        key = (lr, wd, beta3, correct, mask, tuple(steps), tuple(active), len(pack), pack.slots, pack.device)
        if self._vectors_cache is not None and self._vectors_cache[0] == key:
            return self._vectors_cache[1]
        spare = [0.0] * (pack.slots - len(pack))
        rows = [[lr] * len(pack) + spare, [1.0 - lr * wd] * len(pack) + spare,
                [came.confidence_correction(beta3, s + 1, correct) for s in steps] + spare,
                [float(a) for a in active] + spare, [float(s == 0) for s in steps] + spare]
        rows += [[value] * pack.slots for value in mask]
        vectors = torch.tensor(rows, dtype=torch.float64).float().to(pack.device)
        self._vectors_cache = (key, vectors)
        return vectors

    def fused_step(self, group, pack, grad, weight, steps, active) -> torch.Tensor:
        """One chunk: the three stages (module docstring), with CAME's row and column statistics between them
        (batched per run of one shape, techniques/came.py)."""
        compile_step = self.use_compile()
        codec = pack.codec
        names = self._momentum_names(group) + (["lr_mask"] if group["use_lr_mask"] else [])
        stored = [codec.storage(name) for name in names]
        eight_bit = codec.bits == 8
        qmap = dynamic_map(True, pack.device) if eight_bit else None
        # 8-bit states are decoded into pool buffers by stage 1 and encoded back by stage 3, so that the math
        # between reads plain fp32 (inside one graph each reduction would recompute the decode)
        states = [pack.buffer(f"decoded_{name}") for name in names] if eight_bit else stored
        codes = stored if eight_bit else []
        scaled = self.row_scaled(group, pack.roles)
        row_scales = alora_row_scales(pack, weight, scaled) if any(scaled) else None
        transformed = None
        if group["use_fft_suppression"] or group["use_lowrank_reg"]:
            transformed = self._transform_per_tensor(group, pack, grad, weight, active)
        geometry, segments = pack.came, pack.segments
        vectors = self._step_vectors(group, pack, steps, active)
        signs = sketch_signs(pack.total, pack.device) if self.contextual else None
        beta1, beta2, beta3 = group["betas"]
        eps1, eps2, eps3 = group["eps"]
        scales = tuple(group["momentum_scales"]) if self.contextual else (1,)
        factor, scratch = pack.buffer("came_factor"), pack.buffer("came_scratch")
        # The compiled stages get every chunk buffer as (blocks, block) (``Segments.blocks``), the shape they compute
        # in: a flat buffer written in place made inductor compute its new value into a chunk-sized temporary and
        # copy it over in a flat loop (inputs are written back in their own shape)
        blocks = segments.blocks
        grad_b, weight_b, factor_b, scratch_b, transformed = map(blocks, (grad, weight, factor, scratch, transformed))
        states_b, codes = [blocks(s) for s in states], [blocks(c) for c in codes]
        live, nonfinite, observed = _prepare(
            compile_step, grad_b, transformed, weight_b, vectors, segments, signs, codes, qmap,
            states_b if eight_bit else [], scratch_b, eps1=eps1,
            orthogonal=group["use_orthogonal_grad"] and transformed is None,
            agr=group["use_agr"] and transformed is None)
        means = pack.pool.get("came_means", geometry.used, torch.float32, pack.device)
        entries = came.live_entries(geometry, live)
        came.second_moment_factor(scratch, factor, pack.came_side, means, geometry, entries, beta2)
        moments, mask = (states_b[:-1], states_b[-1]) if group["use_lr_mask"] else (states_b, None)
        _moments(compile_step, grad_b, factor_b, geometry.block_valid, live, moments, mask,
                 pack.vectors.get("tam_smoothed"), vectors, segments, scratch_b, beta1=beta1, eps2=eps2,
                 clip_threshold=group["clip_threshold"], tam_beta=group["tam_beta"], scales=scales,
                 tam=group["use_tam"])
        came.confidence_factor(scratch, factor, pack.came_side, means, geometry, entries, vectors[2], beta3,
                               row_scales)
        multiplier = self.c_optim.multiplier_tensor() if self.contextual else None
        _apply(compile_step, grad_b, factor_b, moments, mask, weight_b, geometry.block_valid, live,
               geometry.factored, vectors, segments, multiplier, codes, qmap, states_b if eight_bit else [],
               scales=scales, eps3=eps3, grams=group["use_grams"], cautious=group["use_cautious"])
        if self.contextual:
            self._observe(group, pack, *observed)
        return nonfinite

    def _transform_per_tensor(self, group, pack, grad, weight, active) -> torch.Tensor:
        """⊥Grad and AGR, then the per-tensor FFT suppression and low-rank penalty (options, off by default:
        an FFT or an SVD per tensor, eager), on a copy of the gradient in the work pool."""
        g = pack.buffer("grad_transformed")
        g.copy_(grad)
        if group["use_orthogonal_grad"]:
            g.copy_(techniques.orthogonalize(g, weight, pack.segments))
        if group["use_agr"]:
            g.copy_(techniques.agr(g, pack.segments))
        grads = pack.views(g)
        for i, is_active in enumerate(active):
            if not is_active:
                continue
            if group["use_fft_suppression"]:
                suppress_high_frequency_(grads[i], group["fft_cutoff"], group["fft_strength"])
            if group["use_lowrank_reg"] and pack.roles[i] in ADAPTER_MATRIX_ROLES:
                add_lowrank_penalty_(grads[i], pack.params[i].detach(), group["lowrank_rank"], group["lowrank_strength"])
        return g

    # --- C-Optim context --------------------------------------------------------------------------------------------
    def _observe(self, group, pack, chunk_sketch, grad_sq, stepped) -> None:
        gi = next(i for i, g in enumerate(self.param_groups) if g is group)
        pi = next(i for i, p in enumerate(self._layouts[gi].chunks) if p is pack)
        self._sketches[(gi, pi)] = chunk_sketch
        self._grad_sq.append(grad_sq)
        self._stepped.append(stepped)

    def observe_loss(self, loss) -> None:
        if self.contextual:
            self._pending_loss = loss.detach().float() if isinstance(loss, torch.Tensor) else torch.tensor(float(loss))

    @torch.no_grad()
    def step(self, closure=None):
        if not self.contextual:
            return super().step(closure)
        self._sketches, self._grad_sq, self._stepped = {}, [], []
        loss = super().step(closure)
        # one host sync per step: a step in which every gradient was skipped leaves the context as it was
        if self._sketches and bool(torch.stack([n.to(self._stepped[0].device) for n in self._stepped]).sum() > 0):
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
        self._sketches, self._grad_sq, self._stepped = {}, [], []
        return loss

    def get_optimization_info(self) -> dict:
        info = super().get_optimization_info()
        if self.contextual:
            info["c_optim"] = self.c_optim.summary()
        return info


def alora_row_scales(pack, weight, scaled: list[bool]) -> list[torch.Tensor | None]:
    """ALLoRA's rows as CAME's confidence takes them: per run of one shape, 1 + ||w_row||^2 (one over the square
    of ALLoRA's coefficient) of each row, (count, rows), 1 for the run's tensors it does not scale; None for a
    run with none (or 1-D: their update is m, not scaled). ``came.confidence_factor`` multiplies S by it, so that
    update = m / sqrt(max(S (1 + ||w_row||^2), eps3)) is ALLoRA's m c / sqrt(S), c = 1 / sqrt(1 + ||w_row||^2),
    with eps3 capping the whole multiplier c / sqrt(S): no chunk-sized coefficient buffer written and read back.
    Measured (SDXL r32, Automagic_CameAMP, 2 threads): the coefficient buffer took 5.9 % of the step."""
    scales = []
    for run, rows in zip(pack.came.runs, pack.came.data_views(weight)):
        chosen = scaled[run.slot:run.slot + run.count]
        if not run.factored or not any(chosen):
            scales.append(None)
            continue
        scale = alora.inverse_square_coefficient(rows)
        if not all(chosen):
            scale = torch.where(torch.tensor(chosen, device=scale.device).unsqueeze(1), scale, 1.0)
        scales.append(scale)
    return scales


def prepare_chunk(grad, transformed, weight, step_vectors, segments, signs, codes, qmap, decoded, square_out, *,
                  eps1: float, orthogonal: bool, agr: bool):
    """Stage 1 of the Automagic step of one chunk: which tensors step, and their gradient G.

    A tensor steps when it has a gradient and that gradient (and its sum of squares) is finite; the others are
    skipped like tensors without a gradient (their states and weights stay exactly as they were). Writes G
    (zero for skipped tensors; ``transformed``, when given, is the gradient after the per-tensor transforms;
    then ⊥Grad and AGR) into ``grad`` in place and CAME's V = G^2 + eps1 into ``square_out``; decodes the 8-bit
    states ``codes`` ((codes, absmax) each) into the fp32 buffers ``decoded``. Returns (live, skipped as
    non-finite, each (slots,) bool; and for C-Optim (sketch, sum g^2) of the raw gradient and the number of
    tensors that step, or None).
    """
    block = segments.block
    active = step_vectors[3]
    squares = segments.sum(grad * grad)
    finite = torch.isfinite(squares)
    live = (active > 0) & finite
    keep = ~segments.expand(live)
    raw = torch.where(keep, 0.0, grad)
    g = raw if transformed is None else torch.where(keep, 0.0, transformed)
    if orthogonal:
        g = techniques.orthogonalize(g, weight, segments)
    if agr:
        g = techniques.agr(g, segments)
    observed = None
    if signs is not None:
        observed = (sketch(raw, signs), torch.where(live, squares, 0.0).sum(), live.sum())
    square_out.copy_(g * g + eps1)  # before g overwrites the gradient it is computed from
    grad.copy_(g)
    for stored, out in zip(codes, decoded):
        out.copy_(load_state(stored, qmap, block))
    return live, (active > 0) & ~finite, observed


def _valid(block_valid: torch.Tensor, block: int) -> torch.Tensor:
    """(blocks, block) bool: real elements, not the padding after a tensor's last element."""
    return torch.arange(block, dtype=torch.int32, device=block_valid.device) < block_valid.unsqueeze(1)


def moments_chunk(g, factor, block_valid, live, moments, mask, tam_smoothed, step_vectors, segments, res_out, *,
                  beta1: float, eps2: float, clip_threshold: float, tam_beta: float, scales: tuple, tam: bool):
    """Stage 2: U = G / sqrt(V_hat) clipped to RMS <= d per tensor (``factor``: V_hat from
    ``came.second_moment_factor``), TAM, the momentum (multi-scale for C-Optim), the lr mask's ratio from U's
    polarity. Mutates in place: the fp32 momentum buffers ``moments`` and signed lr ``mask`` (a tensor that does
    not step keeps its values), ``tam_smoothed``; writes CAME's residual (U - m)^2 + eps2 into ``res_out``."""
    block = segments.block
    expand = segments.expand
    lr, decay, correction, active, first, adapt, bump, min_ratio, max_ratio, start = step_vectors.unbind(0)
    live_blocks = expand(live)
    keep = ~live_blocks
    u = torch.where(_valid(block_valid, block) & live_blocks, g * factor.rsqrt(), 0.0)
    rms = (segments.sum(u * u) / segments.numel_tensor).sqrt()
    u = u * expand((rms / clip_threshold).clamp_min(1.0).reciprocal())

    old = list(moments)
    x = u
    smoothed = None
    if tam:
        damping, smoothed = tam_step(old[0], u, tam_smoothed, tam_beta, segments)
        x = u * expand(damping)
    if len(old) == 1:
        new = [old[0] * beta1 + x * (1.0 - beta1)]
    else:  # C-Optim's multi-scale momentum
        new = [torch.lerp(m, x, 1.0 - b) for m, b in zip(old, msm.scale_betas(beta1, scales))]
    res_out.copy_((u - _momentum(new, scales)).square() + eps2)
    if mask is not None:
        _, mask_new = lr_mask.mask_step(mask, u, expand(first), expand(adapt), expand(bump), expand(min_ratio),
                                        expand(max_ratio), expand(start))
        store_state(mask, mask_new, keep, None, block)
    for stored, value in zip(moments, new):
        store_state(stored, value, keep, None, block)
    if tam:
        tam_smoothed.copy_(torch.where(live, smoothed, tam_smoothed))


def _momentum(moments, scales: tuple):
    """The momentum m: the one EMA, or C-Optim's weighted sum of its scales."""
    if len(moments) == 1:
        return moments[0]
    weights = msm.scale_weights(scales)
    momentum = moments[0] * weights[0]
    for m, w in zip(moments[1:], weights[1:]):
        momentum = momentum + m * w
    return momentum


def apply_chunk(g, factor, moments, mask, weight, block_valid, live, factored, step_vectors, segments,
                multiplier, codes, qmap, decoded, *, scales: tuple, eps3: float, grams: bool, cautious: bool):
    """Stage 3: CAME's confidence-scaled update m / sqrt(max(S, eps3)) (``moments``: this step's, ``factor``: S
    from ``came.confidence_factor``, with ALLoRA's rows folded in; m for 1-D tensors), Grams, Cautious, the lr
    mask's ratio (|mask|), the C-Optim multiplier, decoupled weight decay at the group lr (the ratio is positive,
    so applied to m it commutes with Grams' and Cautious' sign rules); ``weight``
    becomes the new weights where a tensor steps. Encodes the fp32 states ``decoded`` back into their 8-bit
    ``codes`` (a tensor that did not step keeps its codes exactly)."""
    block = segments.block
    expand = segments.expand
    lr, decay = step_vectors[0], step_vectors[1]
    live_blocks = expand(live)
    m = _momentum(moments, scales)
    if mask is not None:
        m = m * mask.abs()
    approx = factor
    if eps3 > 0.0:
        approx = approx.clamp_min(eps3)
    update = torch.where(expand(factored) > 0, m * approx.rsqrt(), m)
    update = torch.where(_valid(block_valid, block) & live_blocks, update, 0.0)
    if grams:
        update = techniques.grams(update, g)
    if cautious:
        update = techniques.cautious(update, g, segments)
    if multiplier is not None:
        update = update * multiplier
    new_weight = decoupled_update(weight, update, g, None, segments, lr, decay, 0.0, spd=False)
    weight.copy_(torch.where(live_blocks, new_weight, weight))
    for stored, value in zip(codes, decoded):
        store_state(stored, value, ~live_blocks, qmap, block)


#: With the buffers in one shape (fused_step) the stages' graphs keep no chunk-sized temporary, provided inductor
#: recomputes U (read by the RMS reduction and by every later value) instead of storing it
#: (``realize_reads_threshold``, as adaptive.py's graph). Before (flat buffers, default threshold), moments_chunk
#: wrote U and the lr mask's new ratio to two temporaries and prepare_chunk V; bit-identical results. Measured,
#: 1 thread, thread CPU per step, fresh processes (two each): SD1.5 r16 Automagic_CameAMP 79-80 -> 63 ms,
#: Automagic_CameAMP8bit 108-112 -> 97-98, Automagic_CameAMP_COptim8bit 190-192 -> 174-175; SDXL r32
#: Automagic_CameAMP 840-921 -> 646-654 ms (2.8K-73K -> 0-7 page faults per step).
_prepare = MaybeCompiled(prepare_chunk)
_moments = MaybeCompiled(moments_chunk, options={"realize_reads_threshold": 64})
_apply = MaybeCompiled(apply_chunk)


_ARGS_DOC = """
    Arguments: the recipe's flags (``automagic_recipe``; each documented beside its stage in techniques/, listed by
    ``help(<class>.__init__)``), with the seed's defaults (module docstring). All lrs (the mask's and every
    multiplier) are relative to the group's current lr, so schedulers work.
"""


class Automagic_CameAMP(_AutomagicCame):
    __doc__ = "CAME with the Automagic lr mask (fp32 states)." + _ARGS_DOC
    optimizer_type = "Automagic_CameAMP"
    recipe = automagic_recipe(optimizer_type, contextual=False, eight_bit=False)


class Automagic_CameAMP8bit(_AutomagicCame):
    __doc__ = "CAME with the Automagic lr mask, 8-bit blockwise states (momentum, lr mask)." + _ARGS_DOC
    optimizer_type = "Automagic_CameAMP8bit"
    recipe = automagic_recipe(optimizer_type, contextual=False, eight_bit=True)


class Automagic_CameAMP_COptim(_AutomagicCame):
    __doc__ = ("Automagic_CameAMP with the C-Optim context (``optimizer.c_optim``) and multi-scale momentum." +
               _ARGS_DOC)
    optimizer_type = "Automagic_CameAMP_COptim"
    contextual = True
    recipe = automagic_recipe(optimizer_type, contextual=True, eight_bit=False)


class Automagic_CameAMP_COptim8bit(_AutomagicCame):
    __doc__ = "Automagic_CameAMP_COptim with 8-bit blockwise states (momentum buffers, lr mask)." + _ARGS_DOC
    optimizer_type = "Automagic_CameAMP_COptim8bit"
    contextual = True
    recipe = automagic_recipe(optimizer_type, contextual=True, eight_bit=True)
