"""Optimizer names -> real classes: the Hina suite, kohya's ``--optimizer_type`` list, HF ``optim`` names.

``OPTIMIZERS`` below is the single table of names. Each entry points at the class in the library that
implements it (torch.optim, bitsandbytes, transformers, schedulefree, ...): nothing here re-implements an
optimizer. Names are case-insensitive; a dotted ``module.Class`` path works too, as in sd-scripts.

Classes are looked up when an optimizer is built, never at import: a missing library fails then with the
pip package to install, a missing device (CUDA, XLA, NPU) with what is needed, and a Hina optimizer that
this version of ``library.hina`` does not have yet with its name.

``optimizer_args`` follow kohya: ``"key=value"`` split at the first ``=``, the value read by
``ast.literal_eval`` (so a string needs quotes). Keys and value types are checked against the
constructor's signature before anything is built.
"""

from __future__ import annotations

import ast
import difflib
import re
import importlib
import importlib.util
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import torch

HINA = __package__ or "library.hina"  # "library.hina", also when copied into an sd-scripts checkout


class OptimizerArgsError(ValueError):
    """An ``--optimizer_args`` item that cannot be parsed or does not fit the optimizer's signature."""


class UnknownOptimizerError(ValueError):
    """A name that is neither in the table nor an importable ``module.Class`` path."""


class OptimizerUnavailableError(ImportError):
    """The name is known but cannot be built here: its library (or Hina class) is not installed."""


class MissingHardwareError(OptimizerUnavailableError):
    """The name is known but needs a device (CUDA, XLA, NPU) or a CUDA-only build that is absent."""


@dataclass(frozen=True)
class OptimizerSpec:
    """One row of the table: a name, its aliases, and the class that implements it."""

    name: str
    target: str                       # "module:Class"
    package: str | None               # pip package providing the module (None: torch, bnb, transformers, ours)
    source: str                       # "hina", "kohya" (sd-scripts' --optimizer_type) or "hf" (Trainer optim)
    aliases: tuple[str, ...] = ()
    defaults: Mapping[str, Any] = field(default_factory=dict)  # used unless optimizer_args say otherwise
    fixed: Mapping[str, Any] = field(default_factory=dict)     # part of what the name means; not overridable
    needs: str | None = None          # "cuda", "xla", "npu", "apex"
    takes_model: bool = False         # LOMO: built from the nn.Module, stepped by fused_backward(loss, lr)
    layerwise: bool = False           # HF *_layerwise: one optimizer per tensor, stepped from a grad hook
    group_keys: Mapping[str, Any] = field(default_factory=dict)  # GaLore/APOLLO: keys of 2-D param groups
    sd_scripts_builtin: tuple[str, ...] = ()  # spellings sd-scripts' get_optimizer resolves by itself
    install_hint: str | None = None   # when the package is not a plain `pip install`

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)


def _kohya(name, target, package=None, *, aliases=(), builtin=(), **kw) -> OptimizerSpec:
    """A name from sd-scripts' ``--optimizer_type`` list; ``builtin=None``: listed there, but its
    ``get_optimizer`` has no branch for it (it would look the name up in ``torch.optim`` and fail)."""
    resolved_by_sd_scripts = () if builtin is None else (name, *builtin)
    return OptimizerSpec(name, target, package, "kohya", tuple(aliases), sd_scripts_builtin=resolved_by_sd_scripts,
                         **kw)


def _hf(name, target, package=None, **kw) -> OptimizerSpec:
    return OptimizerSpec(name, target, package, "hf", **kw)


def _hina(name, cls, aliases=()) -> OptimizerSpec:
    return OptimizerSpec(name, f"{HINA}:{cls}", None, "hina", tuple(aliases))


