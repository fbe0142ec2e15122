"""LoKr network module for kohya sd-scripts, with LyCORIS's parameter names and file layout.

LoKr (LyCORIS ``lycoris/modules/lokr.py``; Yeh et al., "Navigating Text-To-Image Customization: From
LyCORIS Fine-Tuning to Model Evaluation", arXiv 2309.14859) adds to a layer's weight

    ΔW = kron(W1, W2) · scale,   scale = alpha / dim,

where ``W1`` (the small factor) is ``lokr_w1`` or ``lokr_w1_a @ lokr_w1_b``, and ``W2`` (the large factor)
is ``lokr_w2``, ``lokr_w2_a @ lokr_w2_b``, or for a k x k conv with ``use_tucker`` the Tucker product of
``lokr_t2`` with ``lokr_w2_a`` and ``lokr_w2_b``. The split of ``out`` and ``in`` into the two factors is
LyCORIS's ``factorization(dim, factor)``. When both factors are full matrices alpha is forced to ``dim``
(scale 1), as LyCORIS does. Files written here load where LyCORIS LoKr files load and vice versa.

This file is the kohya entry point (``--network_module networks.lokr``) and also holds the pieces shared
with ``networks/lora.py``: target discovery with kohya's key names, argument parsing, the
safetensors saver (atomic through ``library.hina.atomic_file``, the project's one writer) and the
``AdapterNetwork`` base class. It imports only torch, safetensors and ``library.hina``, so
``cp networks/lokr.py <sd-scripts>/networks/`` works next to kohya's own ``networks/lora.py`` (with
``library/hina`` copied too).
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path
from typing import Callable, Iterable, Mapping

import safetensors.torch
import torch
import torch.nn as nn
import torch.nn.functional as F

from library.hina import naming
from library.hina.atomic_file import write_atomic

# ----------------------------------------------------------------------------------------------------
# Targets and key names (kohya sd-scripts networks/lora.py)
# ----------------------------------------------------------------------------------------------------
UNET_TARGETS = ("Transformer2DModel",)
UNET_CONV_TARGETS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
TEXT_ENCODER_TARGETS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP")
PREFIX_UNET = "lora_unet"
PREFIX_TEXT_ENCODER = "lora_te"


def text_encoder_roots(text_encoder) -> list[tuple[str, nn.Module, str]]:
    """``(key prefix, module, path prefix)`` for each text encoder, as kohya names them.

    One encoder is ``lora_te``; a list of two (SDXL) is ``lora_te1`` and ``lora_te2``. Key names keep the
    ``text_model.`` path of transformers 4's ``CLIPTextModel`` (``lora_te_text_model_encoder_layers_0_...``,
    what kohya, ComfyUI, A1111 and diffusers expect); transformers 5 dropped that wrapper from
    ``CLIPTextModel``, so it is put back in the name when the module has no ``text_model`` child.
    """
    if text_encoder is None:
        return []
    encoders = list(text_encoder) if isinstance(text_encoder, (list, tuple)) else [text_encoder]
    encoders = [te for te in encoders if te is not None]
    roots = []
    for index, te in enumerate(encoders):
        prefix = f"{PREFIX_TEXT_ENCODER}{index + 1}" if len(encoders) > 1 else PREFIX_TEXT_ENCODER
        path_prefix = "" if hasattr(te, "text_model") else "text_model."
        roots.append((prefix, te, path_prefix))
    return roots


def find_target_layers(root: nn.Module, prefix: str, target_classes: Iterable[str],
                       path_prefix: str = "") -> list[tuple[str, nn.Module]]:
    """Every ``nn.Linear``/``nn.Conv2d`` inside a module whose class name is in ``target_classes``.

    Returns ``(key name, layer)`` with kohya's key name ``<prefix>_<path with . as _>``, in the order
    ``named_modules`` visits them; a layer reachable from two targets is listed once.
    """
    targets = set(target_classes)
    found: dict[str, nn.Module] = {}
    for name, module in root.named_modules():
        if module.__class__.__name__ not in targets:
            continue
        for child_name, child in module.named_modules():
            if not isinstance(child, (nn.Linear, nn.Conv2d)) or not child_name:
                continue
            path = path_prefix + ".".join(part for part in (name, child_name) if part)
            key = f"{prefix}.{path}".replace(".", "_")
            found.setdefault(key, child)
    return list(found.items())


def all_layers(root: nn.Module, prefix: str, path_prefix: str = "") -> list[tuple[str, nn.Module]]:
    """Every ``nn.Linear``/``nn.Conv2d`` under ``root`` with its kohya key name, targeted or not."""
    return [(f"{prefix}.{path_prefix}{name}".replace(".", "_"), module) for name, module in root.named_modules()
            if name and isinstance(module, (nn.Linear, nn.Conv2d))]


def is_kxk_conv(layer: nn.Module) -> bool:
    """A conv with a kernel larger than 1x1 (kohya gives these ``conv_dim``, the rest ``network_dim``)."""
    return isinstance(layer, nn.Conv2d) and tuple(layer.kernel_size) != (1, 1)


# ----------------------------------------------------------------------------------------------------
# network_args parsing (kohya passes them as strings: --network_args "conv_dim=4" "decompose_both=True")
# ----------------------------------------------------------------------------------------------------
def as_bool(key: str, value) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off", "none"):
        return False
    raise ValueError(f"network arg {key}={value!r} is not a boolean; use True or False")


def as_optional_int(key: str, value) -> int | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"network arg {key}={value!r} is not an integer") from None
    if number != int(number):
        raise ValueError(f"network arg {key}={value!r} is not an integer")
    return int(number)


def as_optional_float(key: str, value) -> float | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"network arg {key}={value!r} is not a number") from None


def as_probability(key: str, value) -> float:
    p = as_optional_float(key, value)
    p = 0.0 if p is None else p
    if not 0.0 <= p < 1.0:
        raise ValueError(f"network arg {key}={value!r} must be a probability in [0, 1)")
    return p


# kohya network_args this project does not implement: an error names them instead of ignoring them.
UNSUPPORTED_KOHYA_ARGS = ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas",
                          "down_lr_weight", "mid_lr_weight", "up_lr_weight", "block_lr_zero_threshold",
                          "train_blocks", "use_scalar", "rs_lora", "weight_decompose", "dora_wd",
                          "bypass_mode", "unbalanced_factorization", "train_norm", "preset")


def parse_network_args(kwargs: Mapping, parsers: Mapping[str, Callable]) -> dict:
    """Parse kohya ``network_args`` with one parser per accepted key; unknown keys are an error."""
    parsed = {}
    for key, value in kwargs.items():
        if key in parsers:
            parsed[key] = parsers[key](key, value)
        elif key in UNSUPPORTED_KOHYA_ARGS:
            raise ValueError(f"network arg {key!r} is not supported by this network module; "
                             f"supported: {', '.join(sorted(parsers))}")
        else:
            raise ValueError(f"unknown network arg {key!r}={value!r}; valid: {', '.join(sorted(parsers))}")
    return parsed


# ----------------------------------------------------------------------------------------------------
# Files: atomic write, kohya's sshs_* hashes, loading
# ----------------------------------------------------------------------------------------------------
def kohya_model_hashes(tensors: dict[str, torch.Tensor], metadata: Mapping[str, str]) -> tuple[str, str]:
    """``(sshs_model_hash, sshs_legacy_hash)`` as kohya's ``train_util.precalculate_safetensors_hashes``.

    Both hash the safetensors serialisation with only the ``ss_*`` metadata: the model hash is the
    sha256 of everything after the header, the legacy hash the first 8 hex digits of the sha256 of the
    64 KiB at offset 1 MiB.
    """
    data = safetensors.torch.save(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    header_len = int.from_bytes(data[:8], "little")
    model_hash = hashlib.sha256(data[8 + header_len:]).hexdigest()
    legacy_hash = hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    return model_hash, legacy_hash


def save_state_dict(file: str, state_dict: dict[str, torch.Tensor], dtype: torch.dtype | None = None,
                    metadata: Mapping[str, str] | None = None) -> None:
    """Save like kohya's ``save_weights`` (tensors cast to ``dtype``, sshs hashes added), atomically."""
    tensors = {}
    for key, value in state_dict.items():
        value = value.detach().to("cpu")
        tensors[key] = (value.to(dtype) if dtype is not None else value).contiguous().clone()
    if os.path.splitext(file)[1].lower() != ".safetensors":
        write_atomic(file, lambda tmp: torch.save(tensors, tmp))
        return
    metadata = dict(metadata or {})
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"safetensors metadata must map str to str; got {key!r}: {type(value).__name__}")
    metadata["sshs_model_hash"], metadata["sshs_legacy_hash"] = kohya_model_hashes(tensors, metadata)
    data = safetensors.torch.save(tensors, metadata)
    write_atomic(file, lambda tmp: Path(tmp).write_bytes(data))


