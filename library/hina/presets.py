"""TOML recipes (``configs/*.toml``) in kohya sd-scripts' ``--config_file`` format.

A recipe is flat keys (tables are flattened one level, as sd-scripts' ``read_config_from_file`` does):
``optimizer_type``, ``learning_rate``, ``optimizer_args`` (a list of ``"k=v"`` strings) and, for the
network recipes, ``network_module``, ``network_dim``, ``network_alpha``, ``network_args``. The values live
in the TOML files only; this module reads them, reports mistakes, and builds the optimizer.
"""

from __future__ import annotations

import difflib
import warnings
from pathlib import Path
from typing import Any

from . import config_toml, registry

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"

# The sd-scripts train_network arguments a recipe may set; anything else is reported.
KNOWN_KEYS = frozenset({
    "optimizer_type", "optimizer_args", "learning_rate", "unet_lr", "text_encoder_lr", "lr_scheduler",
    "lr_scheduler_args", "lr_scheduler_type", "lr_warmup_steps", "lr_scheduler_num_cycles", "lr_scheduler_power",
    "lr_scheduler_min_lr_ratio", "max_grad_norm", "network_module", "network_dim", "network_alpha",
    "network_args", "network_dropout", "network_weights", "network_train_unet_only", "network_train_text_encoder_only",
    "max_train_steps", "max_train_epochs", "train_batch_size", "gradient_accumulation_steps",
    "gradient_checkpointing", "mixed_precision", "full_fp16", "full_bf16", "save_precision", "seed",
    "resolution", "enable_bucket", "min_bucket_reso", "max_bucket_reso", "cache_latents", "cache_latents_to_disk",
    "pretrained_model_name_or_path", "train_data_dir", "reg_data_dir", "dataset_config", "output_dir",
    "output_name", "save_model_as", "save_every_n_epochs", "save_every_n_steps", "logging_dir", "log_with",
    "sdpa", "xformers", "noise_offset", "min_snr_gamma", "clip_skip", "caption_extension", "shuffle_caption",
    "keep_tokens", "max_token_length", "v2", "v_parameterization", "sample_prompts", "sample_every_n_steps",
    "sample_sampler", "scale_weight_norms", "fused_backward_pass", "use_8bit_adam", "use_lion_optimizer",
})
REQUIRED_KEYS = ("optimizer_type", "learning_rate")


class RecipeError(ValueError):
    """A recipe file that cannot be read or has a wrong or unknown key."""


def recipe_path(path_or_name: str | Path) -> Path:
    """Where a recipe is, tried in this order: a path that exists (absolute or from the current folder), a
    path relative to the project root (``"configs/llm_lora.toml"`` from any folder), a recipe name in
    ``configs/`` (``"sd_lora"``, ``"llm_lora"``, ``"lokr"``)."""
    path = Path(path_or_name)
    if path.exists():
        return path
    if not path.is_absolute() and (CONFIG_DIR.parent / path).is_file():
        return CONFIG_DIR.parent / path
    candidate = CONFIG_DIR / f"{path_or_name}.toml"
    if path.suffix != ".toml" and candidate.exists():
        return candidate
    if path.suffix == ".toml":
        return path  # load_recipe reports the missing file with its path
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.toml")) if CONFIG_DIR.is_dir() else []
    raise RecipeError(f"No recipe {str(path_or_name)!r}: not a file, and not a name in {CONFIG_DIR} "
                      f"(available: {', '.join(names) or 'none'})")


def load_recipe(path_or_name: str | Path, strict: bool = True) -> dict[str, Any]:
    """Read a recipe into a flat dict by the same rules as ``--config_file`` (``config_toml.read_flat``: sections
    flatten, a key set twice is an error). ``strict``: unknown keys raise, else they are warned about."""
    path = recipe_path(path_or_name)
    try:
        recipe = config_toml.read_flat(path)
    except config_toml.ConfigFileError as error:
        raise RecipeError(f"recipe {error}") from None
    check_recipe(recipe, str(path), strict)
    return recipe


def check_recipe(recipe: dict[str, Any], where: str = "recipe", strict: bool = True) -> None:
    unknown = sorted(set(recipe) - KNOWN_KEYS)
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, sorted(KNOWN_KEYS), n=2, cutoff=0.6)
            hints.append(f"{key!r}" + (f" (did you mean {' or '.join(close)}?)" if close else ""))
        message = f"{where}: unknown keys {', '.join(hints)}"
        if strict:
            raise RecipeError(message)
        warnings.warn(message, stacklevel=3)
    missing = [k for k in REQUIRED_KEYS if k not in recipe]
    if missing:
        raise RecipeError(f"{where}: missing {', '.join(missing)}")
    if not isinstance(recipe["optimizer_type"], str):
        raise RecipeError(f"{where}: optimizer_type must be a string, got {recipe['optimizer_type']!r}")
    lr = recipe["learning_rate"]
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or lr < 0:
        raise RecipeError(f"{where}: learning_rate must be a number >= 0, got {lr!r}")
    for key in ("optimizer_args", "network_args"):
        value = recipe.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise RecipeError(f'{where}: {key} must be a list of "k=v" strings, got {value!r}')


def optimizer_kwargs(recipe: dict[str, Any]) -> dict[str, Any]:
    """The recipe's ``optimizer_args``, parsed and checked against its optimizer's constructor."""
    try:
        return registry.parse_optimizer_args(recipe.get("optimizer_args", []), recipe["optimizer_type"])
    except registry.OptimizerArgsError as error:
        raise RecipeError(f"recipe optimizer_args: {error}") from None


def build_optimizer(recipe: dict[str, Any] | str | Path, params, **overrides):
    """``create_optimizer`` with the recipe's name, learning rate and args (``overrides`` win)."""
    if not isinstance(recipe, dict):
        recipe = load_recipe(recipe)
    kwargs = {**optimizer_kwargs(recipe), **overrides}
    lr = kwargs.pop("lr", recipe["learning_rate"])
    return registry.create_optimizer(recipe["optimizer_type"], params, lr, kwargs)