BNB = "bitsandbytes.optim"
_NO_RELATIVE_STEP = {"scale_parameter": False, "relative_step": False, "warmup_init": False}
_GALORE_GROUP = {"rank": 128, "update_proj_gap": 200, "scale": 0.25, "proj_type": "std"}
# transformers gives the projected group its adam_kwargs too (APOLLOAdamW's own eps is 1e-6)
_APOLLO_GROUP = {"rank": 128, "proj": "random", "scale_type": "channel", "update_proj_gap": 200, "scale": 1.0,
                 "proj_type": "std", "betas": (0.9, 0.999), "eps": 1e-8}
# TrainingArguments' adam_beta1, adam_beta2, adam_epsilon defaults, which Trainer passes to these classes
_HF_ADAM = {"betas": (0.9, 0.999), "eps": 1e-8}
_HF_LION = {"betas": (0.9, 0.999)}

OPTIMIZERS: tuple[OptimizerSpec, ...] = (
    # --- the Hina suite (library.hina) ----------------------------------------------------------------------
    _hina("HinaAdamW", "HinaAdamW", ("HinaAdamWOptimizer", "HinaAdamWOptimizer8bit", "CustomAdamW")),
    _hina("AdamW_HinaAdaptive", "AdamW_HinaAdaptive", ("AdaptiveHinaAdamW", "HinaAdaptiveAdamW8bit", "HinaAdaptive")),
    _hina("AdamWBF16_HinaAdaptive", "AdamWBF16_HinaAdaptive", ("HinaAdaptiveAdamWBF16",)),
    _hina("Automagic_CameAMP", "Automagic_CameAMP"),
    _hina("Automagic_CameAMP8bit", "Automagic_CameAMP8bit"),
    _hina("Automagic_CameAMP_COptim", "Automagic_CameAMP_COptim"),
    _hina("Automagic_CameAMP_COptim8bit", "Automagic_CameAMP_COptim8bit"),
    # --- kohya sd-scripts --optimizer_type (HF spellings of the same optimizer as aliases) ------------------
    _kohya("AdamW", "torch.optim:AdamW", aliases=("adamw_torch",)),
    _kohya("AdamW8bit", f"{BNB}:AdamW8bit", aliases=("adamw_bnb_8bit", "adamw_8bit")),
    _kohya("PagedAdamW", f"{BNB}:PagedAdamW"),
    _kohya("PagedAdamW8bit", f"{BNB}:PagedAdamW8bit", aliases=("paged_adamw_8bit",)),
    _kohya("PagedAdamW32bit", f"{BNB}:PagedAdamW32bit", aliases=("paged_adamw_32bit",)),
    _kohya("SGDNesterov", "torch.optim:SGD", defaults={"momentum": 0.9}, fixed={"nesterov": True}),
    _kohya("SGDNesterov8bit", f"{BNB}:SGD8bit", defaults={"momentum": 0.9}, fixed={"nesterov": True}),
    _kohya("Lion", "lion_pytorch:Lion", "lion-pytorch"),
    _kohya("Lion8bit", f"{BNB}:Lion8bit"),
    _kohya("PagedLion8bit", f"{BNB}:PagedLion8bit"),
    # sd-scripts' help lists these two but its get_optimizer has no branch for them (48d368fa): built here.
    _kohya("AdEMAMix8bit", f"{BNB}:AdEMAMix8bit", aliases=("ademamix_8bit",), builtin=None),
    _kohya("PagedAdEMAMix8bit", f"{BNB}:PagedAdEMAMix8bit", aliases=("paged_ademamix_8bit",), builtin=None),
    _kohya("DAdaptation", "dadaptation.experimental:DAdaptAdamPreprint", "dadaptation",
           aliases=("DAdaptAdamPreprint",), builtin=("DAdaptAdamPreprint",)),
    _kohya("DAdaptAdaGrad", "dadaptation:DAdaptAdaGrad", "dadaptation"),
    _kohya("DAdaptAdam", "dadaptation:DAdaptAdam", "dadaptation"),
    _kohya("DAdaptAdan", "dadaptation:DAdaptAdan", "dadaptation"),
    _kohya("DAdaptAdanIP", "dadaptation.experimental:DAdaptAdanIP", "dadaptation"),
    _kohya("DAdaptLion", "dadaptation:DAdaptLion", "dadaptation"),
    _kohya("DAdaptSGD", "dadaptation:DAdaptSGD", "dadaptation"),
    _kohya("Prodigy", "prodigyopt:Prodigy", "prodigyopt"),
    # kohya's Adafactor defaults to relative_step=True (lr ignored); here an lr is always given, so the
    # HF Trainer settings apply. Inside sd-scripts the kohya spelling falls through to its own handling.
    _kohya("Adafactor", "transformers.optimization:Adafactor", defaults=_NO_RELATIVE_STEP),
    _kohya("RAdamScheduleFree", "schedulefree:RAdamScheduleFree", "schedulefree", aliases=("schedule_free_radam",)),
    _kohya("AdamWScheduleFree", "schedulefree:AdamWScheduleFree", "schedulefree", aliases=("schedule_free_adamw",)),
    _kohya("SGDScheduleFree", "schedulefree:SGDScheduleFree", "schedulefree", aliases=("schedule_free_sgd",)),
    # --- HF transformers TrainingArguments.optim identifiers ---------------------------------------------
    _hf("adamw_torch_fused", "torch.optim:AdamW", fixed={"fused": True}),
    _hf("adamw_torch_xla", "torch_xla.amp.syncfree:AdamW", "torch-xla", needs="xla"),
    _hf("adamw_torch_npu_fused", "torch_npu.optim:NpuFusedAdamW", "torch-npu", needs="npu"),
    _hf("adamw_apex_fused", "apex.optimizers:FusedAdam", None, needs="apex",
        install_hint="NVIDIA apex built from source with its CUDA extensions (the PyPI package 'apex' is "
                     "an unrelated project)"),
    _hf("adamw_anyprecision", "torchdistx.optimizers:AnyPrecisionAdamW", None,
        install_hint="torchdistx, which is not on PyPI (build it from the pytorch/torchdistx repository)"),
    _hf("adamw_torch_4bit", "torchao.optim:AdamW4bit", "torchao", defaults={"block_size": 256}),  # torchao: 128
    _hf("adamw_torch_8bit", "torchao.optim:AdamW8bit", "torchao", defaults={"block_size": 256}),
    # transformers passes Lion its adam_beta1/adam_beta2 (0.9, 0.999); bitsandbytes' own default is (0.9, 0.99),
    # which kohya's Lion8bit/PagedLion8bit keep. The HF spellings mean what Trainer(optim=...) builds.
    _hf("lion_8bit", f"{BNB}:Lion8bit", defaults=_HF_LION),
    _hf("paged_lion_8bit", f"{BNB}:PagedLion8bit", defaults=_HF_LION),
    _hf("lion_32bit", f"{BNB}:Lion32bit", defaults=_HF_LION),
    _hf("paged_lion_32bit", f"{BNB}:PagedLion32bit", defaults=_HF_LION),
    # Trainer builds bnb.optim.AdEMAMix(optim_bits=32), which steps on the CPU too (paged falls back to plain).
    _hf("ademamix", f"{BNB}:AdEMAMix", fixed={"optim_bits": 32, "is_paged": False}),
    _hf("paged_ademamix_32bit", f"{BNB}:AdEMAMix", fixed={"optim_bits": 32, "is_paged": True}),
    _hf("galore_adamw", "galore_torch:GaLoreAdamW", "galore-torch", group_keys=_GALORE_GROUP),
    _hf("galore_adamw_8bit", "galore_torch:GaLoreAdamW8bit", "galore-torch", group_keys=_GALORE_GROUP, needs="cuda"),
    _hf("galore_adafactor", "galore_torch:GaLoreAdafactor", "galore-torch", group_keys=_GALORE_GROUP,
        defaults=_NO_RELATIVE_STEP),
    _hf("galore_adamw_layerwise", "galore_torch:GaLoreAdamW", "galore-torch", group_keys=_GALORE_GROUP,
        layerwise=True),
    _hf("galore_adamw_8bit_layerwise", "galore_torch:GaLoreAdamW8bit", "galore-torch", group_keys=_GALORE_GROUP,
        layerwise=True, needs="cuda"),
    _hf("galore_adafactor_layerwise", "galore_torch:GaLoreAdafactor", "galore-torch", group_keys=_GALORE_GROUP,
        defaults=_NO_RELATIVE_STEP, layerwise=True),
    _hf("apollo_adamw", "apollo_torch:APOLLOAdamW", "apollo-torch", group_keys=_APOLLO_GROUP),
    _hf("apollo_adamw_layerwise", "apollo_torch:APOLLOAdamW", "apollo-torch", group_keys=_APOLLO_GROUP,
        layerwise=True),
    _hf("sgd", "torch.optim:SGD"),
    _hf("adagrad", "torch.optim:Adagrad"),
    _hf("rmsprop", "torch.optim:RMSprop"),
    _hf("rmsprop_bnb", f"{BNB}:RMSprop"),
    _hf("rmsprop_bnb_8bit", f"{BNB}:RMSprop8bit"),
    _hf("rmsprop_bnb_32bit", f"{BNB}:RMSprop32bit"),
    _hf("lomo", "lomo_optim:Lomo", "lomo-optim", takes_model=True),
    _hf("adalomo", "lomo_optim:AdaLomo", "lomo-optim", takes_model=True, needs="cuda"),
    _hf("grokadamw", "grokadamw:GrokAdamW", "grokadamw"),
    # optimi's own defaults are (0.9, 0.99), 1e-6, 1e-2; Trainer passes its adam_* and weight_decay (0.0)
    _hf("stable_adamw", "optimi:StableAdamW", "torch-optimi", defaults={**_HF_ADAM, "weight_decay": 0.0}),
)

