"""AdamW_HinaAdaptive: HinaAdamW with per-tensor importance, relationship discovery and the Automagic lr mask.

The recipe (DESIGN.md's pipeline), on top of HinaAdamW's (``hina_adamw.py``):

    observe            s = <p, g> into a ring (relationship evidence), cos(g_t, g_{t-1}) (importance)
    lr mask            Automagic per-element mask, relative to the group lr (``techniques/lr_mask.py``)
    gradient / moment / update transforms: as HinaAdamW (⊥Grad, AGR, Adam or ADOPT, TAM, Grams, Cautious)
    importance         per-tensor EMA score -> bounded lr multiplier (``techniques/importance.py``)
    relationships      every ``relationship_discovery_interval`` steps, LoRA-like pairs are found from shapes
                       and the rescaling balance (``techniques/relationships.py``); a pair shares the joint
                       importance sqrt(I_a I_b), so both factors move at one rate
    apply              decoupled weight decay (dynamic schedule), SPD, as HinaAdamW

Per chunk of the param group (base.py), ``fused_step`` runs the stages above and apply in one function,
``adaptive_chunk``, compiled with torch.compile when ``compile_step`` asks for it; 8-bit states are decoded into
fp32 pool buffers before it and encoded after it (HinaAdamW's ``decode_states``/``encode_states``);
the tests compare it with a plain per-tensor reference (tests/_reference.py).

HinaAdamW's LoRA+ ratio and ALLoRA row scaling (``use_alora``, roles from names or shapes) apply here too, on
by default: without them this optimizer trailed plain AdamW on the benchmark tasks (``benchmarks/convergence.py``,
docs/BENCHMARKS.md), with them it matches HinaAdamW. Relationship discovery works without names and sets the
pairs' shared importance; the LoRA+ ratio multiplies on top. All multipliers scale the update, i.e. multiply
the group's current ``lr``, so schedulers keep working; weight decay uses the group lr.

Seed: document 002 (AdamWBF16_HinaAdaptive, whose adaptive part this is) names the parameters and the
monitoring API; it gives no formulas, so the ones used are defined and cited in the technique modules.
"""

from __future__ import annotations

import torch

from .base import decoupled_update
from .codec import dynamic_map
from .compiled import MaybeCompiled
from .hina_adamw import ADAM, HinaAdamW, adamw_math, decode_states, encode_states
from .stages import CODEC, COMPILE, LR, RESIDENT_WEIGHTS, Recipe
from .state_io import store_state
from .techniques import importance as imp
from .techniques import lr_mask
from .techniques.alora import row_coefficients
from .techniques import (ADOPT, AGR, CAUTIOUS, DECOUPLED_WEIGHT_DECAY, GRAMS, IMPORTANCE, LORA_PLUS, LR_MASK,
                         ORTHOGONAL_GRAD, RELATIONSHIPS, SPD, TAM, WEIGHT_DECAY_SCHEDULE)
from .techniques.relationships import BALANCE_KEYS, BALANCE_WINDOW, discover_pairs


#: HinaAdamW's recipe (hina_adamw.py) with the adaptive stages around it: the observations (<p, g>, the successive
#: gradient cosine) and the lr mask read the raw gradient before ⊥Grad; importance scales the update after Cautious.
RECIPE = Recipe(
    "AdamW_HinaAdaptive",
    (LR, ORTHOGONAL_GRAD, AGR, ADAM, ADOPT, TAM, GRAMS, CAUTIOUS, LORA_PLUS, DECOUPLED_WEIGHT_DECAY,
     WEIGHT_DECAY_SCHEDULE, SPD, IMPORTANCE, RELATIONSHIPS, LR_MASK, CODEC, COMPILE, RESIDENT_WEIGHTS),
    defaults={"use_spd": True, "use_cautious": True, "use_adopt_stability": True, "use_grams": True, "use_agr": True,
              "use_tam": True},
)


