"""Recipes as declared stages (library/hina/stages.py): each flag is declared once, beside its stage, and the
constructor signature, validation, ``defaults``, ``feature_flags`` and ``state_specs`` all come from there.

``SEED_SIGNATURES`` is the public surface the classes had before the declarations (seed names and defaults):
a declaration whose name or default drifts from it fails here.
"""

import inspect

import pytest
import torch

import library.hina as hina
from library.hina.registry import parse_optimizer_args

_ADAMW = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 1e-2, "use_spd": False, "spd_lambda": 0.06,
          "use_cautious": False, "use_orthogonal_grad": False, "use_adopt_stability": False, "use_grams": True,
          "use_agr": False, "use_tam": False, "tam_beta": 0.999, "use_alora": False, "alora_ratio": 16.0,
          "dynamic_weight_decay": True, "wd_transition_steps": 1000, "wd_decay_factor": 0.7, "wd_min_ratio": 0.1}
_CODEC = {"optim_bits": 8, "block_size": 256, "min_8bit_size": 1024}
_ADAPTIVE = {**_ADAMW, "use_spd": True, "use_cautious": True, "use_adopt_stability": True, "use_agr": True,
             "use_tam": True, "use_dynamic_adaptation": True, "adaptation_strength": 1.0,
             "relationship_discovery_interval": 100, "importance_decay": 0.95, "compatibility_threshold": 0.3,
             "use_lr_mask": True, "lr_bump": 3e-6, "min_lr": 1e-7, "max_lr": None, "warmup_steps": 500}
_AUTOMAGIC = {"lr": 1e-6, "min_lr": 1e-7, "max_lr": 1e-3, "lr_bump": 3e-6, "betas": (0.8, 0.99, 0.999),
              "eps": (1e-30, 1e-16, 1e-8), "clip_threshold": 1.0, "confidence_bias_correction": True,
              "weight_decay": 5e-4, "warmup_steps": 500, "use_lr_mask": True, "use_grams": False, "use_cautious": False,
              "use_tam": False, "tam_beta": 0.999, "use_orthogonal_grad": False, "use_agr": False, "use_alora": True,
              "use_fft_suppression": False, "fft_cutoff": 0.5, "fft_strength": 0.5, "use_lowrank_reg": False,
              "lowrank_rank": 4, "lowrank_strength": 1e-2}
_AUTOMAGIC_8BIT = {"block_size": 4096, "min_8bit_size": 1024, "blocksize": None}
_CONTEXT = {"context_window": 100, "edge_threshold": 0.95, "adaptation_rate": 0.1, "momentum_scales": (1, 5, 10, 25),
            "verbose": False}
_COMPILE = {"compile_step": None}
_RESIDENT = {"resident_weights": False}  # opt-in, CPU (not in the bf16 optimizer: bf16 params)
SEED_SIGNATURES = {
    "HinaAdamW": {**_ADAMW, **_CODEC, **_COMPILE, **_RESIDENT},
    "AdamW_HinaAdaptive": {**_ADAPTIVE, **_CODEC, **_COMPILE, **_RESIDENT},
    "AdamWBF16_HinaAdaptive": {**_ADAPTIVE, "lr": 1e-4, "delayed_wd_threshold": 1e-4, "sr_seed": 0, **_COMPILE},
    "Automagic_CameAMP": {**_AUTOMAGIC, **_COMPILE, **_RESIDENT},
    "Automagic_CameAMP8bit": {**_AUTOMAGIC, **_AUTOMAGIC_8BIT, **_COMPILE, **_RESIDENT},
    "Automagic_CameAMP_COptim": {**_AUTOMAGIC, **_CONTEXT, **_COMPILE, **_RESIDENT},
    "Automagic_CameAMP_COptim8bit": {**_AUTOMAGIC, **_CONTEXT, **_AUTOMAGIC_8BIT, **_COMPILE, **_RESIDENT},
}
# optimizer-wide settings and the core's own arguments: not param-group features
NOT_FEATURES = {"lr", "betas", "eps", "weight_decay", "optim_bits", "block_size", "min_8bit_size", "blocksize",
                "compile_step", "resident_weights", "sr_seed", "context_window", "edge_threshold", "adaptation_rate",
                "verbose"}


