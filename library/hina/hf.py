"""transformers ``Trainer`` glue: ``Trainer(optimizer_cls_and_kwargs=optimizer_cls_and_kwargs("HinaAdamW"))``.

Trainer builds the optimizer from anonymous param groups, so a LoRA-aware optimizer would not see the peft
names (``...q_proj.lora_A.default.weight``). Two ways to give it the names:

* transformers >= 5 accepts an *optimizer factory* in ``optimizer_cls_and_kwargs`` and calls it with the
  model: the factory builds the groups itself, each with ``param_names`` (the default here);
* on older versions pass ``model=``: the returned class is a small subclass whose constructor calls
  ``attach_names(model)`` after Trainer has built it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from . import presets, registry
from .base import HinaOptimizer

NO_DECAY_TOKENS = ("bias", "norm", "ln_")  # fallback split when transformers is not importable


def _factory_supported() -> bool:
    try:
        from transformers import trainer_optimizer
    except ImportError:
        return False
    return hasattr(trainer_optimizer, "is_optimizer_factory")


def decay_parameter_names(model: torch.nn.Module) -> set[str]:
    """The parameters Trainer decays: all but biases and norm weights (Trainer's own rule when available)."""
    try:
        from transformers import Trainer

        return set(Trainer.get_decay_parameter_names(None, model))  # uses only its model argument
    except (ImportError, AttributeError, TypeError):
        return {n for n, _ in model.named_parameters() if not any(t in n.lower() for t in NO_DECAY_TOKENS)}


def named_param_groups(model: torch.nn.Module, weight_decay: float | None = None) -> list[dict]:
    """Trainable parameters in two groups (decay / no decay, as Trainer splits them), with ``param_names``."""
    decaying = decay_parameter_names(model)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if name in decaying else no_decay).append((name, p))
    groups = []
    for items, wd in ((decay, weight_decay), (no_decay, 0.0)):
        if items:
            group = {"params": [p for _, p in items], "param_names": [n for n, _ in items]}
            if wd is not None:
                group["weight_decay"] = wd
            groups.append(group)
    return groups


def linear_weights_matching(model: torch.nn.Module, targets) -> set[str]:
    """GaLore/APOLLO targets as Trainer picks them: ``nn.Linear`` weights whose module matches ``targets``."""
    names = {f"{module_name}.weight" for module_name, module in model.named_modules()
             if isinstance(module, torch.nn.Linear) and module_name
             and registry.target_module_matches(targets, module_name)}
    if not names:
        raise ValueError(f"optim_target_modules={targets!r} matches no nn.Linear layer of the model "
                         "(transformers refuses this too)")
    return names