def load_state_dict_file(file: str) -> dict[str, torch.Tensor]:
    if os.path.splitext(file)[1].lower() == ".safetensors":
        return safetensors.torch.load_file(file)
    return torch.load(file, map_location="cpu", weights_only=True)


def split_by_module(weights_sd: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """``{lora_name: {suffix: tensor}}`` from ``lora_name.suffix`` keys."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in weights_sd.items():
        if "." in key:
            lora_name, suffix = key.split(".", 1)
            modules.setdefault(lora_name, {})[suffix] = value
    return modules


# ----------------------------------------------------------------------------------------------------
# The network: kohya's interface, shared by LoRA and LoKr
# ----------------------------------------------------------------------------------------------------
class AdapterNetwork(nn.Module):
    """A set of adapter modules on a UNet and text encoder(s), with kohya's ``LoRANetwork`` interface.

    Each module is registered under its key name (``lora_unet_...``), so ``state_dict()`` keys and
    ``named_parameters()`` names are the file's keys. Subclasses build the modules.
    """

    def __init__(self, text_encoder_modules: list[list[nn.Module]], unet_modules: list[nn.Module],
                 multiplier: float = 1.0, loraplus_lr_ratio: float | None = None,
                 loraplus_unet_lr_ratio: float | None = None,
                 loraplus_text_encoder_lr_ratio: float | None = None):
        super().__init__()
        self.multiplier = multiplier
        self.text_encoder_loras_per_encoder = [list(mods) for mods in text_encoder_modules]
        self.unet_loras = list(unet_modules)
        self.loraplus_lr_ratio = loraplus_lr_ratio
        self.loraplus_unet_lr_ratio = loraplus_unet_lr_ratio
        self.loraplus_text_encoder_lr_ratio = loraplus_text_encoder_lr_ratio
        for module in self.text_encoder_loras + self.unet_loras:
            if module.lora_name in self._modules:
                raise ValueError(f"two adapter modules share the key name {module.lora_name!r}")
            self.add_module(module.lora_name, module)
        self.set_multiplier(multiplier)

    @property
    def text_encoder_loras(self) -> list[nn.Module]:
        return [m for mods in self.text_encoder_loras_per_encoder for m in mods]

    # --- kohya hooks ------------------------------------------------------------------------------
    def apply_to(self, text_encoder=None, unet=None, apply_text_encoder: bool = True, apply_unet: bool = True):
        """Wrap the target layers' ``forward``; the modules not applied are dropped from the network.

        As kohya: ``text_encoder``/``unet`` are accepted for the interface, the modules already know
        their layers; with ``apply_text_encoder=False`` the text-encoder modules are removed, so they are
        neither trained nor saved.
        """
        if not apply_text_encoder:
            for module in self.text_encoder_loras:
                delattr(self, module.lora_name)
            self.text_encoder_loras_per_encoder = [[] for _ in self.text_encoder_loras_per_encoder]
        if not apply_unet:
            for module in self.unet_loras:
                delattr(self, module.lora_name)
            self.unet_loras = []
        for module in self.text_encoder_loras + self.unet_loras:
            module.apply_to()

    def restore(self) -> None:
        """Undo ``apply_to``: the layers get their own ``forward`` back."""
        for module in self.text_encoder_loras + self.unet_loras:
            module.restore()

    def set_multiplier(self, multiplier: float) -> None:
        self.multiplier = float(multiplier)
        for module in self.text_encoder_loras + self.unet_loras:
            module.multiplier = self.multiplier

    def enable_gradient_checkpointing(self) -> None:
        """Nothing to do: the modules are small and run inside the layers they wrap, so the UNet's and
        text encoder's own checkpointing covers them (kohya's LoRA does the same)."""

    def prepare_grad_etc(self, text_encoder=None, unet=None) -> None:
        self.requires_grad_(True)

    def on_epoch_start(self, text_encoder=None, unet=None) -> None:
        self.train()

    def get_trainable_params(self):
        return self.parameters()

    def is_mergeable(self) -> bool:
        return True

    @torch.no_grad()
    def merge_to(self, text_encoder=None, unet=None, weights_sd=None, dtype=None, device=None) -> None:
        """Add each module's ΔW·multiplier into its layer's weight (kohya's ``merge_to``)."""
        if weights_sd is not None:
            self.load_state_dict_checked(weights_sd)
        for module in self.text_encoder_loras + self.unet_loras:
            layer = module.org_module
            delta = module.get_delta_weight() * module.multiplier
            layer.weight.add_(delta.to(device=layer.weight.device, dtype=layer.weight.dtype))

    # --- optimizer parameter groups -----------------------------------------------------------------
    def _groups_for(self, modules: list[nn.Module], lr: float | None, ratio: float | None):
        plain_names, plain, plus_names, plus = [], [], [], []
        for module in modules:
            for name, param in module.named_parameters():
                full_name = f"{module.lora_name}.{name}"
                role, _ = naming.classify(full_name)
                if ratio is not None and role in naming.B_SIDE_ROLES:
                    plus_names.append(full_name)
                    plus.append(param)
                else:
                    plain_names.append(full_name)
                    plain.append(param)
        groups, descriptions = [], []
        for names, params, factor, description in ((plain_names, plain, 1.0, ""),
                                                   (plus_names, plus, ratio, "plus")):
            if not params or lr is None or lr == 0:
                continue  # kohya: a part with lr 0 (or none) is not trained
            groups.append({"params": params, "param_names": names, "lr": lr * factor})
            descriptions.append(description)
        return groups, descriptions

    def prepare_optimizer_params(self, text_encoder_lr=None, unet_lr=None, default_lr=None):
        """Param groups ``{"params", "param_names", "lr"}`` and their descriptions, as recent kohya.

        ``text_encoder_lr`` may be one value or a list with one value per text encoder (kohya's
        multiple-TE lrs; a one-element list applies to all). A part whose lr is 0 or None is left out.
        With ``loraplus_*lr_ratio`` the zero-initialised side (``lora_up``, ``lokr_w2``/``lokr_w2_b``)
        gets its own group at ``ratio x lr``.
        """
        if isinstance(text_encoder_lr, (list, tuple)):
            te_lrs = list(text_encoder_lr) or [None]
        else:
            te_lrs = [text_encoder_lr]
        all_groups, all_descriptions = [], []
        te_ratio = self.loraplus_text_encoder_lr_ratio or self.loraplus_lr_ratio
        for index, modules in enumerate(self.text_encoder_loras_per_encoder):
            te_lr = te_lrs[index] if index < len(te_lrs) else te_lrs[-1]
            lr = te_lr if te_lr is not None else default_lr
            groups, descriptions = self._groups_for(modules, lr, te_ratio)
            label = "textencoder" if len(self.text_encoder_loras_per_encoder) == 1 else f"textencoder {index + 1}"
            all_groups += groups
            all_descriptions += [label + (" " + d if d else "") for d in descriptions]
        groups, descriptions = self._groups_for(self.unet_loras, unet_lr if unet_lr is not None else default_lr,
                                                self.loraplus_unet_lr_ratio or self.loraplus_lr_ratio)
        all_groups += groups
        all_descriptions += ["unet" + (" " + d if d else "") for d in descriptions]
        return all_groups, all_descriptions

    # --- files ---------------------------------------------------------------------------------------
    def save_weights(self, file: str, dtype: torch.dtype | None = None, metadata: Mapping[str, str] | None = None):
        """Write the state dict (cast to ``dtype``) with ``metadata``, atomically (temp file, fsync,
        ``os.replace``); safetensors files get kohya's ``sshs_model_hash``/``sshs_legacy_hash``."""
        save_state_dict(file, self.state_dict(), dtype, metadata)

    def check_state_dict(self, weights_sd: Mapping[str, torch.Tensor]) -> tuple[list, list, list]:
        """``(missing, unexpected, shape mismatches)`` of ``weights_sd`` against this network."""
        own = self.state_dict()
        missing = sorted(k for k in own if k not in weights_sd)
        unexpected = sorted(k for k in weights_sd if k not in own)
        mismatched = sorted(f"{k}: file {tuple(weights_sd[k].shape)}, network {tuple(own[k].shape)}"
                            for k in own if k in weights_sd and tuple(weights_sd[k].shape) != tuple(own[k].shape))
        return missing, unexpected, mismatched

    def load_state_dict_checked(self, weights_sd: Mapping[str, torch.Tensor], strict: bool = True, source: str = "weights"):
        """``load_state_dict`` with one clear error naming missing/unexpected keys and shape mismatches.

        With ``strict=False`` missing and unexpected keys are allowed (reported in the returned
        ``_IncompatibleKeys``); a shape mismatch is always an error.
        """
        missing, unexpected, mismatched = self.check_state_dict(weights_sd)
        problems = []
        if strict and missing:
            problems.append(f"{len(missing)} missing keys: " + ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else ""))
        if strict and unexpected:
            problems.append(f"{len(unexpected)} unexpected keys: " + ", ".join(unexpected[:10])
                            + (" ..." if len(unexpected) > 10 else ""))
        if mismatched:
            problems.append("shape mismatches: " + "; ".join(mismatched[:10]) + (" ..." if len(mismatched) > 10 else ""))
        if problems:
            raise ValueError(f"{source} do not fit this {type(self).__name__} "
                             f"({len(self.state_dict())} tensors): " + " | ".join(problems))
        return self.load_state_dict(dict(weights_sd), strict=False)

    def load_weights(self, file: str, strict: bool = True):
        """Load a file written by ``save_weights`` (or kohya/LyCORIS); returns torch's load info."""
        return self.load_state_dict_checked(load_state_dict_file(file), strict=strict, source=f"weights in {file}")


