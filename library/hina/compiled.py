"""Optional ``torch.compile`` of an optimizer's elementwise hot path, with a safe eager fallback.

An optimizer step is memory-bound: eagerly, each technique is several passes over the state; compiled,
inductor fuses the chain into a few loops (about 7x faster on a 2-core CPU for HinaAdamW's defaults,
see benchmarks/step_speed.py). Compiling needs a working backend (a C++ compiler on CPU, Triton on
CUDA); if compiling fails, the step runs eagerly from then on and says so once.

``compile_step``: True (always), False (never), None (auto: models of at least ``AUTO_MIN_ELEMENTS``).

Shapes are static (``dynamic=False``: dynamic shapes made the CPU kernels ~20x slower), so every chunk of a
new shape is a new compiled version (base.py pads chunks to a few shapes to keep that number small), and torch keeps at most ``torch._dynamo.config.recompile_limit`` (8)
versions of a function; past that, dynamo would silently run the function eagerly. ``MaybeCompiled``
keeps that count itself: calls with a signature beyond the limit run eagerly, said once in a warning,
and ``compiled_calls``/``eager_calls`` count what really ran. (Many param groups, e.g. kohya's block-wise
learning rates, give many packs.)
"""

from __future__ import annotations

import gc
import logging
import time
import warnings
from typing import Callable

import torch

AUTO_MIN_ELEMENTS = 1 << 20
logger = logging.getLogger(__name__)
_announced = False  # the once-per-process notice that the first steps compile
# Inductor stores a pointwise value in a buffer of its own once its expression passes 100 operations
# (``realize_opcount_threshold``). The 8-bit encode is about 130 per element, so every 8-bit state got two
# chunk-sized buffers (codes, then the select that keeps skipped blocks) written and read back; above the
# encode's size it is computed where it is stored. Measured (SDXL r32, 1 thread, warm inductor cache, steady peak
# per parameter as benchmarks/step_speed.py takes it, two runs each): HinaAdamW 8-bit defaults 2.98, 2.98 -> 2.69,
# 2.49 bytes; Automagic_CameAMP8bit 4.60 -> 4.03 (one run); step time unchanged (paired in-process A/B at SD1.5 r16:
# 0.99-1.01x for HinaAdamW 8-bit, Automagic_CameAMP8bit and AdamW_HinaAdaptive).
INDUCTOR_OPTIONS = {"realize_opcount_threshold": 400}


def inductor_options(extra: dict | None = None) -> dict:
    """``INDUCTOR_OPTIONS`` (and ``extra`` on top) that this torch's inductor knows (an unknown key would make every
    compile fail and the step run eagerly)."""
    import torch._inductor.config as config

    return {key: value for key, value in {**INDUCTOR_OPTIONS, **(extra or {})}.items() if hasattr(config, key)}


def options_known(options: dict) -> bool:
    """Whether this torch's inductor knows every key of ``options``: a function whose results depend on one (not
    only its speed) must run eagerly where it does not."""
    return set(options) <= set(inductor_options(options))


_INSTANCES: list["MaybeCompiled"] = []


def compiled_graph_count() -> int:
    """Distinct input signatures compiled so far, over every optimizer step function of this process."""
    return sum(len(f._signatures) for f in _INSTANCES if f.compiled_calls)