_BY_NAME: dict[str, OptimizerSpec] = {}
for _spec in OPTIMIZERS:
    for _name in _spec.names:
        if _name.lower() in _BY_NAME:
            raise RuntimeError(f"optimizer name {_name!r} is listed twice in the registry table")
        _BY_NAME[_name.lower()] = _spec

_NEEDS_TEXT = {
    "cuda": "a CUDA GPU (this build of the library is CUDA-only)",
    "xla": "an XLA device (TPU) and the torch-xla package",
    "npu": "an Ascend NPU and the torch-npu package",
    "apex": "a CUDA GPU and NVIDIA apex",
}


# ----------------------------------------------------------------------------------------------------------
# lookup
def find_spec(name: str) -> OptimizerSpec | None:
    """The table entry for ``name`` (case-insensitive), or None."""
    return _BY_NAME.get(str(name).strip().lower())


def all_names() -> list[str]:
    return [n for spec in OPTIMIZERS for n in spec.names]


def _unknown(name: str) -> UnknownOptimizerError:
    display = {n.lower(): n for n in all_names()}
    close = difflib.get_close_matches(str(name).lower(), list(display), n=5, cutoff=0.5)
    hint = ", ".join(display[c] for c in close)
    return UnknownOptimizerError(
        f"Unknown optimizer {name!r}" + (f"; closest names: {hint}" if hint else "")
        + ". available_optimizers() lists every name; a dotted 'module.Class' path also works.")


