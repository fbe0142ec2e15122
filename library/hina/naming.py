"""Parameter roles for LoRA, LoKr and friends, and how parameters are paired.

This module is the one source of truth for the role names: the optimizers use it to find LoRA A/B and
LoKr factors, and ``networks/lokr.py`` names its parameters with the constants defined here.

A name is classified by its dotted components, never by substring stripping: the role token is the
component that names the role (``lora_down``, ``lora_A``, ``lokr_w1_a`` ...), and the text before it is the
module prefix. Pairs are formed by equal prefixes, never by comparing tensors.

Roles
    lora_a   kohya ``lora_down``, peft ``lora_A``               (the input side, r x in)
    lora_b   kohya ``lora_up``,   peft ``lora_B``               (the output side, out x r, zero at init)
    lokr_*   LyCORIS LoKr factors, ΔW = kron(W1, W2) * scale    (W1 = w1 or w1_a @ w1_b; W2 likewise)
    w_norm, b_norm   LyCORIS norm-module weight and bias
    dora_scale       DoRA magnitude (LyCORIS ``dora_scale``, peft ``lora_magnitude_vector``)
    other            anything else
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

# LoKr parameter names, exactly as LyCORIS (lycoris/modules/lokr.py) names them.
LOKR_W1 = "lokr_w1"
LOKR_W1_A = "lokr_w1_a"
LOKR_W1_B = "lokr_w1_b"
LOKR_W2 = "lokr_w2"
LOKR_W2_A = "lokr_w2_a"
LOKR_W2_B = "lokr_w2_b"
LOKR_T2 = "lokr_t2"
LOKR_NAMES = (LOKR_W1, LOKR_W1_A, LOKR_W1_B, LOKR_W2, LOKR_W2_A, LOKR_W2_B, LOKR_T2)
LOKR_W1_SIDE = (LOKR_W1, LOKR_W1_A, LOKR_W1_B)
LOKR_W2_SIDE = (LOKR_W2, LOKR_W2_A, LOKR_W2_B, LOKR_T2)
# The factor LyCORIS initialises to zero (lokr_w2 when W2 is full, lokr_w2_b when it is decomposed).
# It plays the role LoRA's B plays: the output side that starts at zero, so LoRA+ gives it the larger lr.
LOKR_ZERO_INIT = (LOKR_W2, LOKR_W2_B)

# Role token (a dotted name component) -> role.
ROLE_TOKENS: dict[str, str] = {
    "lora_down": "lora_a",
    "lora_A": "lora_a",
    "lora_up": "lora_b",
    "lora_B": "lora_b",
    **{name: name for name in LOKR_NAMES},
    "w_norm": "w_norm",
    "b_norm": "b_norm",
    "dora_scale": "dora_scale",
    "lora_magnitude_vector": "dora_scale",
}
ROLES = ("lora_a", "lora_b", *LOKR_NAMES, "w_norm", "b_norm", "dora_scale", "other")

# Roles on the "B side" in the LoRA+ sense (zero-initialised output factor): they get alora_ratio x lr.
B_SIDE_ROLES = ("lora_b", *LOKR_ZERO_INIT)
NORM_ROLES = ("w_norm", "b_norm")


def classify(name: str | None) -> tuple[str, str]:
    """Return ``(role, prefix)`` for a parameter name. Unknown or missing names are ``("other", name)``."""
    if not name:
        return "other", name or ""
    parts = name.split(".")
    # The last matching component wins: peft names look like "...q_proj.lora_A.default.weight".
    for index in range(len(parts) - 1, -1, -1):
        role = ROLE_TOKENS.get(parts[index])
        if role is not None:
            return role, ".".join(parts[:index])
    return "other", name


@dataclass
class ParamInfo:
    """What the optimizers know about one parameter."""

    index: int
    name: str | None
    shape: tuple[int, ...]
    role: str = "other"
    prefix: str = ""
    partner: int | None = None  # index of the paired tensor (LoRA A<->B), if any


@dataclass
class Pairing:
    """Roles and pairs for one list of parameters, and how the names were obtained."""

    infos: list[ParamInfo]
    name_source: str
    lora_pairs: list[tuple[int, int]] = field(default_factory=list)
    lokr_pairs: list[tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    norm_pairs: list[tuple[int, int]] = field(default_factory=list)

    def roles(self) -> list[str]:
        return [info.role for info in self.infos]

    def count(self, *roles: str) -> int:
        return sum(info.role in roles for info in self.infos)


def lokr_factors_complete(roles: Iterable[str]) -> bool:
    """True when a module's LoKr roles make both Kronecker factors: W1 is ``lokr_w1`` or ``lokr_w1_a`` with
    ``lokr_w1_b``; W2 is ``lokr_w2`` or ``lokr_w2_a`` with ``lokr_w2_b`` (plus ``lokr_t2`` for Tucker)."""
    roles = set(roles)
    w1 = LOKR_W1 in roles or {LOKR_W1_A, LOKR_W1_B} <= roles
    w2 = LOKR_W2 in roles or {LOKR_W2_A, LOKR_W2_B} <= roles
    return w1 and w2


def pair_by_name(names: Sequence[str | None], shapes: Sequence[tuple[int, ...]], name_source: str) -> Pairing:
    """Classify named parameters and pair them by module prefix."""
    infos = []
    for index, (name, shape) in enumerate(zip(names, shapes)):
        role, prefix = classify(name)
        infos.append(ParamInfo(index, name, tuple(shape), role, prefix))
    pairing = Pairing(infos, name_source)

    by_prefix: dict[str, dict[str, list[int]]] = {}
    for info in infos:
        if info.role != "other":
            by_prefix.setdefault(info.prefix, {}).setdefault(info.role, []).append(info.index)
    for prefix in sorted(by_prefix):
        roles = by_prefix[prefix]
        if len(roles.get("lora_a", [])) == 1 and len(roles.get("lora_b", [])) == 1:
            a, b = roles["lora_a"][0], roles["lora_b"][0]
            infos[a].partner, infos[b].partner = b, a
            pairing.lora_pairs.append((a, b))
        if lokr_factors_complete(roles):
            w1 = tuple(i for r in LOKR_W1_SIDE for i in roles.get(r, []))
            w2 = tuple(i for r in LOKR_W2_SIDE for i in roles.get(r, []))
            pairing.lokr_pairs.append((w1, w2))
        if len(roles.get("w_norm", [])) == 1 and len(roles.get("b_norm", [])) == 1:
            pairing.norm_pairs.append((roles["w_norm"][0], roles["b_norm"][0]))
    return pairing


def _fan_in(shape: tuple[int, ...]) -> int:
    fan = 1
    for dim in shape[1:]:
        fan *= dim
    return fan


def pair_by_shape(shapes: Sequence[tuple[int, ...]]) -> Pairing:
    """Shape fallback when no names are known.

    Pairs consecutive tensors ``(r, in[, k, k])`` then ``(out, r[, 1, 1])`` with ``r`` smaller than both
    ``in`` and ``out``: the order kohya's ``LoRAModule`` and peft register ``lora_down``/``lora_A`` and
    ``lora_up``/``lora_B``. It is a guess, and ``diagnose_lora_pairing()`` says so.
    """
    infos = [ParamInfo(index, None, tuple(shape)) for index, shape in enumerate(shapes)]
    pairing = Pairing(infos, "shape_fallback")
    index = 0
    while index + 1 < len(infos):
        a, b = infos[index].shape, infos[index + 1].shape
        if len(a) >= 2 and len(b) >= 2 and len(a) == len(b):
            rank = a[0]
            if b[1] == rank and all(d == 1 for d in b[2:]) and rank < _fan_in(a) and rank < b[0]:
                infos[index].role, infos[index + 1].role = "lora_a", "lora_b"
                infos[index].partner, infos[index + 1].partner = index + 1, index
                infos[index].prefix = infos[index + 1].prefix = f"<shape pair {len(pairing.lora_pairs)}>"
                pairing.lora_pairs.append((index, index + 1))
                index += 2
                continue
        index += 1
    return pairing


def pair_parameters(names: Sequence[str | None] | None, shapes: Sequence[tuple[int, ...]],
                    name_source: str) -> Pairing:
    """Names when every parameter has one, else the shape fallback."""
    if names is not None and len(names) == len(shapes) and all(names):
        return pair_by_name(names, shapes, name_source)
    return pair_by_shape(shapes)


def names_from_module(module, params: Iterable) -> dict[int, str]:
    """Map ``id(param) -> qualified name`` for the parameters of ``module`` (used by ``attach_names``)."""
    wanted = {id(p) for p in params}
    return {id(p): name for name, p in module.named_parameters() if id(p) in wanted}


# ----------------------------------------------------------------------------------------------------------
# pairing across param groups
ParamRef = tuple[int, int]  # (group index, index inside the group)


@dataclass
class GroupParams:
    """What ``pair_groups`` needs to know about one param group."""

    names: Sequence[str | None] | None
    shapes: Sequence[tuple[int, ...]]
    name_source: str = "param_names"
    lr: float | None = None


@dataclass
class LoKrModule:
    """The LoKr factors found under one module prefix, wherever their groups are."""

    prefix: str
    w1: tuple[ParamRef, ...]
    w2: tuple[ParamRef, ...]
    complete: bool


@dataclass
class ModelPairing:
    """Roles and pairs over all param groups: pairs are formed by module prefix across groups.

    ``groups`` has one ``Pairing`` per param group (roles, name source, the pairs that sit inside that
    group); ``lora_pairs``, ``lokr_modules`` and ``norm_pairs`` are the model-wide pairs, as
    ``(group, index)`` references, including those whose halves sit in different groups (kohya's LoRA+
    puts ``lora_down`` and ``lora_up`` in separate groups).
    """

    groups: list[Pairing]
    lora_pairs: list[tuple[ParamRef, ParamRef]] = field(default_factory=list)
    lokr_modules: list[LoKrModule] = field(default_factory=list)
    norm_pairs: list[tuple[ParamRef, ParamRef]] = field(default_factory=list)

    @property
    def lokr_pairs(self) -> list[LoKrModule]:
        """LoKr modules whose factors are complete: only these count as pairs."""
        return [m for m in self.lokr_modules if m.complete]

    def role(self, ref: ParamRef) -> str:
        return self.groups[ref[0]].infos[ref[1]].role

    def counts(self) -> dict[str, int]:
        """The numbers ``get_optimization_info()`` reports."""
        paired = {ref for pair in self.lora_pairs for ref in pair}
        lora = [(g, info.index) for g, p in enumerate(self.groups) for info in p.infos
                if info.role in ("lora_a", "lora_b")]
        return {
            "lora_pairs": len(self.lora_pairs),
            "lora_pairs_across_groups": sum(a[0] != b[0] for a, b in self.lora_pairs),
            "unpaired_lora": sum(ref not in paired for ref in lora),
            "lokr_pairs": len(self.lokr_pairs),
            "lokr_incomplete_modules": sum(not m.complete for m in self.lokr_modules),
            "norm_pairs": len(self.norm_pairs),
        }


def _shape_pair(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    """``a`` looks like a LoRA down ``(r, in[, k, k])`` and ``b`` like its up ``(out, r[, 1, 1])``."""
    if len(a) < 2 or len(a) != len(b):
        return False
    rank = a[0]
    return b[1] == rank and all(d == 1 for d in b[2:]) and rank < _fan_in(a) and rank < b[0]


def _pair_unnamed_groups_by_shape(pairings: list[Pairing], unnamed: list[int]) -> list[tuple[ParamRef, ParamRef]]:
    """kohya's LoRA+ layout without names: a group of downs followed (in group order) by a group of the ups
    in the same order. Two unnamed groups with no pair inside them and the same length pair element-wise
    when every element passes the down/up shape test; the roles are set on their ``infos``."""
    pairs: list[tuple[ParamRef, ParamRef]] = []
    free = [g for g in unnamed if not pairings[g].lora_pairs]
    used: set[int] = set()
    for position, ga in enumerate(free):
        if ga in used:
            continue
        a_infos = pairings[ga].infos
        for gb in free[position + 1:]:
            b_infos = pairings[gb].infos
            if gb in used or len(b_infos) != len(a_infos) or not a_infos:
                continue
            if all(_shape_pair(a.shape, b.shape) for a, b in zip(a_infos, b_infos)):
                for a, b in zip(a_infos, b_infos):
                    a.role, b.role = "lora_a", "lora_b"
                    a.prefix = b.prefix = f"<shape pair across groups {ga}/{gb} #{a.index}>"
                    pairs.append(((ga, a.index), (gb, b.index)))
                used.update((ga, gb))
                break
    return pairs


def pair_groups(groups: Sequence[GroupParams]) -> ModelPairing:
    """Classify every group's parameters and pair them across groups.

    Named groups (every tensor has a name) are classified by name and paired by module prefix over all
    named groups together: a LoRA pair is one ``lora_a`` and one ``lora_b`` with the same prefix, a LoKr
    module is a pair only when its factors are complete (``lokr_factors_complete``), wherever they sit.
    Unnamed groups use the shape fallback inside the group, then element-wise across two groups (kohya's
    LoRA+ split). Each group's own ``Pairing`` keeps the pairs that lie inside it.
    """
    pairings = [pair_parameters(g.names, g.shapes, g.name_source) for g in groups]
    model = ModelPairing(pairings)
    by_prefix: dict[str, dict[str, list[ParamRef]]] = {}
    unnamed = []
    for g, pairing in enumerate(pairings):
        if pairing.name_source == "shape_fallback":
            unnamed.append(g)
            model.lora_pairs.extend(((g, a), (g, b)) for a, b in pairing.lora_pairs)
            continue
        for info in pairing.infos:
            if info.role != "other":
                by_prefix.setdefault(info.prefix, {}).setdefault(info.role, []).append((g, info.index))
    for prefix in sorted(by_prefix):
        roles = by_prefix[prefix]
        if len(roles.get("lora_a", [])) == 1 and len(roles.get("lora_b", [])) == 1:
            model.lora_pairs.append((roles["lora_a"][0], roles["lora_b"][0]))
        if any(r in roles for r in LOKR_NAMES):
            model.lokr_modules.append(LoKrModule(
                prefix, tuple(ref for r in LOKR_W1_SIDE for ref in roles.get(r, [])),
                tuple(ref for r in LOKR_W2_SIDE for ref in roles.get(r, [])), lokr_factors_complete(roles)))
        if len(roles.get("w_norm", [])) == 1 and len(roles.get("b_norm", [])) == 1:
            model.norm_pairs.append((roles["w_norm"][0], roles["b_norm"][0]))
    model.lora_pairs.extend(_pair_unnamed_groups_by_shape(pairings, unnamed))
    return model


# ----------------------------------------------------------------------------------------------------------
# LoRA+ applied by the param groups (kohya's loraplus_*lr_ratio)
@dataclass(frozen=True)
class SplitLoraPlus:
    """A/B halves of the same modules sit in groups with different lrs: the groups already carry LoRA+.

    ``b_groups``: groups holding B-side tensors (``lora_up``/``lora_B``, ``lokr_w2``/``lokr_w2_b``) whose lr
    differs from their A side's; ``ratios``: ``lr(B group) / lr(A group)`` for each. An optimizer with its
    own B-side ratio (``use_alora``'s ``alora_ratio``) should use 1.0 on these groups, so the ratio is
    applied once; ALLoRA row scaling is unaffected.
    """

    b_groups: frozenset[int]
    ratios: dict[int, float]

    def message(self, optimizer_name: str, alora_ratio: float) -> str:
        shown = ", ".join(f"{r:g}" for r in sorted(set(self.ratios.values())))
        return (f"{optimizer_name}: the param groups already give the LoRA/LoKr B side a larger lr (ratio {shown}, "
                f"kohya's loraplus_*lr_ratio); that ratio wins and alora_ratio={alora_ratio:g} is not applied on "
                f"top (B-side multiplier 1.0 in groups {sorted(self.b_groups)}; ALLoRA row scaling unchanged).")


def detect_split_lora_plus(pairing: ModelPairing, lrs: Sequence[float]) -> SplitLoraPlus | None:
    """Whether the groups already apply LoRA+ (see ``SplitLoraPlus``); None when they do not."""
    if len(lrs) != len(pairing.groups):
        raise ValueError(f"detect_split_lora_plus: {len(lrs)} lrs for {len(pairing.groups)} param groups")
    ratios: dict[int, float] = {}

    def note(a_group: int, b_group: int) -> None:
        if a_group != b_group and lrs[a_group] > 0 and lrs[b_group] != lrs[a_group]:
            ratios[b_group] = lrs[b_group] / lrs[a_group]

    for a, b in pairing.lora_pairs:
        note(a[0], b[0])
    for module in pairing.lokr_pairs:
        zero_init = [ref for ref in module.w2 if pairing.role(ref) in LOKR_ZERO_INIT]
        for b in zero_init:
            for a in module.w1:
                note(a[0], b[0])
    if not ratios:
        return None
    return SplitLoraPlus(frozenset(ratios), ratios)


def unnamed_parameters_notice(pairing: ModelPairing, optimizer_name: str) -> str | None:
    """The one warning for the first step when no names reached the optimizer (stock sd-scripts), or None.

    Without names LoRA roles are guessed from shapes and LoKr/LyCORIS factors cannot be recognised (they
    stay role "other": no LoKr awareness, no B-side ratio). The text names the hook and how to enable it.
    """
    unnamed = [p for p in pairing.groups if p.name_source == "shape_fallback"]
    if not unnamed:
        return None
    found = sum(pairing.groups[a[0]].name_source == "shape_fallback" for a, _ in pairing.lora_pairs)
    return (f"{optimizer_name}: no parameter names reached the optimizer in {len(unnamed)} of "
            f"{len(pairing.groups)} param groups (stock sd-scripts passes none). LoRA down/up roles were guessed "
            f"from shapes ({found} pairs); LoKr/LyCORIS factors cannot be recognised this way and are treated as "
            f"plain tensors (no LoKr awareness, no B-side ratio). For roles from names use the hook: run "
            f"'python train_network_hina.py --sd_scripts <checkout> ...' or call library.hina.kohya.install() "
            f"before training (see docs/SD_SCRIPTS.md).")
