"""The sd-scripts hook: registry names for ``--optimizer_type`` and parameter names for the optimizer.

``install()`` patches a kohya sd-scripts process (``train_network_hina.py`` calls it) in two places:

* ``library.train_util.get_optimizer``: a Hina name (``HinaAdamW``, ``AdamW_HinaAdaptive`` ...) or an HF
  ``optim`` name that sd-scripts does not know (``adamw_torch_fused``, ``galore_adamw`` ...) is built by
  the registry; a registry alias of one of sd-scripts' own names (``adamw_8bit``, ``schedule_free_adamw``)
  is rewritten to sd-scripts' spelling; everything else reaches sd-scripts' ``get_optimizer`` unchanged.
* ``prepare_optimizer_params`` of the network classes (sd-scripts' ``networks.lora``, our
  ``networks.lokr``, LyCORIS's ``lycoris.kohya``): each param group gets ``param_names`` built from the
  network's modules (torch >= 2.6 convention), so the Hina optimizers see ``lora_down``/``lora_up`` and
  ``lokr_w1``/``lokr_w2`` roles. Optimizers that are not Hina ones get the groups without the names.

Without the hook, stock sd-scripts still builds ``--optimizer_type library.hina.HinaAdamW`` through its
dotted-path fallback; roles then come from the shape fallback (see ``diagnose_lora_pairing()``).
"""

from __future__ import annotations

import functools
import importlib
import inspect
from typing import Any

import torch

from . import naming, registry
from .base import HinaOptimizer

HOOKED = "__hina_hooked__"
NETWORK_MODULES = ("networks.lora", "networks.lokr", "lycoris.kohya")
PREPARE_METHODS = ("prepare_optimizer_params", "prepare_optimizer_params_with_multiple_te_lrs")
LORA_LISTS = ("unet_loras", "text_encoder_loras", "loras")  # where kohya-style networks keep their modules


# ----------------------------------------------------------------------------------------------------------
# parameter names
def network_param_names(network: torch.nn.Module) -> dict[int, str]:
    """``id(param) -> name`` from the network's registered modules, then its LoRA lists by ``lora_name``."""
    names = {id(p): n for n, p in network.named_parameters()}
    for attr in LORA_LISTS:
        modules = getattr(network, attr, None)
        if not isinstance(modules, (list, tuple, torch.nn.ModuleList)):
            continue
        for module in modules:
            prefix = getattr(module, "lora_name", None)
            if isinstance(module, torch.nn.Module) and prefix:
                for n, p in module.named_parameters():
                    names.setdefault(id(p), f"{prefix}.{n}")
    return names


def name_param_groups(network: torch.nn.Module, groups: list) -> list:
    """Give each group dict ``param_names`` (None where the network has no name for a tensor)."""
    names = network_param_names(network)
    named = []
    for group in groups:
        if not isinstance(group, dict):
            return groups  # a plain tensor list: nothing to attach names to
        group = dict(group)
        params = group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        group["params"] = params
        group["param_names"] = [names.get(id(p)) for p in params]
        named.append(group)
    return named


def strip_param_names(params: Any) -> Any:
    """The groups without ``param_names``: what an optimizer that is not a Hina one gets."""
    if isinstance(params, list) and params and all(isinstance(g, dict) for g in params):
        return [{k: v for k, v in g.items() if k != "param_names"} for g in params]
    return params


def _wrap_prepare(method):
    @functools.wraps(method)
    def prepare_with_names(self, *args, **kwargs):
        result = method(self, *args, **kwargs)
        if isinstance(result, tuple):
            return (name_param_groups(self, result[0]), *result[1:])
        return name_param_groups(self, result)

    setattr(prepare_with_names, HOOKED, True)
    return prepare_with_names


def wrap_network_class(cls: type) -> bool:
    """Patch ``cls``'s own ``prepare_optimizer_params*`` methods; True if one was patched."""
    patched = False
    for attr in PREPARE_METHODS:
        method = cls.__dict__.get(attr)
        if callable(method) and not getattr(method, HOOKED, False):
            setattr(cls, attr, _wrap_prepare(method))
            patched = True
    return patched


