"""A plain per-tensor AdamW_HinaAdaptive: the tests' reference for its fused chunk step (library/hina/adaptive.py).

Written out tensor by tensor from the technique modules' equations (importance.py, lr_mask.py, relationships.py,
and HinaAdamW's recipe as in tests/test_reference_matrix.py), independent of the fused code: no flat buffers, no
segments, no compiled functions. What it takes from the optimizer is layout, not math: which tensors share a chunk
(the importance score compares a tensor with the tensors stepped with it), their roles, and the chunk order (a
pair's partner in a later chunk still has its previous importance). ``discover_pairs`` (relationships.py) is a
plain function of shapes and numbers and is called as is. 8-bit states go through the blockwise codec
(quant.py, itself tested against bitsandbytes) after every step.
"""

from __future__ import annotations

import math

import torch

from library.hina.techniques.relationships import BALANCE_WINDOW, discover_pairs
from library.hina.techniques.spd import ZERO_ANCHOR_ROLES

DEFAULT_MAX_RATIO = 10.0  # lr_mask.py: max_lr=None lets the mask reach 10x the base lr
MULTIPLIER_BOUNDS = (0.5, 2.0)  # importance.py


def _codec_round_trip(x: torch.Tensor, signed: bool, block: int) -> torch.Tensor:
    """``x`` through the 8-bit blockwise codec (quant.py, tested against bitsandbytes' quantiser in test_quant.py),
    one tensor at a time: the optimizer aligns every tensor to a block, and zero padding leaves each absmax as is.
    The codec rather than bitsandbytes here, so that the comparison isolates the step's math: bitsandbytes' CPU
    quantiser rounds values near a code midpoint the other way, and ADOPT carries that into later steps (0.1-0.6 %
    of the distance moved after eight steps, against ~1e-6 with the codec)."""
    from library.hina import quant
    flat = x.reshape(-1).float()
    flat = torch.cat([flat, flat.new_zeros((-flat.numel()) % block)])
    qmap = quant.dynamic_map(signed, x.device)
    codes, absmax = quant.encode(flat, qmap, block, signed)
    return quant.decode(codes, absmax, qmap, block)[:x.numel()].reshape(x.shape)


def _relative(values: list[float], live: list[bool]) -> list[float]:
    """values_i / mean over live tensors, clamped to [0, 2]; 1 when that mean is 0."""
    mean = sum(v for v, ok in zip(values, live) if ok) / max(sum(live), 1)
    return [min(max(v / max(mean, 1e-30), 0.0), 2.0) if mean > 0 else 1.0 for v in values]


