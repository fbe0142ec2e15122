"""Recipes as declared stages: each technique declares its flags, states and per-tensor vectors beside its code.

A ``Stage`` is one step of an optimizer's pipeline (⊥Grad, AGR, Adam, TAM, ...). It declares, once:

- its flags (``Flag``): name, default, type, the rule a value must satisfy and that rule in words, a doc line;
- the flat states it keeps per element (``states(group, roles)``: (name, signed) pairs, stored by the codec)
  and the per-tensor vectors it keeps (``vectors(group)``: names of one float per tensor).

A named optimizer is a ``Recipe``: the ordered stages it runs plus its own defaults where they differ from the
stages' (optax's ``alias.py`` habit). Everything the optimizer class exposes comes from the recipe: the
constructor's signature (``inspect.signature``, ``help()``; ``--optimizer_args`` validation in registry.py reads
it too), the validation of every argument, ``optimizer.defaults``, ``feature_flags`` and ``state_specs``. Adding a
technique touches its stage and the recipes that use it, nothing else.

Seed names and defaults are kept (tests/test_registry.py holds the seed signatures). ``params`` and ``lr`` may be
passed by position, as in torch.optim; every other argument is keyword-only.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

#: ``min_8bit_size`` default of every 8-bit class: the smallest LoRA matrix of SD1.5/SDXL at rank 4 is
#: 4 x 320 = 1280 elements, so every rank-4..64 LoRA/LoKr matrix gets 8-bit states; smaller tensors (norm
#: deltas, scalars) keep fp32 states, where a 256-element block would cost more than it saves.
MIN_8BIT_SIZE = 1024

NO_STATES: Callable[[dict, list], list] = lambda group, roles: []  # noqa: E731
NO_VECTORS: Callable[[dict], list] = lambda group: []  # noqa: E731


@dataclass(frozen=True)
class Flag:
    """One constructor argument.

    ``check`` returns True for a valid value (``valid`` says the rule in words for the error message); ``convert``
    normalises a valid value (float, int, tuple). ``group``: the value is a param-group setting (in
    ``optimizer.defaults``, overridable per group); False: an optimizer-wide setting (``optimizer.settings``).
    ``feature``: reported by ``get_optimization_info()['features']``. ``label``: how the error names the flag, when
    not by its name. A check may raise its own ValueError where the rule needs a more precise message.
    """

    name: str
    default: Any
    annotation: str
    doc: str
    check: Callable[[Any], bool] | None = None
    valid: str = ""
    convert: Callable[[Any], Any] | None = None
    group: bool = True
    feature: bool = True
    label: str = ""

    def validate(self, value: Any) -> Any:
        if self.check is not None:
            try:
                ok = bool(self.check(value))
            except TypeError:
                ok = False
            if not ok:
                raise ValueError(f"Invalid {self.label or self.name}: {value!r} (valid: {self.valid})")
        return value if self.convert is None or value is None else self.convert(value)


@dataclass(frozen=True)
class Stage:
    """One technique of a recipe: its flags, the flat states and per-tensor vectors it keeps, and a check across
    its flags (``check(settings)``: raises ValueError where one flag's range depends on another; it may also set a
    value derived from others, e.g. a seed spelling that stands for a flag)."""

    name: str
    flags: tuple[Flag, ...] = ()
    states: Callable[[dict, list], list] = NO_STATES
    vectors: Callable[[dict], list] = NO_VECTORS
    check: Callable[[dict], None] | None = None


@dataclass(frozen=True)
class Recipe:
    """A named optimizer: its stages in the order they run, its own defaults where they differ from the stages',
    and ``fixed`` settings that are part of what the name means (not arguments, e.g. ``optim_bits`` of an 8-bit
    class)."""

    name: str
    stages: tuple[Stage, ...]
    defaults: Mapping[str, Any] = field(default_factory=dict)
    fixed: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        seen: dict[str, str] = {}
        for stage in self.stages:
            for flag in stage.flags:
                if flag.name in seen:
                    raise ValueError(f"recipe {self.name}: flag {flag.name!r} is declared by both "
                                     f"{seen[flag.name]} and {stage.name}")
                seen[flag.name] = stage.name
        unknown = sorted(set(self.defaults) - set(seen))
        if unknown:
            raise ValueError(f"recipe {self.name}: defaults for {unknown}, which no stage of it declares")

    @property
    def flags(self) -> tuple[Flag, ...]:
        return tuple(flag for stage in self.stages for flag in stage.flags)

    def default(self, flag: Flag) -> Any:
        return self.defaults.get(flag.name, flag.default)

    @property
    def feature_flags(self) -> tuple[str, ...]:
        return tuple(flag.name for flag in self.flags if flag.feature and flag.group)

    def signature(self) -> inspect.Signature:
        """``(self, params, lr, *, ...)``: the seed's names and this recipe's defaults, annotated with the types
        registry.py checks ``--optimizer_args`` against."""
        kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
        parameters = [inspect.Parameter("self", kind), inspect.Parameter("params", kind)]
        for flag in self.flags:
            parameters.append(inspect.Parameter(flag.name, kind, default=self.default(flag), annotation=flag.annotation))
            kind = inspect.Parameter.KEYWORD_ONLY
        return inspect.Signature(parameters)

    def settings(self, arguments: Mapping[str, Any]) -> dict[str, Any]:
        """Every flag's validated, converted value (``arguments`` bound to the signature, defaults applied), then
        the stages' cross-flag checks, then ``fixed``."""
        values = {flag.name: flag.validate(arguments[flag.name]) for flag in self.flags}
        for stage in self.stages:
            if stage.check is not None:
                stage.check(values)
        return {**values, **self.fixed}

    def state_specs(self, group: dict, roles: list) -> list[tuple[str, bool]]:
        return [spec for stage in self.stages for spec in stage.states(group, roles)]

    def vector_specs(self, group: dict) -> list[str]:
        return [name for stage in self.stages for name in stage.vectors(group)]

    def doc(self) -> str:
        """The Args section of the class docstring, one line per flag, grouped by stage."""
        lines = ["Args (in recipe order; seed names, this recipe's defaults):"]
        for stage in self.stages:
            for flag in stage.flags:
                lines.append(f"    {flag.name}={self.default(flag)!r}  [{stage.name}] {flag.doc}")
        return "\n".join(lines)


