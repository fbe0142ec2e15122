"""2,000 optimizer steps on LoRA shapes: memory does not grow after warm-up (issue 7).

Measured after a 200-step warm-up, over the next 1,800 steps, per optimizer:
- bytes of every tensor reachable from ``optimizer.state`` (states, histories, relationship lists) and the
  number of such tensors: no more tensors than after warm-up, bytes within +1 KiB (the relationship list is
  re-derived every 50 steps and its length may change);
- Python objects tracked by the garbage collector: net growth below ``OBJ_BOUND`` (200) over 1,800 steps, i.e.
  no per-step growth of lists, dicts or histories (tracemalloc was tried first: it slows the Python-heavy
  step ~5x, too slow for the suite);
- process RSS (psutil, when installed): growth below ``RSS_BOUND`` (16 MiB; the allocator's noise).
The bf16 optimizer's scratch buffers are the work pool, bounded by the chunk size (the RSS bound covers it).
"""

from __future__ import annotations

import gc
import time

import pytest
import torch

from _hina_cases import lora_params, make, set_grads
from library.hina import (AdamW_HinaAdaptive, AdamWBF16_HinaAdaptive, Automagic_CameAMP, Automagic_CameAMP8bit,
                          Automagic_CameAMP_COptim, Automagic_CameAMP_COptim8bit, HinaAdamW)

STEPS, WARMUP = 2000, 200
OBJ_BOUND = 200
RSS_BOUND = 16 * 2 ** 20
# Every class; the Automagic family's histories are fixed-size rings (context_window) filled during warm-up.
CLASSES = [HinaAdamW, AdamW_HinaAdaptive, AdamWBF16_HinaAdaptive, Automagic_CameAMP, Automagic_CameAMP8bit,
           Automagic_CameAMP_COptim, Automagic_CameAMP_COptim8bit]
STATE_SLACK = 1024  # the relationship list is re-derived every 50 steps; its length may change by a few pairs


def state_tensors(opt) -> tuple[int, int]:
    seen, count, nbytes = set(), 0, 0

    def walk(obj):
        nonlocal count, nbytes
        if isinstance(obj, torch.Tensor):
            key = (obj.untyped_storage().data_ptr(), obj.storage_offset(), tuple(obj.shape))
            if key not in seen:
                seen.add(key)
                count += 1
                nbytes += obj.numel() * obj.element_size()
        elif isinstance(obj, dict):
            for v in obj.values():
                walk(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                walk(v)

    for state in opt.state.values():
        walk(state)
    return count, nbytes


def rss() -> int | None:
    try:
        import psutil
    except ImportError:
        return None
    return psutil.Process().memory_info().rss


@pytest.mark.slow
@pytest.mark.parametrize("cls", CLASSES, ids=[c.__name__ for c in CLASSES])
def test_memory_flat_over_2000_steps(cls):
    named = lora_params(cls, modules=4, rank=4, dim=32)
    params = [p for _, p in named]
    overrides = {"relationship_discovery_interval": 50} if cls in (AdamW_HinaAdaptive, AdamWBF16_HinaAdaptive) else {}
    if cls in (HinaAdamW, AdamW_HinaAdaptive):
        overrides["optim_bits"] = 32  # 32-bit states: the 8-bit codec is ~5x slower per step on CPU
    opt = make(cls, named, **overrides)
    grads = []
    for k in range(8):  # a few fixed gradient sets, cycled: no allocation from the test itself in the loop
        set_grads(params, k)
        grads.append([p.grad.clone() for p in params])

    def run(steps, start):
        for step in range(start, start + steps):
            for p, g in zip(params, grads[step % 8]):
                p.grad = g
            opt.step()
            if hasattr(opt, "observe_loss"):
                opt.observe_loss(1.0 / (1 + step))

    started = time.time()
    run(WARMUP, 0)
    gc.collect()
    count0, bytes0 = state_tensors(opt)
    rss0 = rss()
    py0 = len(gc.get_objects())
    run(STEPS - WARMUP, WARMUP)
    gc.collect()
    py1 = len(gc.get_objects())
    count1, bytes1 = state_tensors(opt)
    rss1 = rss()
    elapsed = time.time() - started

    assert opt.get_optimization_info()["training_stats"]["global_step"] == STEPS
    assert count1 <= count0 and bytes1 <= bytes0 + STATE_SLACK, \
        f"state grew: {count0} -> {count1} tensors, {bytes0} -> {bytes1} B"
    assert py1 - py0 < OBJ_BOUND, f"{py1 - py0} more Python objects after {STEPS - WARMUP} steps"
    if rss0 is not None:
        assert rss1 - rss0 < RSS_BOUND, f"RSS grew by {(rss1 - rss0) / 2**20:.1f} MiB"
    assert all(torch.isfinite(p.float()).all() for p in params)
    print(f"{cls.__name__}: {STEPS} steps in {elapsed:.1f} s; state {count1} tensors / {bytes1} B; "
          f"python objects {py1 - py0:+d}; rss " + (f"+{(rss1 - rss0) / 2**20:.2f} MiB" if rss0 is not None else "n/a"))