def _hardware_missing(needs: str | None) -> bool:
    if needs is None:
        return False
    if needs in ("cuda", "apex"):
        return not torch.cuda.is_available()
    if needs == "xla":
        return importlib.util.find_spec("torch_xla") is None
    if needs == "npu":
        return importlib.util.find_spec("torch_npu") is None
    raise ValueError(f"unknown device requirement {needs!r}")


def load_class(spec: OptimizerSpec) -> type:
    """Import the class behind ``spec``, with a clear error when it cannot be built here."""
    if _hardware_missing(spec.needs):
        raise MissingHardwareError(f"Optimizer {spec.name!r} ({spec.target.replace(':', '.')}) needs "
                                   f"{_NEEDS_TEXT[spec.needs]}, which this machine does not have.")
    module_name, class_name = spec.target.split(":")
    if spec.source == "hina":
        package = importlib.import_module(module_name)
        cls = getattr(package, class_name, None)  # looked up now: others land their classes later
        if cls is None:
            have = [s.name for s in OPTIMIZERS if s.source == "hina" and hasattr(package, s.target.split(":")[1])]
            raise OptimizerUnavailableError(
                f"Optimizer {spec.name!r}: {module_name} has no class {class_name} in this version "
                f"(Hina optimizers available here: {', '.join(have) or 'none'}).")
        return cls
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        how = spec.install_hint or f"pip install {spec.package or module_name.split('.')[0]}"
        raise OptimizerUnavailableError(
            f"Optimizer {spec.name!r} needs the module {module_name!r}, which is not installed "
            f"({error}); install it with: {how}") from error
    cls = getattr(module, class_name, None)
    if cls is None:
        raise OptimizerUnavailableError(
            f"Optimizer {spec.name!r}: {module_name} has no {class_name}; the installed "
            f"{spec.package or module_name.split('.')[0]} is too old or too new for it (pip install -U ...).")
    return cls


