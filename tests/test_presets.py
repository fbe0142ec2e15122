"""TOML recipes: seed values, loader errors, and each recipe building its optimizer through the registry."""

import pytest
import torch

from library.hina import presets
from library.hina.base import HinaOptimizer
from library.hina.presets import RecipeError, load_recipe

# the recipes' values: the seed's weight-decay schedules; every technique at HinaAdamW's defaults (issue 16); the
# LoRA recipes' lrs at 3x the usual AdamW8bit lr, as Grams alone wants (issue 16, docs/BENCHMARKS.md)
SEED = {
    "sd_lora": (3e-4, {"dynamic_weight_decay": True, "wd_transition_steps": 800, "wd_decay_factor": 0.75}),
    "llm_lora": (6e-4, {"dynamic_weight_decay": True, "wd_transition_steps": 1200, "wd_decay_factor": 0.8}),
    "lokr": (1e-3, {"dynamic_weight_decay": True, "wd_transition_steps": 600, "wd_decay_factor": 0.8,
                    "wd_min_ratio": 0.18}),
}
# what issue 16's benchmark chose (docs/BENCHMARKS.md): Grams on, the other techniques off
TECHNIQUES = {"use_grams": True, "use_spd": False, "use_cautious": False, "use_agr": False, "use_tam": False,
              "use_alora": False, "use_adopt_stability": False, "use_orthogonal_grad": False}


@pytest.mark.parametrize("name", sorted(SEED))
def test_recipe_has_seed_values_and_builds_its_optimizer(name):
    recipe = load_recipe(name)
    lr, values = SEED[name]
    assert recipe["learning_rate"] == lr
    kwargs = presets.optimizer_kwargs(recipe)
    assert {k: kwargs[k] for k in values} == values
    model = torch.nn.Linear(8, 8)
    optimizer = presets.build_optimizer(recipe, model.parameters())
    assert isinstance(optimizer, HinaOptimizer) and optimizer.param_groups[0]["lr"] == lr
    for key, value in {**values, **TECHNIQUES}.items():
        assert optimizer.param_groups[0][key] == value, key


def test_network_recipes_name_their_modules():
    assert load_recipe("sd_lora")["network_module"] == "networks.lora"
    assert load_recipe("lokr")["network_module"] == "networks.lokr"
    assert load_recipe(presets.CONFIG_DIR / "lokr.toml") == load_recipe("lokr")


def test_bad_toml_names_file_and_line(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('optimizer_type = "HinaAdamW"\nlearning_rate = 1e-3\noptimizer_args = ["a=1",\n')
    with pytest.raises(RecipeError, match=r"bad\.toml':\d+:\d+: invalid TOML") as info:
        load_recipe(path)
    path.write_text('optimizer_type = "HinaAdamW"\nlearning_rate = = 1\n')
    with pytest.raises(RecipeError, match=r"bad\.toml':2:"):
        load_recipe(path)
    assert "bad.toml" in str(info.value)


def test_unknown_keys_are_reported(tmp_path):
    path = tmp_path / "typo.toml"
    path.write_text('optimizer_type = "HinaAdamW"\nlearning_rate = 1e-3\nnetwork_dimm = 4\n')
    with pytest.raises(RecipeError, match=r"'network_dimm' \(did you mean network_dim"):
        load_recipe(path)
    with pytest.warns(UserWarning, match="network_dimm"):
        assert load_recipe(path, strict=False)["network_dimm"] == 4


def test_sections_are_flattened_as_sd_scripts_does(tmp_path):
    path = tmp_path / "sections.toml"
    path.write_text('[optimizer_arguments]\noptimizer_type = "AdamW"\nlearning_rate = 1e-4\n'
                    '[additional_network_arguments]\nnetwork_dim = 8\n')
    assert load_recipe(path) == {"optimizer_type": "AdamW", "learning_rate": 1e-4, "network_dim": 8}


def test_bad_values_and_names(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text('optimizer_type = "HinaAdamW"\nlearning_rate = "fast"\n')
    with pytest.raises(RecipeError, match="learning_rate must be a number"):
        load_recipe(path)
    path.write_text('optimizer_type = "HinaAdamW"\nlearning_rate = 1e-3\noptimizer_args = ["spd_lamda=0.1"]\n')
    with pytest.raises(RecipeError, match="spd_lambda"):
        presets.optimizer_kwargs(load_recipe(path))
    with pytest.raises(RecipeError, match="available: .*sd_lora"):
        load_recipe("no_such_recipe")
