"""Relationship discovery: find LoRA-like (A, B) pairs among unnamed parameters.

Used by AdamW_HinaAdaptive when parameter names do not say which tensors belong together (the seed
document's "automatic parameter relationship discovery", which it describes only as imitating LoRA
pairing). Two tests, both deterministic (no random choice, so distributed ranks agree):

1. Shapes compose as a matrix product the way a LoRA pair does: A is (r, in[, k, k]), B is (out, r[, 1, 1]),
   with r smaller than A's fan-in and B's rows, so B @ A is defined.
2. The rescaling balance. A pair computes B(A x); the loss is unchanged by A -> cA, B -> B/c, so its
   derivative in c vanishes: <A, dL/dA> = <B, dL/dB> on every step, for any data, dropout or scale
   (the conservation law of scale symmetry; Kunin et al., "Neural Mechanics", arXiv 2012.04728, eq. 5).
   Each tensor keeps its last K values of s_t = <p_t, g_t> (a ring of ``BALANCE_WINDOW`` scalars);
   compatibility of a candidate pair is

       compat(a, b) = 1 - ||s_a - s_b|| / (||s_a|| + ||s_b||)       in [0, 1]

   which is 1 for a true pair (up to rounding) and is 0 when there is no evidence yet (both zero, as at
   initialisation when B = 0).

Pairs are accepted greedily by decreasing compatibility (ties broken by index), each tensor at most
once, and only when compat >= compatibility_threshold. The result replaces the previous list, so it is
bounded by half the number of tensors.
"""

from __future__ import annotations

import torch
from ..stages import Flag, Stage, in_range, int_at_least

BALANCE_WINDOW = 8


def _fan_in(shape) -> int:
    fan = 1
    for d in shape[1:]:
        fan *= d
    return fan


def composes(a_shape, b_shape) -> bool:
    """True when (a, b) can be a LoRA (down, up) pair: b @ a is defined and r is the small dimension."""
    if len(a_shape) < 2 or len(b_shape) < 2:
        return False
    rank = a_shape[0]
    return (b_shape[1] == rank and all(d == 1 for d in b_shape[2:])
            and rank < _fan_in(a_shape) and rank < b_shape[0])


def compatibility(balance_a: torch.Tensor, balance_b: torch.Tensor) -> torch.Tensor:
    """compat for every (a, b): balance_a is (nA, K), balance_b is (nB, K); returns (nA, nB)."""
    diff = torch.cdist(balance_a.double(), balance_b.double())
    total = balance_a.double().norm(dim=1, keepdim=True) + balance_b.double().norm(dim=1).unsqueeze(0)
    score = 1.0 - diff / total.clamp_min(1e-300)
    return torch.where(total > 0, score, torch.zeros_like(score)).clamp_(0.0, 1.0)


def discover_pairs(shapes: list[tuple[int, ...]], balances: torch.Tensor, threshold: float):
    """Return [(a, b, compat)] (indices into ``shapes``), greedy by compatibility, deterministic."""
    a_idx = [i for i, s in enumerate(shapes) if len(s) >= 2]
    candidates = []
    by_rank: dict[int, list[int]] = {}
    for j, s in enumerate(shapes):
        if len(s) >= 2:
            by_rank.setdefault(s[1], []).append(j)
    if not a_idx:
        return []
    for a in a_idx:
        bs = [b for b in by_rank.get(shapes[a][0], []) if b != a and composes(shapes[a], shapes[b])]
        if not bs:
            continue
        scores = compatibility(balances[a:a + 1], balances[bs]).squeeze(0).tolist()
        candidates.extend((score, a, b) for score, b in zip(scores, bs) if score >= threshold)
    candidates.sort(key=lambda c: (-c[0], c[1], c[2]))
    used: set[int] = set()
    pairs = []
    for score, a, b in candidates:
        if a in used or b in used:
            continue
        used.update((a, b))
        pairs.append((a, b, score))
    pairs.sort(key=lambda c: (c[0], c[1]))
    return pairs


BALANCE_KEYS = tuple(f"balance_{k}" for k in range(BALANCE_WINDOW))

#: Runs with the importance stage (``use_dynamic_adaptation``), whose joint importance it sets.
RELATIONSHIPS = Stage(
    "relationship discovery",
    (Flag("relationship_discovery_interval", 100, "int", "steps between discoveries (the list is replaced)",
          int_at_least(1), "an int >= 1", int),
     Flag("compatibility_threshold", 0.3, "float", "minimal compatibility of a discovered pair",
          in_range(0.0, 1.0), "0..1", float)),
    vectors=lambda group: list(BALANCE_KEYS) if group["use_dynamic_adaptation"] else [],
)