def resolve(name: str) -> tuple[OptimizerSpec | None, type]:
    """``(spec, class)`` for a table name or a dotted ``module.Class`` path (spec None for a path)."""
    if not isinstance(name, str) or not name.strip():
        raise UnknownOptimizerError(f"Optimizer name must be a non-empty string, got {name!r}")
    spec = find_spec(name)
    if spec is not None:
        return spec, load_class(spec)
    if "." in name:
        module_name, _, class_name = name.strip().rpartition(".")
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:
            raise UnknownOptimizerError(f"Optimizer path {name!r}: cannot import {module_name!r} ({error})") from error
        cls = getattr(module, class_name, None)
        if not isinstance(cls, type):
            raise UnknownOptimizerError(f"Optimizer path {name!r}: {module_name} has no class {class_name!r}")
        return None, cls
    raise _unknown(name)


def available_optimizers() -> list[dict]:
    """Every name in the table: its class path, aliases, source, and whether it can be built here."""
    rows = []
    for spec in OPTIMIZERS:
        try:
            load_class(spec)
            ok, reason = True, None
        except OptimizerUnavailableError as error:
            ok, reason = False, str(error)
        rows.append({"name": spec.name, "aliases": list(spec.aliases), "target": spec.target.replace(":", "."),
                     "source": spec.source, "package": spec.package, "available": ok, "reason": reason})
    return rows


# ----------------------------------------------------------------------------------------------------------
# optimizer_args
def split_optimizer_args(optimizer_args: Iterable[str] | Mapping[str, Any] | None) -> dict[str, Any]:
    """kohya parsing only: ``["k=v", ...]`` -> dict, split at the first ``=``, ``ast.literal_eval`` values."""
    if optimizer_args is None:
        return {}
    if isinstance(optimizer_args, Mapping):
        return dict(optimizer_args)
    if isinstance(optimizer_args, str):
        optimizer_args = optimizer_args.split()
    result: dict[str, Any] = {}
    for item in optimizer_args:
        if not isinstance(item, str):
            raise OptimizerArgsError(f"optimizer_args items must be 'key=value' strings, got {item!r}")
        if "=" not in item:
            raise OptimizerArgsError(f"optimizer_args item {item!r} has no '=': write it as key=value, "
                                     f"e.g. weight_decay=0.01")
        key, _, text = item.partition("=")
        key = key.strip()
        if not key.isidentifier():
            raise OptimizerArgsError(f"optimizer_args item {item!r}: {key!r} is not a valid argument name")
        try:
            value = ast.literal_eval(text.strip())
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError) as error:
            raise OptimizerArgsError(
                f"optimizer_args {key}={text!r}: not a Python literal ({type(error).__name__}); numbers and "
                f"True/False are written as is, a string needs quotes (e.g. {key}='value'), a tuple as (a, b)"
            ) from None
        if key in result:
            raise OptimizerArgsError(f"optimizer_args gives {key!r} twice ({result[key]!r} and {value!r})")
        result[key] = value
    return result