def keep_embeddings_32bit(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> int:
    """Trainer's rule for bitsandbytes 8-bit optimizers: ``nn.Embedding`` weights keep 32-bit states.

    Returns how many embedding modules were registered (0 when ``optimizer`` is not an 8-bit bnb one).
    """
    args = getattr(optimizer, "args", None)
    if not type(optimizer).__module__.startswith("bitsandbytes") or getattr(args, "optim_bits", None) != 8:
        return 0
    import bitsandbytes

    manager = bitsandbytes.optim.GlobalOptimManager.get_instance()
    embeddings = [m for m in model.modules() if isinstance(m, torch.nn.Embedding)]
    for module in embeddings:
        manager.register_module_override(module, "weight", {"optim_bits": 32})
    return len(embeddings)


class TrainerOptimizerFactory:
    """What Trainer calls as ``factory()(model, **kwargs)``: builds the named optimizer over ``model``."""

    name: str = "HinaAdamW"
    lr: float | None = None
    weight_decay: float = 0.0  # the decay group's (see optimizer_cls_and_kwargs)

    def __call__(self, model: torch.nn.Module, **kwargs) -> torch.optim.Optimizer:
        spec, cls = registry.resolve(self.name)
        kwargs = dict(kwargs)
        kwargs.pop("weight_decay", None)  # carried by the groups, as Trainer does
        groups = named_param_groups(model, self.weight_decay)
        projected = None
        if spec is not None and spec.group_keys:
            targets = linear_weights_matching(model, kwargs.pop(registry.TARGET_MODULES_KEY))
            projected = lambda name, p: name in targets  # noqa: E731
        if not issubclass(cls, HinaOptimizer) and projected is None:
            groups = [{k: v for k, v in g.items() if k != "param_names"} for g in groups]
        lr = self.lr if self.lr is not None else _default_lr(cls)
        optimizer = registry.create_optimizer(self.name, groups, lr, kwargs, projected=projected)
        if projected is not None and not issubclass(cls, HinaOptimizer):
            for group in optimizer.param_groups:
                group.pop("param_names", None)
        keep_embeddings_32bit(optimizer, model)
        return optimizer


def _default_lr(cls: type) -> float:
    import inspect

    default = inspect.signature(cls.__init__).parameters.get("lr")
    if default is None or not isinstance(default.default, (int, float)):
        raise ValueError(f"{cls.__name__} has no default learning rate: pass lr=... or a recipe")
    return float(default.default)


def _named_subclass(cls: type, model: torch.nn.Module, weight_decay: float | None) -> type:
    """``cls`` whose instances name their params after ``model`` (for Trainer without factories).

    Trainer fills its decay group with ``TrainingArguments.weight_decay``; an explicit ``weight_decay``
    (recipe or override) replaces it there, so both routes follow the same rule.
    """
    decaying = {id(p) for n, p in model.named_parameters() if n in decay_parameter_names(model)}

    def __init__(self, params, **kwargs):
        cls.__init__(self, params, **kwargs)
        if weight_decay is not None:
            for group in self.param_groups:
                if group["params"] and all(id(p) in decaying for p in group["params"]):
                    group["weight_decay"] = weight_decay
        if isinstance(self, HinaOptimizer):
            self.attach_names(model)
        keep_embeddings_32bit(self, model)

    return type(f"Named{cls.__name__}", (cls,), {"__init__": __init__, "__module__": cls.__module__})


def optimizer_cls_and_kwargs(name: str | None = None, recipe: str | Path | dict | None = None,
                             model: torch.nn.Module | None = None, training_args: Any = None,
                             **overrides: Any) -> tuple[Any, dict]:
    """``(optimizer class or factory, kwargs)`` for ``transformers.Trainer(optimizer_cls_and_kwargs=...)``.

    ``name``: a registry name (default: the recipe's ``optimizer_type``). ``recipe``: a recipe name
    (``"llm_lora"``), a path (absolute, relative to the current folder, or relative to the project root as
    ``"configs/llm_lora.toml"``) or a loaded dict; its ``learning_rate`` and ``optimizer_args`` are the starting
    point, ``overrides`` (``lr=...``, ``alora_ratio=...``) win. ``model``: see the module docstring.
    ``training_args``: the ``TrainingArguments`` Trainer gets (a factory never sees them otherwise).

    Weight decay, the same in both routes: biases and norm weights get 0 (Trainer's split); the other
    parameters get ``weight_decay`` from ``overrides``/the recipe when given, else
    ``training_args.weight_decay``, else TrainingArguments' default 0.0 (with ``model=`` and no explicit
    value, Trainer's own groups carry ``TrainingArguments.weight_decay``).

    Refused, as transformers refuses or cannot honour them here: ``*_layerwise`` names without
    ``training_args`` or with gradient accumulation (each tensor steps as soon as its gradient is ready,
    on every micro-batch); LOMO names (Trainer runs LOMO's fused backward, lr schedule and clipping only
    with ``TrainingArguments(optim="lomo")``). GaLore/APOLLO need ``optim_target_modules``, as in
    transformers (an override, or ``training_args.optim_target_modules``).
    """
    if recipe is not None and not isinstance(recipe, dict):
        recipe = presets.load_recipe(recipe)
    kwargs: dict[str, Any] = {}
    lr = None
    if recipe is not None:
        name = name or recipe["optimizer_type"]
        lr = recipe["learning_rate"]
        kwargs.update(registry.split_optimizer_args(recipe.get("optimizer_args", [])))
    if name is None:
        raise ValueError("optimizer_cls_and_kwargs needs a name or a recipe")
    lr = overrides.pop("lr", lr)
    kwargs.update(overrides)
    spec = registry.find_spec(name)  # refusals first: they hold whether or not the library is installed
    _refuse_what_trainer_cannot_honour(spec, training_args)
    if spec is not None and spec.group_keys and registry.TARGET_MODULES_KEY not in kwargs:
        targets = getattr(training_args, "optim_target_modules", None)
        if targets is None:
            raise ValueError(f"{spec.name!r} projects the layers named by optim_target_modules, as in transformers: "
                             f"pass optim_target_modules=['q_proj', 'v_proj'] (or 'all-linear'), or training_args "
                             f"with optim_target_modules set")
        kwargs[registry.TARGET_MODULES_KEY] = targets
    spec, cls = registry.resolve(name)
    registry.validate_kwargs(kwargs, cls, spec)
    explicit_wd = kwargs.pop("weight_decay", None)
    decay = explicit_wd if explicit_wd is not None else getattr(training_args, "weight_decay", 0.0)

    if model is None and _factory_supported():
        factory = type("HinaTrainerFactory", (TrainerOptimizerFactory,),
                       {"name": name, "lr": lr, "weight_decay": decay})
        return factory, kwargs
    if model is None:
        raise TypeError("this transformers version has no optimizer factories: pass model=... so the "
                        "optimizer can name its parameters")
    if spec is not None and (spec.defaults or spec.fixed or spec.layerwise or spec.group_keys or spec.takes_model):
        raise ValueError(f"{spec.name!r} needs the registry's own construction; use a transformers version with "
                         f"optimizer factories (>= 5) or create_optimizer() with Trainer(optimizers=...)")
    if lr is not None:
        kwargs["lr"] = lr
    return _named_subclass(cls, model, explicit_wd), kwargs


def _refuse_what_trainer_cannot_honour(spec, training_args) -> None:
    if spec is None:
        return
    if spec.takes_model:
        raise ValueError(f"{spec.name!r}: Trainer runs LOMO's fused backward (and so the lr schedule and gradient "
                         f"clipping) only with TrainingArguments(optim={spec.name!r}); through "
                         f"optimizer_cls_and_kwargs they would be skipped. Use TrainingArguments(optim={spec.name!r}).")
    if spec.layerwise:
        steps = getattr(training_args, "gradient_accumulation_steps", None)
        if steps is None:
            raise ValueError(f"{spec.name!r} steps each tensor as soon as its gradient is ready: pass "
                             f"training_args=your TrainingArguments so gradient accumulation can be checked")
        if steps != 1:
            raise ValueError(f"{spec.name!r} steps on every micro-batch, so it cannot accumulate gradients: "
                             f"gradient_accumulation_steps={steps}, must be 1 (transformers refuses this too)")