class AdamW_HinaAdaptive(HinaAdamW):
    """HinaAdamW + dynamic importance, relationship discovery and an Automagic lr mask.

    Arguments: the recipe's flags (``RECIPE`` above; each documented beside its stage, listed by
    ``help(AdamW_HinaAdaptive.__init__)``). Choices behind the defaults:
        the lr mask's lr_bump/min_lr/max_lr are absolute at the group's base lr and scale with a scheduler;
            max_lr=None (default) lets the mask reach 10x the base lr (an absolute max_lr below lr caps it).
        use_alora: off by default (issue 16): on pretrained all-MiniLM-L6-v2 the LoRA+ ratio 16 ended 3.7 %
            (SE 1.6 %) above off, worse on every one of 5 paired seeds (docs/convergence_minilm_adaptive.json).
        lr: like HinaAdamW, give it about 3x AdamW8bit's lr for a long run. At 1,500 steps with warm-up + cosine
            (the tiny tasks, 5 paired seeds) its best 120-step lr, 3e-3, left it 6.5-8.5 % behind AdamW8bit
            (docs/convergence_long.json); at 1e-2 it was +1.2 % (SD LoRA), +3.3 % (LoKr), +0.5 % (LLM LoRA, no
            clear difference) (docs/convergence_long_adaptive_1e-2.json).

    The importance score's relative terms compare a tensor with the tensors stepped together with it, i.e.
    the tensors of its chunk (base.py: up to 2^20 elements), not the whole param group: the step stays
    bounded in memory, and the comparison set is the same from step to step.
    """

    optimizer_type = "AdamW_HinaAdaptive"
    recipe = RECIPE

    def __init__(self, params, *args, **kwargs):
        super().__init__(params, *args, **kwargs)
        self._partner_cache: tuple | None = None

    # --- the update ------------------------------------------------------------------------------------------
    def fused_step(self, group, pack, grad, weight, steps, active) -> torch.Tensor:
        """One chunk: the recipe (module docstring) and apply in one (optionally compiled) function,
        ``adaptive_chunk``, on fp32 states (8-bit ones decoded into pool buffers before it and encoded after, each
        one compiled function). The tests compare it with a plain per-tensor reference (tests/_reference.py)."""
        codec = pack.codec
        names = [name for name, _ in pack.state_specs]
        states = {name: codec.storage(name) for name in names}
        use_compile = self.use_compile()
        if codec.bits == 8:
            # 8-bit: decode into fp32 pool buffers, run the recipe on them, encode after. Decoded inside the recipe's
            # graph, every per-tensor reduction (cosines, importance, norms) would recompute the decode.
            signs = tuple(signed for _, signed in pack.state_specs)
            qmaps = [dynamic_map(signed, pack.device) for signed in signs]
            codes = [states[name] for name in names]
            states = {name: pack.buffer(f"decoded_{name}") for name in names}
            _decode_states(use_compile, codes, qmaps, list(states.values()), block=codec.block_size)
        step_vectors = self._step_vectors(group, pack, steps, active)
        nonfinite = self._adaptive_chunk(group, pack, grad, weight, step_vectors, states)
        if codec.bits == 8:
            _encode_states(use_compile, list(states.values()), codes, qmaps, step_vectors, nonfinite, pack.segments,
                           signs=signs)
        return nonfinite

    def _adaptive_chunk(self, group, pack, grad, weight, step_vectors, states: dict) -> torch.Tensor:
        """``adaptive_chunk`` on one chunk whose states are the fp32 buffers ``states`` (by name)."""
        scaled = self.row_scaled(group, pack.roles)
        row_coef = row_coefficients(weight, pack, scaled, pack.buffer("row_coef")) if any(scaled) else None
        adaptive = group["use_dynamic_adaptation"]
        vectors = pack.vectors
        balance = vectors[BALANCE_KEYS[group["global_step"] % BALANCE_WINDOW]] if adaptive else None
        partner_index = partner_value = None
        if adaptive and group["adaptation_strength"] > 0.0:
            partner_index, partner_value = self._partner_vectors(pack)
        mask_vector = torch.tensor(lr_mask.step_constants(group) if group["use_lr_mask"] else (0.0,) * 5,
                                   dtype=torch.float32, device=pack.device)
        return _fused(self.use_compile(), grad, weight, row_coef, states["exp_avg"], states["exp_avg_sq"],
                      states.get("spd_anchor"), states.get("prev_grad"), states.get("lr_mask"),
                      vectors.get("tam_smoothed"), vectors.get("importance"), balance, partner_index, partner_value,
                      step_vectors, mask_vector, pack.segments, beta1=group["betas"][0],
                      beta2=group["betas"][1], eps=group["eps"], tam_beta=group["tam_beta"],
                      spd_lambda=float(group["spd_lambda"]), importance_decay=group["importance_decay"],
                      strength=group["adaptation_strength"], orthogonal=group["use_orthogonal_grad"],
                      agr=group["use_agr"], adopt=group["use_adopt_stability"], tam=group["use_tam"],
                      grams=group["use_grams"], cautious=group["use_cautious"], spd=group["use_spd"])

    def _partner_vectors(self, pack) -> tuple[torch.Tensor, torch.Tensor]:
        """Each tensor's discovered partner (``techniques/relationships.py``): its slot in this chunk (-1: none
        here) and, for a partner in another chunk, its current importance (NaN: no partner). (slots,) each."""
        partners = self._partners()
        index = [-1] * pack.slots
        external = []
        slot_of = {id(p): i for i, p in enumerate(pack.params)}
        for i, p in enumerate(pack.params):
            partner = partners.get(id(p))
            if partner is not None and id(partner) in slot_of:
                index[i] = slot_of[id(partner)]
            elif partner is not None and "importance" in self.state.get(partner, {}):
                external.append((i, self.state[partner]["importance"]))
        value = torch.full((pack.slots,), float("nan"), device=pack.device)
        if external:
            value[torch.tensor([i for i, _ in external], device=pack.device)] = torch.stack([v for _, v in external])
        return torch.tensor(index, dtype=torch.int64, device=pack.device), value

    # --- relationships -------------------------------------------------------------------------------------
    def _all_params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _anchor_state(self) -> dict:
        return self.state[self.param_groups[0]["params"][0]]

    def _partners(self) -> dict[int, torch.Tensor]:
        """id(param) -> partner param, from the stored relationship tensor (cached per tensor object)."""
        rel = self._anchor_state().get("relationships")
        if rel is None:
            return {}
        if self._partner_cache is None or self._partner_cache[0] is not rel:
            params = self._all_params()
            mapping = {}
            for a, b in rel.tolist():
                mapping[id(params[a])], mapping[id(params[b])] = params[b], params[a]
            self._partner_cache = (rel, mapping)
        return self._partner_cache[1]

    @torch.no_grad()
    def step(self, closure=None):
        loss = super().step(closure)
        if any(g["use_dynamic_adaptation"] for g in self.param_groups):
            step = max(g.get("global_step", 0) for g in self.param_groups)
            if step % self.defaults["relationship_discovery_interval"] == 0:
                self.discover_relationships()
        return loss

    def discover_relationships(self) -> list[tuple[int, int, float]]:
        """Run discovery now; the stored list is replaced. Returns [(a, b, compatibility)] (global indices)."""
        params = self._all_params()
        zero = torch.zeros(BALANCE_WINDOW, dtype=torch.float32)
        rows = []
        for p in params:
            state = self.state.get(p, {})
            rows.append(torch.stack([state[k].float().cpu() for k in BALANCE_KEYS]) if BALANCE_KEYS[0] in state
                        else zero)
        pairs = discover_pairs([tuple(p.shape) for p in params], torch.stack(rows),
                               self.defaults["compatibility_threshold"])
        anchor = self._anchor_state()
        device = params[0].device
        anchor["relationships"] = torch.tensor([[a, b] for a, b, _ in pairs], dtype=torch.int64,
                                               device=device).reshape(-1, 2)
        anchor["relationship_scores"] = torch.tensor([c for _, _, c in pairs], dtype=torch.float64, device=device)
        anchor["relationship_step"] = max(g.get("global_step", 0) for g in self.param_groups)
        return pairs

    # --- monitoring (seed document 002's API) --------------------------------------------------------------
    def _param_names(self) -> list:
        return [n for g in self.param_groups for n in (g.get("param_names") or [None] * len(g["params"]))]

    def get_relationship_summary(self) -> dict:
        anchor = self._anchor_state()
        rel = anchor.get("relationships")
        params, names = self._all_params(), self._param_names()
        entries = []
        if rel is not None:
            for (a, b), score in zip(rel.tolist(), anchor["relationship_scores"].tolist()):
                ia = self.state[params[a]].get("importance")
                ib = self.state[params[b]].get("importance")
                joint = float((ia * ib).clamp_min(0).sqrt()) if ia is not None and ib is not None else None
                entries.append({"a_index": a, "b_index": b, "a_name": names[a], "b_name": names[b],
                                "a_shape": list(params[a].shape), "b_shape": list(params[b].shape),
                                "compatibility": score, "joint_importance": joint})
        return {"total_relationships": len(entries), "relationships": entries,
                "last_discovery_step": anchor.get("relationship_step")}

    def get_importance_analysis(self) -> dict:
        values = [self.state[p]["importance"].float() for p in self._all_params() if "importance" in self.state.get(p, {})]
        if not values:
            return {"total_parameters": 0, "importance_statistics": {"mean": None, "max": None, "min": None, "std": None},
                    "high_importance_params": 0, "low_importance_params": 0}
        v = torch.stack(values)
        return {"total_parameters": len(values),
                "importance_statistics": {"mean": float(v.mean()), "max": float(v.max()), "min": float(v.min()),
                                          "std": float(v.std(unbiased=False))},
                "high_importance_params": int((v > imp.HIGH_IMPORTANCE).sum()),
                "low_importance_params": int((v < imp.LOW_IMPORTANCE).sum()),
                "thresholds": {"high": imp.HIGH_IMPORTANCE, "low": imp.LOW_IMPORTANCE},
                "multiplier_bounds": imp.MULTIPLIER_BOUNDS}

    def get_lr_mask_analysis(self) -> dict:
        groups = []
        for index, group in enumerate(self.param_groups):
            masks = [self.state[p]["lr_mask"] for p in group["params"] if "lr_mask" in self.state.get(p, {})]
            base = group.get("lr_mask_base_lr")
            if not group.get("use_lr_mask") or not masks or base is None:
                groups.append({"group": index, "enabled": bool(group.get("use_lr_mask")), "initialised": False})
                continue
            ratio = torch.cat([self._mask_values(p).reshape(-1) for p in group["params"]
                               if "lr_mask" in self.state.get(p, {})]).abs()
            lr = float(group["lr"])
            min_ratio, max_ratio = lr_mask.bounds(group, base)
            groups.append({"group": index, "enabled": True, "initialised": True, "base_lr": base, "current_lr": lr,
                           "ratio": {"mean": float(ratio.mean()), "min": float(ratio.min()), "max": float(ratio.max())},
                           "effective_lr": {"mean": lr * float(ratio.mean()), "min": lr * float(ratio.min()),
                                            "max": lr * float(ratio.max())},
                           "fraction_at_min": float((ratio <= min_ratio * (1 + 1e-3)).float().mean()),
                           "fraction_at_max": float((ratio >= max_ratio * (1 - 1e-3)).float().mean()),
                           "frozen_for_warmup": group.get("global_step", 0) <= group["warmup_steps"]})
        return {"groups": groups}

    def _mask_values(self, p) -> torch.Tensor:
        """The decoded mask of one parameter (8-bit states are dequantised for the report)."""
        state = self.state[p]
        value = state["lr_mask"]
        if value.dtype == torch.uint8:
            from .codec import _bnb_functional, dynamic_map
            block = self.block_size
            value = _bnb_functional().dequantize_blockwise(value, absmax=state["lr_mask_absmax"],
                                                           code=dynamic_map(True, value.device), blocksize=block)
            value = value[:p.numel()]
        return value.float()