def _constructor_parameters(cls: type) -> tuple[dict[str, inspect.Parameter], bool]:
    """Keyword parameters of ``cls.__init__`` (minus self/params) and whether it takes ``**kwargs``."""
    try:
        signature = inspect.signature(cls.__init__)
    except (TypeError, ValueError):
        return {}, True
    params, var_kw = {}, False
    for index, (name, p) in enumerate(signature.parameters.items()):
        if p.kind is p.VAR_KEYWORD:
            var_kw = True
        elif p.kind is not p.VAR_POSITIONAL and index > 0 and name not in ("params", "model"):
            params[name] = p
    return params, var_kw


def _type_error(key: str, value: Any, expected: str) -> OptimizerArgsError:
    return OptimizerArgsError(f"optimizer_args {key}={value!r}: expected {expected}, got {type(value).__name__}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _annotation_text(annotation: Any) -> str:
    if annotation is inspect.Parameter.empty:
        return ""
    return annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))


# ``x: T | None = None`` parameters: what a non-None value of T must satisfy, and how to say it
_OPTIONAL_CHECKS = {
    "float": (_is_number, "a number or None"),
    "int": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an int or None"),
    "bool": (lambda v: isinstance(v, bool), "True, False or None"),
    "str": (lambda v: isinstance(v, str), "a quoted string or None"),
}


def check_value(key: str, value: Any, default: Any, annotation: Any = inspect.Parameter.empty) -> None:
    """The value must have the type of the constructor's default (ints are accepted for floats).

    An int default only demands an int when the parameter is annotated ``int``: third-party optimizers
    often write ``momentum=0`` for a float.
    """
    if default is None:
        # ``x: float | None = None``: None, or a value of the annotated type
        kinds = {part.strip() for part in _annotation_text(annotation).split("|")} - {"None"}
        if value is None or len(kinds) != 1 or (kind := kinds.pop()) not in _OPTIONAL_CHECKS:
            return
        accepts, expected = _OPTIONAL_CHECKS[kind]
        if not accepts(value):
            raise _type_error(key, value, expected)
        return
    if default is inspect.Parameter.empty or isinstance(default, torch.Tensor):
        return
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise _type_error(key, value, "True or False")
    elif isinstance(default, int):
        if _annotation_text(annotation) == "int":
            if not isinstance(value, int) or isinstance(value, bool):
                raise _type_error(key, value, "an int")
        elif not _is_number(value):
            raise _type_error(key, value, "a number")
    elif isinstance(default, float):
        if not _is_number(value):
            raise _type_error(key, value, "a number")
    elif isinstance(default, str):
        if not isinstance(value, str):
            raise _type_error(key, value, "a quoted string")
    elif isinstance(default, (tuple, list)):
        if not isinstance(value, (tuple, list)):
            raise _type_error(key, value, f"a tuple of {len(default)} like {tuple(default)!r}")
        if len(value) != len(default):
            raise OptimizerArgsError(f"optimizer_args {key}={value!r}: expected a tuple of {len(default)} "
                                     f"values like {tuple(default)!r}, got {len(value)}")
        for item, item_default in zip(value, default):
            if _is_number(item_default) and not _is_number(item):
                raise _type_error(key, value, f"a tuple of {len(default)} numbers like {tuple(default)!r}")