class MaybeCompiled:
    """Calls ``fn`` through ``torch.compile`` when asked to, falling back to eager on a compile error. ``options``:
    inductor options of this function on top of ``INDUCTOR_OPTIONS``; ``needs_options``: the function's results,
    not only its speed, depend on them, so it runs eagerly on a torch whose inductor lacks one (``options_known``)."""

    def __init__(self, fn: Callable, options: dict | None = None, needs_options: bool = False):
        self.fn = fn
        self.options = options or {}
        self.needs_options = needs_options  # results, not only speed, depend on the options: eager without them
        self._compiled = None
        self.failed: str | None = None
        self.compiled_calls = 0
        self.eager_calls = 0
        self._signatures: set = set()
        self._compiled_signatures: set = set()  # signatures whose compile has run (collected after)
        self._warned_limit = False
        _INSTANCES.append(self)

    def wanted(self, compile_step: bool | None, numel: int) -> bool:
        if self.failed or compile_step is False:
            return False
        return compile_step is True or numel >= AUTO_MIN_ELEMENTS

    def __call__(self, use_compile: bool, *args, **kwargs):
        usable = not self.failed and (not self.needs_options or options_known(self.options))
        signature = _signature((args, kwargs)) if use_compile and usable else None
        if signature is not None and self._within_limit(signature):
            if self._compiled is None:
                self._compiled = torch.compile(self.fn, dynamic=False, options=inductor_options(self.options))
            compiling = signature not in self._compiled_signatures
            if compiling:
                announce_compiling()
                started = time.perf_counter()
            try:
                result = self._compiled(*args, **kwargs)
                self.compiled_calls += 1
                if compiling:
                    self._compiled_signatures.add(signature)
                    logger.info("library.hina: compiled the optimizer step's %s (version %d of it) in %.1f s",
                                self.fn.__name__, len(self._compiled_signatures), time.perf_counter() - started)
                    # Compiling leaves cyclic garbage (FX graphs, lowering state: tens of MB) that Python's
                    # generational collector frees only much later; until then it sits in the step's steady
                    # memory (SD1.5 LoRA r16, cold inductor cache: 13.5 -> 9.0 bytes per parameter,
                    # benchmarks/step_speed.py). Once per new graph, so it costs nothing per step.
                    collect_garbage()
                return result
            except Exception as error:  # compile-time failure: no input was touched yet
                self.failed = f"{type(error).__name__}: {error}"
                warnings.warn(f"torch.compile of the optimizer step failed, running eagerly instead "
                              f"({self.failed.splitlines()[0][:200]})", RuntimeWarning, stacklevel=3)
        self.eager_calls += 1
        return self.fn(*args, **kwargs)

    def _within_limit(self, signature) -> bool:
        if signature in self._signatures:
            return True
        limit = recompile_limit()
        if len(self._signatures) < limit:
            self._signatures.add(signature)
            return True
        if not self._warned_limit:
            self._warned_limit = True
            warnings.warn(f"torch.compile keeps {limit} versions of the optimizer step ({self.fn.__name__}) and "
                          "this optimizer has more parameter packs of distinct sizes (param groups x state "
                          "layouts): those step eagerly, which is correct but slower. Fewer param groups, "
                          "compile_step=False, or a higher torch._dynamo.config.recompile_limit avoid this.",
                          RuntimeWarning, stacklevel=3)
        return False


def announce_compiling() -> None:
    """Say once per process, before the first compile, why the first steps take longer (a CPU run can sit on its
    first step for a minute: benchmarks/step_speed.py's *first step s*)."""
    global _announced
    if not _announced:
        _announced = True
        logger.info("library.hina: compiling the optimizer step with torch.compile: the first steps take longer "
                    "(seconds to a minute per compiled version on a CPU; a later run with the same parameter shapes "
                    "reuses inductor's on-disk cache). compile_step=False in --optimizer_args skips compiling.")


def collect_garbage() -> None:
    """A full collection of Python's cyclic garbage (after a compile)."""
    gc.collect()


def recompile_limit() -> int:
    """How many compiled versions torch keeps per function (``recompile_limit``, ``cache_size_limit`` before)."""
    import torch._dynamo

    config = torch._dynamo.config
    return int(getattr(config, "recompile_limit", getattr(config, "cache_size_limit", 8)))


def _signature(value):
    """What a static-shape compile specialises on: tensor shapes, dtypes, devices; plain values as they are."""
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype, value.device.type)
    if isinstance(value, (tuple, list)):
        return tuple(_signature(v) for v in value)
    if isinstance(value, dict):
        return tuple((k, _signature(v)) for k, v in sorted(value.items()))
    return value