def adaptive_chunk(grad, weight, row_coef, exp_avg, exp_avg_sq, anchor, prev_grad, mask, tam_smoothed, importance,
                   balance, partner_index, partner_value, step_vectors, mask_vector, segments, *,
                   beta1: float, beta2: float, eps: float, tam_beta: float, spd_lambda: float, importance_decay: float,
                   strength: float, spd: bool, **flags):
    """AdamW_HinaAdaptive's whole step for one chunk: decode; observe (<p, g> into the balance ring, the
    successive-gradient cosine); the lr mask from the raw gradient's signs; HinaAdamW's direction
    (``adamw_math``: ⊥Grad, AGR, Adam or ADOPT, TAM, Grams, Cautious); the importance score and its EMA; the
    update times the mask ratio and the (joint) importance multiplier; ALLoRA, decoupled weight decay, SPD.
    States (fp32 buffers; a tensor that does not step keeps its values), the per-tensor vectors and ``weight`` (which becomes the
    new weights) change in place; ``grad`` is read only. ``importance``/``balance``/``prev_grad`` are None
    without dynamic adaptation, ``mask`` without the lr mask, ``partner_index`` with adaptation_strength 0.

    A tensor whose gradient (or its sum of squares) is not finite is skipped like one without a gradient.
    Returns that skipped set, a bool per slot.
    """
    block = segments.block
    expand = segments.expand
    grad, weight, row_coef, exp_avg, exp_avg_sq, anchor, prev_grad, mask = map(
        segments.blocks, (grad, weight, row_coef, exp_avg, exp_avg_sq, anchor, prev_grad, mask))
    lr, decay, inv_bias1, inv_bias2_sqrt, clip, active, first = step_vectors.unbind(0)
    adapt, bump, min_ratio, max_ratio, start = mask_vector.unbind(0)
    finite = torch.isfinite(segments.sum(grad * grad))
    live = (active > 0) & finite
    keep = ~expand(live)
    g = torch.where(keep, 0.0, grad)
    adaptive = importance is not None
    if adaptive:
        balance_new = segments.sum(weight * g)
        cosine = imp.successive_cosine(g, prev_grad, segments)
        importance_new = torch.where((first > 0) & live, 1.0, importance)
    if mask is not None:
        ratio, mask_new = lr_mask.mask_step(mask, g, expand(first), adapt, bump, min_ratio, max_ratio, start)

    m, v = exp_avg, exp_avg_sq
    anchor_value = None
    if anchor is not None:
        anchor_value = torch.where(expand(first > 0), weight, anchor)
    g_t, m_new, v_new, u, smoothed = adamw_math(g, m, v, tam_smoothed, weight, segments, expand(inv_bias1, 1.0),
                                                expand(inv_bias2_sqrt, 1.0), expand(clip), beta1=beta1, beta2=beta2,
                                                eps=eps, tam_beta=tam_beta, **flags)
    if flags["adopt"]:  # a tensor's first ADOPT step: v = g^2, m stays 0, no update (its lr is 0)
        starting = expand(first > 0)
        v_new = torch.where(starting, g_t * g_t, v_new)
        m_new = torch.where(starting, 0.0, m_new)
        u = torch.where(starting, 0.0, u)

    if adaptive:
        stepping = live.to(weight.dtype)
        score = imp.importance_score(cosine, u, weight, segments, stepping)
        if flags["adopt"]:  # every stepping tensor at its first ADOPT step: no update yet, change rate neutral
            neutral = imp.importance_score(cosine, None, weight, segments, stepping)
            score = torch.where(((first > 0) | ~live).all(), neutral, score)
        importance_new = torch.where(live, importance_new * importance_decay + score * (1.0 - importance_decay),
                                     importance_new)
    if mask is not None:
        u = u * ratio
    if adaptive and partner_index is not None:
        other = torch.where(partner_index >= 0, importance_new[partner_index.clamp_min(0)],
                            torch.where(torch.isnan(partner_value), importance_new, partner_value))
        joint = (importance_new * other).clamp_min(0.0).sqrt()
        u = u * expand(imp.importance_multiplier(joint, strength))
    if row_coef is not None:
        u = u * row_coef
    new_weight = decoupled_update(weight, u, g_t, anchor_value, segments, lr, decay, spd_lambda, spd=spd)

    store_state(exp_avg, m_new, keep, None, block)
    store_state(exp_avg_sq, v_new, keep, None, block)
    if anchor is not None:
        store_state(anchor, anchor_value, keep, None, block)
    if mask is not None:
        store_state(mask, mask_new, keep, None, block)
    if adaptive:
        store_state(prev_grad, g, keep, None, block)
        balance.copy_(torch.where(live, balance_new, balance))
        importance.copy_(importance_new)
    if tam_smoothed is not None:
        tam_smoothed.copy_(torch.where(live, smoothed, tam_smoothed))
    weight.copy_(torch.where(keep, weight, new_weight))
    return (active > 0) & ~finite