class WrappingModule(nn.Module):
    """Base for an adapter on one layer: wraps ``layer.forward`` (kohya's approach), never copies weights.

    The layer is held outside the module tree (a plain list), so its weight is not in the state dict.
    """

    def __init__(self, lora_name: str, org_module: nn.Module, multiplier: float = 1.0):
        super().__init__()
        if not isinstance(org_module, (nn.Linear, nn.Conv2d)):
            raise TypeError(f"{lora_name}: adapters wrap nn.Linear or nn.Conv2d, got {type(org_module).__name__}")
        self.lora_name = lora_name
        self.multiplier = multiplier
        self._org = [org_module]
        self.org_forward = org_module.forward

    @property
    def org_module(self) -> nn.Module:
        return self._org[0]

    def apply_to(self) -> None:
        layer = self.org_module
        if getattr(layer.forward, "__self__", None) is self:
            return
        self.org_forward = layer.forward
        layer.forward = self.forward

    def restore(self) -> None:
        layer = self.org_module
        if getattr(layer.forward, "__self__", None) is self:
            layer.forward = self.org_forward

    def layer_op(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The wrapped layer's operation with another weight and no bias."""
        layer = self.org_module
        if isinstance(layer, nn.Conv2d):
            return layer._conv_forward(x, weight, None)
        return F.linear(x, weight)


# ----------------------------------------------------------------------------------------------------
# LoKr
# ----------------------------------------------------------------------------------------------------
def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """Split ``dimension`` into ``(m, n)``, ``m * n == dimension``, ``m <= n`` (LyCORIS semantics).

    A positive ``factor`` that divides ``dimension`` is used as one side. Otherwise divisors are walked
    upward, keeping the last one not above ``factor`` (any, for ``factor < 0``) until the two sides meet:
    128 -> (8, 16), 250 -> (10, 25), 127 -> (1, 127), (360, factor 8) -> (8, 45).
    """
    if factor > 0 and dimension % factor == 0:
        return tuple(sorted((factor, dimension // factor)))
    limit = dimension if factor < 0 else factor
    m, n = 1, dimension
    candidate = 1
    while m < n:
        candidate += 1
        while dimension % candidate:
            candidate += 1
        if candidate > limit:
            break
        m, n = candidate, dimension // candidate
    return (m, n) if m <= n else (n, m)


def plan_lokr(weight_shape: tuple[int, ...], dim: int, factor: int = -1, decompose_both: bool = False,
              full_matrix: bool = False, use_tucker: bool = False) -> dict[str, tuple[int, ...]]:
    """The LoKr factor shapes LyCORIS's ``LokrModule`` creates for a weight of ``weight_shape``.

    ``out = a * b`` and ``in = c * d`` by ``factorization``; W1 is ``(a, c)``, W2 is ``(b, d, *k)``.
    W1 is low-rank only with ``decompose_both`` and ``dim < max(a, c) / 2``; W2 is full with
    ``full_matrix`` or ``dim >= max(b, d) / 2``, else low-rank (Tucker for a k x k conv with
    ``use_tucker``: ``t2`` ``(dim, dim, *k)``, ``w2_a`` ``(dim, b)``, ``w2_b`` ``(dim, d)``; otherwise
    ``w2_a`` ``(b, dim)``, ``w2_b`` ``(dim, d * prod(k))``).
    """
    out_dim, in_dim, *kernel = weight_shape
    a, b = factorization(out_dim, factor)
    c, d = factorization(in_dim, factor)
    plan: dict[str, tuple[int, ...]] = {}
    if decompose_both and dim < max(a, c) / 2 and not full_matrix:
        plan[naming.LOKR_W1_A], plan[naming.LOKR_W1_B] = (a, dim), (dim, c)
    else:
        plan[naming.LOKR_W1] = (a, c)
    if full_matrix or dim >= max(b, d) / 2:
        plan[naming.LOKR_W2] = (b, d, *kernel)
    elif use_tucker and any(k != 1 for k in kernel):
        plan[naming.LOKR_T2] = (dim, dim, *kernel)
        plan[naming.LOKR_W2_A], plan[naming.LOKR_W2_B] = (dim, b), (dim, d)
    else:
        plan[naming.LOKR_W2_A], plan[naming.LOKR_W2_B] = (b, dim), (dim, d * math.prod(kernel))
    return plan


def _plan_from_tensors(lora_name: str, tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    plan = {role: tuple(tensors[role].shape) for role in naming.LOKR_NAMES if role in tensors}
    has_w1 = naming.LOKR_W1 in plan or (naming.LOKR_W1_A in plan and naming.LOKR_W1_B in plan)
    has_w2 = naming.LOKR_W2 in plan or (naming.LOKR_W2_A in plan and naming.LOKR_W2_B in plan)
    if not (has_w1 and has_w2):
        raise ValueError(f"{lora_name}: not a complete LoKr module; keys present: {sorted(tensors)}; need "
                         f"{naming.LOKR_W1} or {naming.LOKR_W1_A}+{naming.LOKR_W1_B}, and "
                         f"{naming.LOKR_W2} or {naming.LOKR_W2_A}+{naming.LOKR_W2_B}")
    return plan


class LoKrModule(WrappingModule):
    """LoKr on one Linear or Conv2d: ``y = layer(x) + drop(op(x, ΔW) · multiplier)``.

    ``plan`` gives the factor shapes (``plan_lokr``, or a file's shapes); ``dim`` is the rank used in
    ``scale = alpha / dim``. Dropouts as LyCORIS defines them for LoKr: ``rank_dropout`` zeroes rows of
    ΔW while training (rescaled by the kept fraction with ``rank_dropout_scale``), ``module_dropout``
    skips the whole module for a step (its parameters then get no gradient), ``dropout`` drops elements
    of ``op(x, ΔW)`` (LyCORIS's bypass-mode definition; its weight-rebuild mode ignores it).
    """

    def __init__(self, lora_name: str, org_module: nn.Module, plan: Mapping[str, tuple[int, ...]], dim: int,
                 alpha: float | None = None, multiplier: float = 1.0, dropout: float = 0.0,
                 rank_dropout: float = 0.0, module_dropout: float = 0.0, rank_dropout_scale: bool = False):
        super().__init__(lora_name, org_module, multiplier)
        self.weight_shape = tuple(org_module.weight.shape)
        self.lora_dim = int(dim)
        self.dropout = dropout
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout
        self.rank_dropout_scale = rank_dropout_scale
        self.full_w1 = naming.LOKR_W1 in plan
        self.full_w2 = naming.LOKR_W2 in plan
        self.tucker = naming.LOKR_T2 in plan
        for role in naming.LOKR_NAMES:
            if role in plan:
                self.register_parameter(role, nn.Parameter(torch.empty(plan[role])))
        # LyCORIS: the output-side factor starts at zero (so ΔW = 0), everything else kaiming-uniform.
        for role in naming.LOKR_NAMES:
            if role in plan:
                if role in naming.LOKR_ZERO_INIT:
                    nn.init.zeros_(getattr(self, role))
                else:
                    nn.init.kaiming_uniform_(getattr(self, role), a=math.sqrt(5))
        if alpha is None or float(alpha) == 0:
            alpha = self.lora_dim
        if self.full_w1 and self.full_w2:
            alpha = self.lora_dim  # LyCORIS: both factors full -> scale 1
        self.register_buffer("alpha", torch.tensor(float(alpha)))
        shape = tuple(self.full_weight_shape())
        if shape != self.weight_shape:
            raise ValueError(f"{lora_name}: LoKr factors {dict(plan)} give a weight of shape {shape}, "
                             f"but the layer's weight is {self.weight_shape}")

    @property
    def scale(self) -> float:
        if self.full_w1 and self.full_w2:
            return 1.0
        return float(self.alpha) / self.lora_dim

    def _w1(self) -> torch.Tensor:
        return self.lokr_w1 if self.full_w1 else self.lokr_w1_a @ self.lokr_w1_b

    def _w2(self) -> torch.Tensor:
        kernel = self.weight_shape[2:]
        if self.full_w2:
            return self.lokr_w2
        if self.tucker:
            # t2 (r, r, *k) contracted with w2_a (r, b) on its first index and w2_b (r, d) on its second.
            return torch.einsum("ij...,ip,jq->pq...", self.lokr_t2, self.lokr_w2_a, self.lokr_w2_b)
        w2 = self.lokr_w2_a @ self.lokr_w2_b.reshape(self.lokr_w2_b.shape[0], -1)
        return w2.reshape(w2.shape[0], -1, *kernel)

    def full_weight_shape(self) -> tuple[int, ...]:
        with torch.no_grad():
            w1 = self._w1()
            w2 = self._w2()
        return (w1.shape[0] * w2.shape[0], w1.shape[1] * w2.shape[1], *w2.shape[2:])

    def get_delta_weight(self) -> torch.Tensor:
        """ΔW = kron(W1, W2) · scale, shaped like the layer's weight (no multiplier, no dropout)."""
        w1, w2 = self._w1(), self._w2()
        w1 = w1.reshape(*w1.shape, *[1] * (w2.dim() - 2))
        return torch.kron(w1, w2.contiguous()) * self.scale

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        base = self.org_forward(x, *args, **kwargs)
        if self.training and self.module_dropout and torch.rand(()) < self.module_dropout:
            return base
        delta = self.get_delta_weight()
        if self.training and self.rank_dropout:
            keep = (torch.rand(delta.shape[0], device=delta.device) > self.rank_dropout).to(delta.dtype)
            if self.rank_dropout_scale:
                keep = keep / keep.mean().clamp_min(1e-12)
            delta = delta * keep.reshape(-1, *[1] * (delta.dim() - 1))
        out = self.layer_op(x, (delta * self.multiplier).to(x.dtype))
        if self.training and self.dropout:
            out = F.dropout(out, p=self.dropout)
        return base + out


LOKR_ARGS = {
    "conv_dim": as_optional_int, "conv_alpha": as_optional_float,
    "factor": as_optional_int, "decompose_both": as_bool, "full_matrix": as_bool,
    "use_tucker": as_bool, "use_cp": as_bool,  # use_cp: LyCORIS's older name for use_tucker
    "dropout": as_probability, "neuron_dropout": as_probability, "rank_dropout": as_probability,
    "module_dropout": as_probability, "rank_dropout_scale": as_bool,
    "loraplus_lr_ratio": as_optional_float, "loraplus_unet_lr_ratio": as_optional_float,
    "loraplus_text_encoder_lr_ratio": as_optional_float,
    "algo": lambda key, value: _check_algo(value), "verbose": as_bool,
}


def _check_algo(value) -> str:
    if str(value).lower() not in ("lokr", "kron"):
        raise ValueError(f"network arg algo={value!r}: networks.lokr only does LoKr (algo=lokr)")
    return "lokr"


def _dropouts(args: dict) -> dict:
    dropout = args.get("dropout") or args.get("neuron_dropout") or 0.0
    return {"dropout": dropout, "rank_dropout": args.get("rank_dropout", 0.0),
            "module_dropout": args.get("module_dropout", 0.0),
            "rank_dropout_scale": args.get("rank_dropout_scale", False)}


def _loraplus(args: dict) -> dict:
    return {k: args.get(k) for k in ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio")}


class LoKrNetwork(AdapterNetwork):
    """kohya network of ``LoKrModule``s (see ``create_network``)."""


def find_targets(text_encoder, unet, with_conv: bool):
    """``[(te layers) per encoder]``, ``unet layers`` — kohya's targets."""
    te_layers = [find_target_layers(te, prefix, TEXT_ENCODER_TARGETS, path_prefix)
                 for prefix, te, path_prefix in text_encoder_roots(text_encoder)]
    unet_classes = UNET_TARGETS + (UNET_CONV_TARGETS if with_conv else ())
    unet_layers = find_target_layers(unet, PREFIX_UNET, unet_classes) if unet is not None else []
    return te_layers, unet_layers


def create_network(multiplier: float, network_dim: int | None, network_alpha: float | None, vae, text_encoder,
                   unet, neuron_dropout: float | None = None, **kwargs) -> LoKrNetwork:
    """kohya entry point: a LoKr network for ``unet`` and ``text_encoder`` (one module or a list).

    ``network_args``: ``factor`` (-1), ``decompose_both``, ``full_matrix``, ``use_tucker``, ``conv_dim``
    / ``conv_alpha`` (k x k convs in ResnetBlock2D/Downsample2D/Upsample2D; off unless given),
    ``dropout``, ``rank_dropout``, ``module_dropout``, ``rank_dropout_scale``, ``loraplus_*lr_ratio``.
    """
    args = parse_network_args(kwargs, LOKR_ARGS)
    if neuron_dropout is not None:
        args.setdefault("neuron_dropout", as_probability("neuron_dropout", neuron_dropout))
    dim = 4 if network_dim is None else int(network_dim)
    alpha = 1.0 if network_alpha is None else float(network_alpha)
    conv_dim = args.get("conv_dim")
    conv_alpha = args.get("conv_alpha")
    conv_alpha = 1.0 if conv_alpha is None else conv_alpha
    shape_args = {"factor": args.get("factor") if args.get("factor") is not None else -1,
                  "decompose_both": args.get("decompose_both", False),
                  "full_matrix": args.get("full_matrix", False),
                  "use_tucker": args.get("use_tucker", False) or args.get("use_cp", False)}
    te_layers, unet_layers = find_targets(text_encoder, unet, with_conv=bool(conv_dim))

    def build(name, layer):
        layer_dim, layer_alpha = (conv_dim, conv_alpha) if is_kxk_conv(layer) else (dim, alpha)
        if not layer_dim:
            return None
        plan = plan_lokr(tuple(layer.weight.shape), layer_dim, **shape_args)
        return LoKrModule(name, layer, plan, layer_dim, layer_alpha, multiplier, **_dropouts(args))

    te_modules = [[m for m in (build(n, l) for n, l in layers) if m is not None] for layers in te_layers]
    unet_modules = [m for m in (build(n, l) for n, l in unet_layers) if m is not None]
    return LoKrNetwork(te_modules, unet_modules, multiplier, **_loraplus(args))


def modules_from_weights(weights_sd, file, text_encoder, unet, kind: str, build):
    """The shared part of kohya's ``create_network_from_weights``: group the file's tensors by module,
    check that every module names a layer of this model, and ``build(name, layer, tensors)`` one module per
    layer the file has. Returns ``(text_encoder_modules per encoder, unet_modules)``."""
    by_module = split_by_module(weights_sd)
    te_layers, unet_layers = find_targets(text_encoder, unet, with_conv=True)
    # A file may adapt layers outside kohya's target classes (LyCORIS presets reach time_embedding, conv_in,
    # proj_in ...); LyCORIS loads them by name, and so does this: each is appended after the targets.
    te_everything = [all_layers(te, prefix, path_prefix) for prefix, te, path_prefix in text_encoder_roots(text_encoder)]
    unet_everything = all_layers(unet, PREFIX_UNET) if unet is not None else []
    te_layers = [_with_extra(layers, everything, by_module) for layers, everything in zip(te_layers, te_everything)]
    unet_layers = _with_extra(unet_layers, unet_everything, by_module)
    known = {name for layers in te_layers for name, _ in layers} | {name for name, _ in unet_layers}
    unknown = sorted(name for name in by_module if name not in known)
    if unknown:
        raise ValueError(f"{file or 'weights'}: {len(unknown)} {kind} modules name layers this model does not have "
                         f"(no nn.Linear/nn.Conv2d of the UNet or text encoder has that kohya name): "
                         + ", ".join(unknown[:10]) + (" ..." if len(unknown) > 10 else ""))
    te_modules = [[build(n, layer, by_module[n]) for n, layer in layers if n in by_module] for layers in te_layers]
    unet_modules = [build(n, layer, by_module[n]) for n, layer in unet_layers if n in by_module]
    return te_modules, unet_modules


def _with_extra(targets, everything, wanted) -> list[tuple[str, nn.Module]]:
    """``targets`` plus the layers of ``everything`` outside them that ``wanted`` names."""
    have = {name for name, _ in targets}
    return list(targets) + [(name, layer) for name, layer in everything if name in wanted and name not in have]


def create_network_from_weights(multiplier: float, file: str | None, vae, text_encoder, unet,
                                weights_sd: Mapping[str, torch.Tensor] | None = None, for_inference: bool = False,
                                **kwargs) -> tuple[LoKrNetwork, dict]:
    """kohya entry point: a LoKr network shaped by a file's tensors (any factor/layout), and the weights.

    Keys for layers the model does not have are an error naming them. ``for_inference`` is accepted
    for kohya's interface; the same module serves both. Returns ``(network, weights_sd)``; load the
    weights with ``network.load_state_dict_checked(weights_sd)`` (kohya: ``load_state_dict``).
    """
    args = parse_network_args({k: v for k, v in kwargs.items() if v is not None}, LOKR_ARGS)
    if weights_sd is None:
        weights_sd = load_state_dict_file(file)
    weights_sd = dict(weights_sd)

    def build(name, layer, tensors):
        plan = _plan_from_tensors(name, tensors)
        if naming.LOKR_W1_A in plan:
            dim = plan[naming.LOKR_W1_A][1]
        elif naming.LOKR_T2 in plan:
            dim = plan[naming.LOKR_T2][0]
        elif naming.LOKR_W2_A in plan:
            dim = plan[naming.LOKR_W2_A][1]
        else:
            dim = 1  # both full: scale is 1 whatever alpha says (LyCORIS)
        alpha = tensors.get("alpha")
        alpha = float(alpha) if alpha is not None else None
        return LoKrModule(name, layer, plan, dim, alpha, multiplier, **_dropouts(args))

    te_modules, unet_modules = modules_from_weights(weights_sd, file, text_encoder, unet, "LoKr", build)
    network = LoKrNetwork(te_modules, unet_modules, multiplier, **_loraplus(args))
    return network, weights_sd