def parse_optimizer_args(optimizer_args: Iterable[str] | Mapping[str, Any] | None,
                         optimizer: str | type | None = None) -> dict[str, Any]:
    """Parse kohya ``"k=v"`` items (or take a dict) and check them against ``optimizer``'s constructor.

    ``optimizer`` is a registry name, a dotted path or a class; without it only the parsing is done.
    Raises ``OptimizerArgsError`` (a ValueError) naming the bad key or value and what would be valid.
    """
    kwargs = split_optimizer_args(optimizer_args)
    if optimizer is None:
        return kwargs
    spec, cls = (None, optimizer) if isinstance(optimizer, type) else resolve(optimizer)
    validate_kwargs(kwargs, cls, spec)
    return kwargs


def validate_kwargs(kwargs: Mapping[str, Any], cls: type, spec: OptimizerSpec | None = None) -> None:
    params, var_kw = _constructor_parameters(cls)
    label = spec.name if spec else f"{cls.__module__}.{cls.__name__}"
    group_keys = dict(spec.group_keys) if spec else {}
    for key, value in kwargs.items():
        if key == "lr":
            raise OptimizerArgsError(f"optimizer_args lr={value!r}: set the learning rate with --learning_rate "
                                     f"(or create_optimizer's lr), not in optimizer_args")
        if spec and key in spec.fixed:
            raise OptimizerArgsError(f"optimizer_args {key}={value!r}: {label} always uses "
                                     f"{key}={spec.fixed[key]!r}; that is what the name means")
        if key in group_keys:
            check_value(key, value, group_keys[key])
            continue
        if key == TARGET_MODULES_KEY and group_keys:
            if not (isinstance(value, str) or (isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value))):
                raise _type_error(key, value, "a regex string, 'all-linear' or a list of module names")
            continue
        if key not in params:
            if var_kw:
                continue
            valid = sorted(k for k in (*params, *group_keys, *([TARGET_MODULES_KEY] if group_keys else []))
                           if k != "lr")
            close = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
            raise OptimizerArgsError(
                f"optimizer_args: {label} has no argument {key!r}"
                + (f"; did you mean {', '.join(close)}?" if close else "")
                + f" Valid keys: {', '.join(valid)}")
        check_value(key, value, params[key].default, params[key].annotation)


# ----------------------------------------------------------------------------------------------------------
# building
class LayerwiseOptimizer(torch.optim.Optimizer):
    """HF's ``*_layerwise`` mode: one inner optimizer per tensor, stepped as soon as its gradient is ready.

    ``step()`` does nothing (the hooks did the work); the groups' ``lr`` is copied to the inner optimizers
    on each hook, so lr schedulers on this optimizer still apply.
    """

    def __init__(self, params, inner_cls: type, lr: float, **kwargs):
        super().__init__(params, {"lr": lr})
        self.inner: dict[torch.Tensor, tuple[dict, torch.optim.Optimizer]] = {}
        for group in self.param_groups:
            extra = {k: v for k, v in group.items() if k not in ("params", "lr", "param_names")}
            for p in group["params"]:
                self.inner[p] = (group, inner_cls([{"params": [p], **extra}], lr=group["lr"], **kwargs))
                if p.requires_grad:
                    p.register_post_accumulate_grad_hook(self._step_one)

    def _step_one(self, p: torch.Tensor) -> None:
        group, inner = self.inner[p]
        for inner_group in inner.param_groups:
            inner_group["lr"] = group["lr"]
        inner.step()
        inner.zero_grad(set_to_none=True)

    def step(self, closure=None):
        return closure() if closure is not None else None


TARGET_MODULES_KEY = "optim_target_modules"  # GaLore/APOLLO: which layers to project (TrainingArguments' name)


def target_module_matches(targets: str | Iterable[str], module_name: str) -> bool:
    """transformers' ``check_target_module_exists`` rules: a string is a regex (full match) or "all-linear";
    a list matches a name in it, a name containing one of its items, or one of its items as a full regex."""
    if isinstance(targets, str):
        return targets.replace("_", "-") == "all-linear" or bool(re.fullmatch(targets, module_name))
    targets = list(targets)
    return (module_name in targets or any(t in module_name for t in targets)
            or any(re.fullmatch(t, module_name) for t in targets))