#: Inductor recomputes a value that reads many inputs where each later loop uses it, instead of storing it in a
#: chunk-sized temporary (``realize_reads_threshold``, default 4). adaptive_chunk's intermediate values (ADOPT's
#: clipped gradient, the moments, the update) feed several per-tensor sums and the final loop; at the default they
#: were four 4 MiB temporaries per call at SDXL size (one with this), allocated and freed on every call, and glibc
#: often gave them back to the OS and faulted them in again on the next. Results are bit-identical (same operations).
#: Measured (1 thread, thread CPU per step, fresh processes, two each): SDXL r32 AdamWBF16_HinaAdaptive 2311, 2336 ->
#: 1647, 1666 ms (330K -> 1-2K page faults per step), AdamW_HinaAdaptive 1376, 1474 -> 1368, 1399 ms; SD1.5 r16
#: (no faults either way) 0.98-1.01x. Not for HinaAdamW's graph: set for every graph, HinaAdamW 8-bit was 1.8x slower.
ADAPTIVE_INDUCTOR_OPTIONS = {"realize_reads_threshold": 64}

_fused = MaybeCompiled(adaptive_chunk, options=ADAPTIVE_INDUCTOR_OPTIONS)
_decode_states = MaybeCompiled(decode_states)
_encode_states = MaybeCompiled(encode_states)