def wrap_network_module(module) -> list[str]:
    """Patch every network class defined in ``module``; returns their names."""
    patched = []
    for value in list(vars(module).values()):
        if isinstance(value, type) and value.__module__ == module.__name__ and wrap_network_class(value):
            patched.append(value.__name__)
    return patched


# ----------------------------------------------------------------------------------------------------------
# LoRA+ applied once
LORAPLUS_KEYS = ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio")


def loraplus_network_args(network_args) -> dict[str, str]:
    """kohya's ``loraplus_*lr_ratio`` items of ``--network_args`` (``["k=v", ...]``), as given."""
    found = {}
    for item in network_args or []:
        key, _, value = str(item).partition("=")
        if key.strip() in LORAPLUS_KEYS:
            found[key.strip()] = value.strip()
    return found


def _group_params(trainable_params, default_lr: float) -> list[naming.GroupParams] | None:
    if not (isinstance(trainable_params, list) and trainable_params
            and all(isinstance(g, dict) for g in trainable_params)):
        return None
    groups = []
    for group in trainable_params:
        params = group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        groups.append(naming.GroupParams(group.get("param_names"), [tuple(p.shape) for p in params],
                                         "param_names", group.get("lr", default_lr)))
    return groups


def settle_lora_plus(args, trainable_params, cls: type) -> list[str] | None:
    """The ``--optimizer_args`` for a Hina optimizer ``cls`` such that the B-side ratio is applied once.

    When kohya's LoRA+ (``loraplus_*lr_ratio`` in ``--network_args``) has put the B side in groups with a
    larger lr, ``alora_ratio=1.0`` is passed (kohya's ratio wins; ALLoRA row scaling stays on) and one
    notice says so. When ``--network_args`` asks for LoRA+ but the network did not split its groups, the
    notice says the optimizer's ratio applies instead. Returns the args unchanged otherwise.
    """
    optimizer_args = list(args.optimizer_args or [])
    given = loraplus_network_args(getattr(args, "network_args", None))
    if not (isinstance(cls, type) and issubclass(cls, HinaOptimizer)):
        return optimizer_args
    parameters = inspect.signature(cls.__init__).parameters
    if "alora_ratio" not in parameters:
        return optimizer_args  # no B-side lr ratio of its own (the Automagic family): nothing compounds
    kwargs = registry.split_optimizer_args(optimizer_args)
    if kwargs.get("use_alora", parameters["use_alora"].default) is False:
        return optimizer_args
    ratio = kwargs.get("alora_ratio", parameters["alora_ratio"].default)
    groups = _group_params(trainable_params, args.learning_rate)
    split = naming.detect_split_lora_plus(naming.pair_groups(groups), [g.lr for g in groups]) if groups else None
    shown = " ".join(f"{k}={v}" for k, v in given.items())
    if split is not None:
        print(f"library.hina: LoRA+ {'(' + shown + ') ' if shown else ''}is applied by the param groups: "
              + split.message(cls.__name__, ratio))
        kwargs["alora_ratio"] = 1.0
        return [f"{k}={v!r}" for k, v in kwargs.items()]
    if given:
        print(f"library.hina: --network_args {shown} did not give the B side its own lr (this network keeps "
              f"A and B in one group): {cls.__name__}'s alora_ratio={ratio:g} is the LoRA+ ratio that applies.")
    return optimizer_args


# ----------------------------------------------------------------------------------------------------------
# get_optimizer
def _keeps_names(optimizer_type: str) -> bool:
    """True when ``optimizer_type`` is a dotted path to a Hina optimizer class."""
    if "." not in optimizer_type:
        return False
    try:
        _, cls = registry.resolve(optimizer_type)
    except (registry.UnknownOptimizerError, registry.OptimizerUnavailableError):
        return False
    return isinstance(cls, type) and issubclass(cls, HinaOptimizer)