# --- checks and conversions used by several stages ---------------------------------------------------------------
def is_bool(value) -> bool:
    return isinstance(value, bool)


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def in_range(low: float | None = None, high: float | None = None, *, low_open=False, high_open=False):
    """A check: a number within [low, high] (either bound open, or absent)."""
    def check(value) -> bool:
        if not is_number(value) or value != value:
            return False
        if low is not None and (value <= low if low_open else value < low):
            return False
        return high is None or (value < high if high_open else value <= high)
    return check


def int_at_least(low: int):
    return lambda value: is_number(value) and float(value).is_integer() and value >= low


def tuple_of(length: int, item: str, low: float, high: float | None = None, *, high_open: bool = True):
    """A check: a tuple (or list) of ``length`` numbers in [low, high) (or [low, high]); an item out of range is
    named by its index."""
    within = in_range(low, high, high_open=high_open)
    rule = f"{low:g} <= {item} {'<' if high_open else '<='} {high:g}" if high is not None else f"{item} >= {low:g}"

    def check(value) -> bool:
        if not isinstance(value, (tuple, list)) or len(value) != length:
            return False
        for i, v in enumerate(value):
            if not within(v):
                raise ValueError(f"Invalid {item} at index {i}: {v!r} (valid: {rule})")
        return True
    return check


def float_tuple(value) -> tuple[float, ...]:
    return tuple(float(v) for v in value)


def flag_bool(name: str, default: bool, doc: str, **kw) -> Flag:
    return Flag(name, default, "bool", doc, is_bool, "True or False", bool, **kw)


# --- the stages every Hina optimizer has: learning rate, execution, state codec -------------------------------------
LR = Stage("learning rate", (
    Flag("lr", 1e-3, "float", "learning rate of the group (schedulers change group['lr'])",
         in_range(0.0), "a number >= 0", feature=False, label="learning rate"),
))

COMPILE = Stage("execution", (
    Flag("compile_step", None, "bool | None",
         "compile the chunk step with torch.compile: True, False, or None (auto: models of 1M+ elements)",
         lambda v: v is None or is_bool(v), "True, False, or None for auto",
         group=False, feature=False),
))

#: fp32 params kept in the optimizer's chunk buffers (base.py ``HinaOptimizer._make_resident``), on CPU. Off by default:
#: without the weights' gather and copy-back a step is 1.1x (8-bit states) to 1.4x (fp32) faster there, but glibc
#: then serves the step's chunk-sized temporaries from its heap (freeing the params' old storages raises its mmap
#: threshold), which held 0.2-0.45 B/param more at SDXL r32 (docs/step_speed_1thread.md: 3.00 against 2.79;
#: docs/step_speed.md: 3.0 against 2.7; session 11's run: 3.02 against 2.57). The bf16 optimizer (bf16 params, fp32
#: work copies) lacks it.
RESIDENT_WEIGHTS = Stage("weight residency", (
    flag_bool("resident_weights", False, "CPU: keep fp32 params in the optimizer's chunk buffers (each param's data "
              "moves into one, as a tensor of its own), so a step neither gathers nor copies back the weights; faster, "
              "at some host memory (docs/step_speed.md)", group=False, feature=False),
))

BLOCK_SIZES = (64, 128, 256, 512, 1024, 2048, 4096)


def codec_flags(block_size: int) -> tuple[Flag, ...]:
    """``block_size`` (with this default) and ``min_8bit_size``: the 8-bit codec's settings."""
    return (
        Flag("block_size", block_size, "int", "8-bit quantisation block (elements per absmax)",
             lambda v: is_number(v) and v in BLOCK_SIZES, ", ".join(map(str, BLOCK_SIZES)), int,
             group=False, feature=False),
        Flag("min_8bit_size", MIN_8BIT_SIZE, "int", "smaller tensors keep fp32 states (1024: every rank-4..64 "
             "LoRA/LoKr matrix is quantised)", int_at_least(0), "an int >= 0", int, group=False, feature=False),
    )


#: ``optim_bits`` chooses the codec: 8-bit blockwise (bitsandbytes' dynamic map, plain torch) or fp32.
CODEC = Stage("state codec", (
    Flag("optim_bits", 8, "int", "8 (blockwise 8-bit states) or 32 (fp32 states)",
         lambda v: is_number(v) and v in (8, 32), "8 or 32", int, group=False, feature=False),
    *codec_flags(256),
))