@pytest.mark.parametrize("name", list(SEED_SIGNATURES))
def test_signature_help_and_features_come_from_the_declarations(name):
    cls = getattr(hina, name)
    parameters = dict(inspect.signature(cls).parameters)
    assert list(parameters)[:2] == ["params", "lr"]
    assert {k: p.default for k, p in parameters.items() if k != "params"} == SEED_SIGNATURES[name]
    # the signature is the recipe's: one declaration per flag, its default the recipe's
    declared = {flag.name: cls.recipe.default(flag) for flag in cls.recipe.flags}
    assert declared == SEED_SIGNATURES[name]
    assert set(cls.feature_flags) == set(SEED_SIGNATURES[name]) - NOT_FEATURES
    assert "use_tam" in (cls.__init__.__doc__ or "") and f"lr={SEED_SIGNATURES[name]['lr']!r}" in cls.__init__.__doc__
    opt = cls([torch.nn.Parameter(torch.zeros(3))])
    assert set(opt.defaults) == set(SEED_SIGNATURES[name]) - (NOT_FEATURES - {"lr", "betas", "eps", "weight_decay"})


def test_a_declaration_change_reaches_signature_validation_and_optimizer_args():
    """Change one stage's declared default and range: the signature, the constructor, ``--optimizer_args`` and
    ``defaults`` follow (nothing else holds a copy)."""
    from dataclasses import replace

    from library.hina import stages
    from library.hina.techniques import TAM
    flag = replace(TAM.flags[1], default=0.5, check=stages.in_range(0.0, 0.9), valid="0 <= tam_beta <= 0.9")
    stage = replace(TAM, flags=(TAM.flags[0], flag))
    recipe = replace(hina.HinaAdamW.recipe, stages=tuple(stage if s is TAM else s for s in hina.HinaAdamW.recipe.stages))

    Patched = type("Patched", (hina.HinaAdamW,), {"recipe": recipe})
    assert inspect.signature(Patched).parameters["tam_beta"].default == 0.5
    assert Patched([torch.nn.Parameter(torch.zeros(3))]).defaults["tam_beta"] == 0.5
    with pytest.raises(ValueError, match=r"Invalid tam_beta: 0\.95 \(valid: 0 <= tam_beta <= 0\.9\)"):
        Patched([torch.nn.Parameter(torch.zeros(3))], tam_beta=0.95)
    with pytest.raises(ValueError, match="tam_beta"):
        parse_optimizer_args(["tam_beta=(1,)"], Patched)


@pytest.mark.parametrize("name, kwargs, message", [
    ("HinaAdamW", {"tam_beta": 1.0}, r"Invalid tam_beta: 1\.0 \(valid: 0 <= tam_beta < 1\)"),
    ("HinaAdamW", {"wd_transition_steps": 0}, r"Invalid wd_transition_steps: 0 \(valid: an int >= 1\)"),
    ("HinaAdamW", {"use_spd": "yes"}, r"Invalid use_spd: 'yes' \(valid: True or False\)"),
    ("HinaAdamW", {"compile_step": "auto"}, r"Invalid compile_step: 'auto'"),
    ("AdamW_HinaAdaptive", {"max_lr": -1.0}, r"Invalid max_lr: -1\.0 \(valid: a number > 0, or None\)"),
    ("AdamWBF16_HinaAdaptive", {"delayed_wd_threshold": -1}, r"Invalid delayed_wd_threshold: -1"),
    ("Automagic_CameAMP", {"eps": (1e-30, -1.0, 1e-8)}, r"Invalid eps at index 1: -1\.0"),
    ("Automagic_CameAMP_COptim", {"momentum_scales": ("a",)}, r"Invalid momentum_scales"),
    ("Automagic_CameAMP", {"lr": 0.0}, r"Invalid learning rate: 0\.0 \(the lr mask"),
])
def test_bad_values_are_named_with_what_is_valid(name, kwargs, message):
    with pytest.raises(ValueError, match=message):
        getattr(hina, name)([torch.nn.Parameter(torch.zeros(3))], **kwargs)


def test_state_specs_come_from_the_stages_in_recipe_order():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = hina.AdamWBF16_HinaAdaptive([p])
    group = opt.param_groups[0]
    assert opt.state_specs(group, ["other"]) == [("exp_avg", True), ("exp_avg_sq", False), ("spd_anchor", True),
                                                 ("prev_grad", True), ("lr_mask", True), ("shift", True)]
    assert opt.state_specs(group, ["lora_a"])[2] == ("prev_grad", True)  # adapters: SPD's anchor is zero, not stored
    assert opt.vector_specs(group)[:2] == ["tam_smoothed", "importance"] and opt.vector_specs(group)[-1] == "wd_accum"
    coptim = hina.Automagic_CameAMP_COptim([p], momentum_scales=[1, 4])
    assert coptim.state_specs(coptim.param_groups[0], ["other"]) == [("exp_avg", True), ("exp_avg_s4", True),
                                                                      ("lr_mask", True)]