def _projection_rule(targets) -> Callable[[str | None, torch.Tensor], bool]:
    """Which tensors GaLore/APOLLO project: without ``optim_target_modules`` every 2-D tensor; with it, the
    2-D ``<module>.weight`` tensors whose module matches (names needed: a nameless tensor is not projected)."""
    if targets is None:
        return lambda name, p: p.dim() == 2

    def chosen(name, p):
        if p.dim() != 2 or not name or not name.endswith(".weight"):
            return False
        return target_module_matches(targets, name[: -len(".weight")])

    return chosen


def _with_group_keys(params: Any, keys: Mapping[str, Any], projected: Callable[[str | None, torch.Tensor], bool]) -> list:
    """GaLore/APOLLO: put ``keys`` on the tensors ``projected`` chooses, in their own groups.

    Works on a tensor list and on param-group dicts (the kohya hook, ``hf`` and ``create_optimizer([{...}])``
    pass dicts): each group is split into its plain part and its projected part, both keeping the group's
    other settings (lr, weight_decay, param_names).
    """
    items = list(params)
    groups = items if items and isinstance(items[0], dict) else [{"params": items}]
    out = []
    for group in groups:
        tensors = group["params"]
        tensors = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)
        names = group.get("param_names") or [None] * len(tensors)
        settings = {k: v for k, v in group.items() if k not in ("params", "param_names")}
        chosen = [projected(n, p) for n, p in zip(names, tensors)]
        for is_projected in (False, True):
            part = [(n, p) for n, p, c in zip(names, tensors, chosen) if c is is_projected]
            if not part:
                continue
            split = {"params": [p for _, p in part], **settings, **(keys if is_projected else {})}
            if "param_names" in group:
                split["param_names"] = [n for n, _ in part]
            out.append(split)
    return out


def create_optimizer(name: str, params: Any, lr: float,
                     optimizer_args: Iterable[str] | Mapping[str, Any] | None = None, *,
                     projected: Callable[[str | None, torch.Tensor], bool] | None = None) -> torch.optim.Optimizer:
    """Build the optimizer ``name`` (a table name or ``module.Class``) over ``params`` with learning rate ``lr``.

    ``optimizer_args``: kohya ``["key=value", ...]`` or a dict. LOMO names take the ``nn.Module`` as
    ``params``. Schedule-free optimizers are put in train mode, as sd-scripts does. GaLore/APOLLO names
    take ``optim_target_modules`` (transformers' matching rules, on the groups' ``param_names``) or, from
    a caller that knows the model, ``projected(name, tensor)``; without either every 2-D tensor is projected.
    """
    spec, cls = resolve(name)
    kwargs = split_optimizer_args(optimizer_args)
    validate_kwargs(kwargs, cls, spec)
    if spec is None:
        optimizer = cls(params, lr=lr, **kwargs)
    else:
        group_overrides = {k: kwargs.pop(k) for k in list(kwargs) if k in spec.group_keys}
        targets = kwargs.pop(TARGET_MODULES_KEY, None) if spec.group_keys else None
        kwargs = {**spec.defaults, **kwargs, **spec.fixed}
        if spec.takes_model:
            if not isinstance(params, torch.nn.Module):
                raise TypeError(f"Optimizer {spec.name!r} ({spec.target}) is built from the model: pass the "
                                f"nn.Module as params, got {type(params).__name__}")
            optimizer = cls(params, lr=lr, **kwargs)
        else:
            if spec.group_keys:
                rule = projected if projected is not None else _projection_rule(targets)
                params = _with_group_keys(params, {**spec.group_keys, **group_overrides}, rule)
            if spec.layerwise:
                optimizer = LayerwiseOptimizer(params, cls, lr=lr, **kwargs)
            else:
                optimizer = cls(params, lr=lr, **kwargs)
    if callable(getattr(optimizer, "train", None)):
        optimizer.train()
    return optimizer