def build_for_sd_scripts(args, trainable_params) -> tuple[str, str, torch.optim.Optimizer]:
    """What sd-scripts' ``get_optimizer`` returns: (class path, "k=v,..." for logs, the optimizer)."""
    if getattr(args, "fused_backward_pass", False):
        raise ValueError(f"--fused_backward_pass works only with Adafactor in sd-scripts, not with "
                         f"--optimizer_type {args.optimizer_type}")
    accumulation = getattr(args, "gradient_accumulation_steps", 1) or 1
    spec = registry.find_spec(args.optimizer_type)
    if spec is not None and spec.layerwise and accumulation != 1:
        raise ValueError(f"--optimizer_type {args.optimizer_type} steps each tensor on every micro-batch, so it cannot "
                         f"accumulate gradients: --gradient_accumulation_steps {accumulation}, must be 1")
    spec, cls = registry.resolve(args.optimizer_type)
    kwargs = registry.split_optimizer_args(args.optimizer_args or [])
    if not issubclass(cls, HinaOptimizer):
        trainable_params = strip_param_names(trainable_params)
    optimizer = registry.create_optimizer(args.optimizer_type, trainable_params, args.learning_rate, kwargs)
    inner = type(optimizer) if not isinstance(optimizer, registry.LayerwiseOptimizer) else cls
    return (f"{inner.__module__}.{inner.__name__}", ",".join(f"{k}={v}" for k, v in kwargs.items()), optimizer)


def route(optimizer_type: str | None) -> tuple[str, str | None]:
    """How the hook treats a name: ("registry", None), ("rename", sd_scripts_name) or ("sd-scripts", None)."""
    spec = registry.find_spec(optimizer_type or "")
    if spec is None:
        return "sd-scripts", None
    if spec.sd_scripts_builtin:
        if optimizer_type.strip().lower() in (n.lower() for n in spec.sd_scripts_builtin):
            return "sd-scripts", None
        return "rename", spec.name
    return "registry", None


def _wrap_get_optimizer(original):
    @functools.wraps(original)
    def get_optimizer(args, trainable_params):
        if getattr(args, "use_8bit_adam", False) or getattr(args, "use_lion_optimizer", False):
            return original(args, strip_param_names(trainable_params))
        how, new_name = route(args.optimizer_type)
        if how == "registry" or _keeps_names(args.optimizer_type or ""):
            _, cls = registry.resolve(args.optimizer_type)
            args.optimizer_args = settle_lora_plus(args, trainable_params, cls)
        if how == "registry":
            return build_for_sd_scripts(args, trainable_params)
        if how == "rename":
            args.optimizer_type = new_name  # sd-scripts' own spelling keeps its special handling
        if not _keeps_names(args.optimizer_type or ""):
            trainable_params = strip_param_names(trainable_params)
        return original(args, trainable_params)

    setattr(get_optimizer, HOOKED, True)
    get_optimizer.__wrapped_original__ = original
    return get_optimizer


def install(train_util=None, network_modules=NETWORK_MODULES) -> dict:
    """Patch sd-scripts' ``get_optimizer`` and the network classes. Safe to call twice.

    ``train_util``: the module to patch (default: ``library.train_util`` if importable).
    ``network_modules``: modules whose network classes get named param groups (missing ones are skipped).
    Returns what was patched: ``{"get_optimizer": bool, "networks": {module: [class names]}}``.
    """
    done = {"get_optimizer": False, "networks": {}}
    if train_util is None:
        try:
            train_util = importlib.import_module("library.train_util")
        except ImportError:
            train_util = None
    if train_util is not None:
        if not getattr(train_util.get_optimizer, HOOKED, False):
            train_util.get_optimizer = _wrap_get_optimizer(train_util.get_optimizer)
        done["get_optimizer"] = True
    for name in network_modules:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        done["networks"][name] = wrap_network_module(module)
    return done