class AdaptiveReference:
    """One param group of AdamW_HinaAdaptive, stepped tensor by tensor.

    ``chunks``: lists of tensor indices, in the order the optimizer steps them. ``eight_bit_block``: the codec
    block when the states are 8-bit, else None.
    """

    def __init__(self, params, roles, chunks, *, lr, betas, eps, weight_decay, use_spd, spd_lambda, use_cautious,
                 use_orthogonal_grad, use_adopt_stability, use_grams, use_agr, use_tam, tam_beta, use_lr_mask, lr_bump,
                 min_lr, max_lr, warmup_steps, importance_decay, adaptation_strength, relationship_discovery_interval,
                 compatibility_threshold, eight_bit_block=None):
        assert use_adopt_stability and use_lr_mask, "the reference covers the defaults' moment rule and mask"
        assert not use_orthogonal_grad
        self.w = [p.detach().float().clone() for p in params]
        self.roles, self.chunks, self.block = roles, chunks, eight_bit_block
        self.s = dict(lr=lr, b1=betas[0], b2=betas[1], eps=eps, wd=weight_decay, spd=use_spd, spd_lambda=spd_lambda,
                      cautious=use_cautious, grams=use_grams, agr=use_agr, tam=use_tam, tam_beta=tam_beta,
                      bump=lr_bump / lr, min_ratio=min_lr / lr,
                      max_ratio=DEFAULT_MAX_RATIO if max_lr is None else max_lr / lr, warmup=warmup_steps,
                      decay=importance_decay, strength=adaptation_strength, interval=relationship_discovery_interval,
                      threshold=compatibility_threshold)
        n = len(self.w)
        zeros = [torch.zeros_like(x) for x in self.w]
        self.m, self.v, self.prev, self.mask = [z.clone() for z in zeros], [z.clone() for z in zeros], \
            [z.clone() for z in zeros], [z.clone() for z in zeros]
        self.anchor = [None if role in ZERO_ANCHOR_ROLES else z.clone() for role, z in zip(roles, zeros)]
        self.steps, self.smoothed, self.importance = [0] * n, [0.0] * n, [0.0] * n
        self.balance = [[0.0] * BALANCE_WINDOW for _ in range(n)]
        self.global_step, self.skipped, self.partner = 0, 0, {}

    def step(self, grads: list[torch.Tensor | None]) -> None:
        s = self.s
        if all(g is None for g in grads):
            return
        self.global_step += 1
        t_global = self.global_step
        for chunk in self.chunks:
            live = {i: grads[i] is not None and bool(torch.isfinite((grads[i].float() ** 2).sum())) for i in chunk}
            self.skipped += sum(1 for i in chunk if grads[i] is not None and not live[i])
            out = {}
            for i in chunk:
                if live[i]:
                    out[i] = self._direction(i, grads[i].float(), t_global)
            # importance: the score compares each tensor with the live tensors of its chunk
            live_list = [live[i] for i in chunk]
            p_norm = [float(self.w[i].norm()) for i in chunk]
            s_rel = _relative([pn / math.sqrt(self.w[i].numel()) for pn, i in zip(p_norm, chunk)], live_list)
            all_first = all(self.steps[i] == 0 or not live[i] for i in chunk)
            if all_first:
                q_rel = [1.0] * len(chunk)
            else:
                rates = [float(out[i]["u"].norm()) / (pn + 1e-12) if live[i] else 0.0 for pn, i in zip(p_norm, chunk)]
                q_rel = _relative(rates, live_list)
            new_importance = {}
            for k, i in enumerate(chunk):
                importance = 1.0 if (self.steps[i] == 0 and live[i]) else self.importance[i]
                if live[i]:
                    score = (1.0 + out[i]["cosine"] + q_rel[k] + s_rel[k]) / 3.0
                    importance = importance * s["decay"] + score * (1.0 - s["decay"])
                new_importance[i] = importance
            for i in chunk:
                if not live[i]:
                    continue
                partner = self.partner.get(i)
                other = new_importance[i] if partner is None else new_importance.get(partner, self.importance[partner])
                joint = math.sqrt(max(new_importance[i] * other, 0.0))
                multiplier = min(max(1.0 + s["strength"] * (joint - 1.0), MULTIPLIER_BOUNDS[0]), MULTIPLIER_BOUNDS[1])
                self._apply(i, out[i], multiplier)
            for i in chunk:
                self.importance[i] = new_importance[i]
        if t_global % s["interval"] == 0:
            pairs = discover_pairs([tuple(x.shape) for x in self.w], torch.tensor(self.balance), s["threshold"])
            self.partner = {}
            for a, b, _ in pairs:
                self.partner[a], self.partner[b] = b, a

    def _direction(self, i: int, g_raw: torch.Tensor, t_global: int) -> dict:
        """Observations, the lr mask and HinaAdamW's direction (AGR, ADOPT, TAM, Grams, Cautious) of tensor i."""
        s, t = self.s, self.steps[i]
        self.balance[i][t_global % BALANCE_WINDOW] = float((self.w[i] * g_raw).sum())
        prev = self.prev[i]
        cosine = float((g_raw * prev).sum() / (g_raw.norm() * prev.norm()).clamp_min(1e-30))
        # lr mask (ostris' Automagic, relative to the base lr): from the raw gradient's signs
        polarity = g_raw > 0
        if t == 0:
            ratio = torch.full_like(g_raw, min(max(1.0, s["min_ratio"]), s["max_ratio"]))
        else:
            ratio = self.mask[i].abs()
            if t_global > s["warmup"]:
                agree = polarity == (self.mask[i] > 0)
                ratio = torch.where(agree, ratio + s["bump"], ratio - s["bump"]).clamp(s["min_ratio"], s["max_ratio"])
        mask = torch.where(polarity, ratio, -ratio)
        g = g_raw
        if s["agr"]:  # g (1 - |g| / sum|g|)
            g = g * (1 - g.abs() / g.abs().sum().clamp_min(torch.finfo(torch.float32).tiny))
        m, v = self.m[i], self.v[i]
        # ADOPT: x = clip(g / max(sqrt(v), eps), t^(1/4)); TAM damps x by the smoothed cosine of (m, x)
        c = max(t, 1) ** 0.25
        x = (g / v.sqrt().clamp_min(s["eps"])).clamp(-c, c)
        if s["tam"]:
            cos = float((m * x).sum() / (m.norm() * x.norm()).clamp_min(1e-30))
            self.smoothed[i] = s["tam_beta"] * self.smoothed[i] + (1 - s["tam_beta"]) * cos
            x = x * ((1 + self.smoothed[i]) / 2 + 1e-8)
        if t == 0:  # ADOPT's first step: v = g^2 only, no update
            m_new, v_new, u = torch.zeros_like(m), g * g, torch.zeros_like(m)
        else:
            m_new = s["b1"] * m + (1 - s["b1"]) * x
            v_new = s["b2"] * v + (1 - s["b2"]) * g * g
            u = m_new.clone()
            if s["grams"]:
                u = u.abs() * g.sign()
            if s["cautious"]:
                kept = (u * g > 0).float()
                u = u * kept * (u.numel() / (kept.sum() + 1))
        return {"g": g, "g_raw": g_raw, "m": m_new, "v": v_new, "u": u, "ratio": ratio, "mask": mask,
                "cosine": cosine}

    def _apply(self, i: int, out: dict, multiplier: float) -> None:
        """u times the lr mask's ratio and the importance multiplier; decoupled weight decay; SPD; new states."""
        s, t = self.s, self.steps[i]
        lr = 0.0 if t == 0 else s["lr"]  # ADOPT's first step does not move the weights
        u = out["u"] * out["ratio"] * multiplier
        w = self.w[i]
        new = w * (1 - lr * s["wd"]) - lr * u
        anchor = self.anchor[i]
        if anchor is not None and t == 0:
            anchor = w.clone()
        if s["spd"]:
            p0 = torch.zeros_like(w) if anchor is None else anchor
            dev, new_dev = w - p0, new - p0
            if (out["g"] * dev).sum() > 0:
                r = ((new_dev.norm() - dev.norm()) / new_dev.norm().clamp_min(1e-30)).clamp(0, 1)
                new = new - s["spd_lambda"] * r * new_dev
        self.w[i] = new
        states = {"m": (out["m"], True), "v": (out["v"], False), "prev": (out["g_raw"], True),
                  "mask": (out["mask"], True)}
        if anchor is not None:
            states["anchor"] = (anchor, True)
        for name, (value, signed) in states.items():
            if self.block is not None:
                value = _codec_round_trip(value, signed, self.block)
            getattr(self, name)[i] = value
        self.steps[i] += 1
