"""The optimizer core shared by every Hina optimizer.

``HinaOptimizer`` is a ``torch.optim.Optimizer`` that, per param group, runs the pipeline of DESIGN.md:

1. collect the params that have a gradient (a param whose ``.grad`` is None is skipped, its state left
   untouched); a tensor whose gradient is not finite, or so large that its square overflows float32
   (``sum(g^2)`` not finite), is skipped the same way and counted in ``skipped_updates``;
2-4. the optimizer's recipe: gradient transforms, moment rule, update transforms;
5. learning rate per tensor: the group's current ``lr`` times role multipliers (so schedulers work);
6. apply: decoupled weight decay (optionally on the dynamic schedule), the update, SPD;
7. write-back into the params, state codec fp32 or 8-bit blockwise (the bf16 optimizer: ``make_codec``).

Bounded chunks. Each param group is cut into *chunks*: ``FlatPack``s of whole tensors holding at most
``chunk_elements`` elements (``model_chunk_elements``: an eighth of the model's elements rounded down to a power of
two, between 2^16 and ``CHUNK_ELEMENTS`` = 2^20, so that the work memory of a small model stays small); a larger
tensor gets a chunk of its own. Tensors are packed first-fit by decreasing size, so chunks are nearly full. A
chunk's shape is padded to a small fixed set (``chunk_shape``): ``total`` to one of 4 sizes per octave (a full chunk
to exactly ``chunk_elements``), ``slots`` (per-tensor vectors) to a power of two of at least ``MIN_SLOTS``, the
largest among the chunks of one total. Full chunks all share one shape, so a recipe compiles one graph per state
layout for them plus one per partial chunk (one per state layout and param group) and one per distinct size of
tensors above the chunk size: in practice 2-6 graphs. That is bounded by the recompile limit (8 by default); past
it, the extra shapes step eagerly, said once in a warning (compiled.py). Work buffers (gathered gradient, weight
copy, decoded states, scratch) come from one ``WorkPool`` per optimizer, sized by the largest chunk, never more than
the chunk cap: ``workspace_bytes`` in ``get_optimization_info()['training_stats']``. Per-tensor reductions stay
exact because a chunk holds whole tensors, and a per-tensor recipe's result does not depend on the chunk size (a
per-tensor sum adds the same blocks in the same order; AdamW_HinaAdaptive's importance is relative to the tensors
stepped together, and the bf16 and C-Optim random streams follow the chunks, so theirs do).

State lives per chunk (fp32 buffers, or 8-bit codes + absmax); ``optimizer.state[p]`` holds views into those
buffers, so ``state_dict()`` is per parameter as in torch.optim, and ``load_state_dict()`` restores it exactly
(dtypes included: torch's default would cast 8-bit codes to the parameter dtype).

With ``resident_weights`` (CPU, float32 params) the params themselves live in their chunk's flat buffer
(``_make_resident``), so the step updates them in place instead of gathering them and copying the result back.

Each optimizer runs a chunk through its ``fused_step``: decode, the recipe, apply and encode in one or a few
functions (compiled when ``compile_step`` asks for it). The tests hold the plain per-tensor references.
"""

from __future__ import annotations

import copy
import warnings
from collections import defaultdict
from dataclasses import dataclass
from itertools import chain
from typing import Any, Callable, Iterable

import torch

from . import naming
from .codec import Blockwise8bitCodec, Fp32Codec
from .compiled import AUTO_MIN_ELEMENTS
from .pack import FlatPack, WorkPool
from .stages import MIN_8BIT_SIZE, Recipe
from .techniques.spd import spd_ratio
from .techniques.weight_decay import weight_decay_ratio

ADAPTER_MATRIX_ROLES = ("lora_a", "lora_b", *naming.LOKR_NAMES)
# Block alignment of fp32 packs (8-bit packs align to the quantisation block): per-tensor reductions are
# block sums, so blocks must not straddle tensors; 64 keeps padding small for tiny tensors.
FP32_ALIGN = 64
CHUNK_ELEMENTS = 1 << 20   # largest chunk: 4 MiB per fp32 work buffer
MIN_CHUNK_ELEMENTS = 1 << 16
MODEL_CHUNK_DIVISOR = 8    # a chunk holds at most 1 / this of the model's elements (model_chunk_elements)
MIN_SLOTS = 16             # smallest padded per-tensor vector


def _initial_lr(group: dict) -> float:
    """The group's lr before any scheduler factor (torch schedulers keep it as ``initial_lr``): a warm-up
    that starts at lr 0 must not hide the ratio between groups."""
    lr = group.get("initial_lr", group.get("lr", 0.0))
    return float(lr)


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def model_chunk_elements(total: int) -> int:
    """Chunk size for an optimizer over ``total`` elements: ``total / MODEL_CHUNK_DIVISOR`` rounded down to a power
    of two, within [``MIN_CHUNK_ELEMENTS``, ``CHUNK_ELEMENTS``].

    Every chunk costs a fixed amount of host work per step (the compiled call's guards and wrappers, the per-tensor
    vectors, the gathers' dispatch: 0.13-0.17 ms on this project's CPU, 1 thread), so fewer, larger chunks step faster;
    but a step holds a few chunk-sized fp32 buffers (the pool's gathered gradient and weights, the compiled step's
    temporaries), so the chunk must stay small beside the model. An eighth of the model: SD1.5 LoRA rank 16 (6.8M
    elements) gets 512K-element chunks (14 instead of 27 at a sixteenth), models of 8M+ elements the largest.
    Measured there (benchmarks/step_speed.py, 2 threads, x torch AdamW fused paired, warm compile cache, 256K ->
    512K): HinaAdamW 8-bit 5.70 -> 5.27, all off 32-bit 3.84 -> 3.07, AdamW_HinaAdaptive 11.63 -> 9.41,
    Automagic_CameAMP8bit 13.81 -> 11.13; the work pool doubles (HinaAdamW 0.31 -> 0.62 bytes per parameter,
    Automagic_CameAMP8bit 1.10 -> 2.20), a few MiB at that size. 1M-element chunks there were no faster for the
    8-bit step (one thread: their temporaries were faulted in again on every call), and 2M-element chunks at SDXL
    r32 were slower (HinaAdamW 8-bit, 1 thread: 710-738 against 565-585 ms) and held more (4.0 against 2.6 bytes per
    parameter), hence the 1M cap.
    """
    part = int(total) // MODEL_CHUNK_DIVISOR
    chunk = 1 << (part.bit_length() - 1) if part else 1  # largest power of two <= total / MODEL_CHUNK_DIVISOR
    return min(CHUNK_ELEMENTS, max(MIN_CHUNK_ELEMENTS, chunk))


def chunk_shape(used: int, count: int, align: int, chunk_elements: int) -> tuple[int, int]:
    """(total, slots) a chunk of ``used`` elements and ``count`` tensors is padded to (see the module doc).

    ``total``: ``used`` rounded up to an eighth of the next power of two, i.e. one of 4 sizes per octave (so
    padding is under 25 %, and a full chunk pads to ``chunk_elements``); above ``chunk_elements`` (one large
    tensor), to a multiple of ``chunk_elements / 16``. ``slots``: a power of two, at least ``MIN_SLOTS``.
    """
    if used <= chunk_elements:
        granule = max(_next_pow2(used) // 8, align)
    else:
        granule = max(chunk_elements // 16, align)
    return -(-used // granule) * granule, max(_next_pow2(count), MIN_SLOTS)


def pack_chunks(sizes: dict[int, int], chunk_elements: int) -> list[list[int]]:
    """First-fit decreasing: indices grouped so each group's sizes sum to at most ``chunk_elements`` (a
    larger item alone). Deterministic: ties keep index order."""
    bins: list[list] = []
    for index in sorted(sizes, key=lambda i: (-sizes[i], i)):
        size = sizes[index]
        for b in bins:
            if b[0] + size <= chunk_elements:
                b[0] += size
                b[1].append(index)
                break
        else:
            bins.append([size, [index]])
    return [b[1] for b in bins]


@dataclass
class GroupLayout:
    """How one param group is laid out: its chunks."""

    chunks: list[FlatPack]


def _has_fp32_codec_state(state: dict, specs) -> bool:
    """True when a codec state of this param is held in fp32 (after an 8-bit fallback, or loaded so)."""
    return any(isinstance(state.get(name), torch.Tensor) and state[name].is_floating_point() for name, _ in specs)


def release_freed_host_memory() -> None:
    """Hand memory that the process freed back to the OS (glibc ``malloc_trim``; elsewhere nothing). After params
    move into the chunk buffers their old storages are free, but glibc keeps small freed blocks in the heap, where
    they count in the resident set until something reuses them. Measured (benchmarks/step_speed.py, SDXL r32,
    HinaAdamW 8-bit defaults with resident_weights, 1 thread): steady peak 5.85 B/param without this call, 3.0 with
    it (2.6 without residency; with a fixed glibc mmap threshold, MALLOC_MMAP_THRESHOLD_=131072: 2.44 vs 2.51)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _storage_key(p: torch.Tensor) -> int:
    return p.untyped_storage().data_ptr()


def _owns_storage(p: torch.Tensor) -> bool:
    """True when ``p`` is a plain dense tensor that is all of its storage (not a view into a larger one)."""
    return (type(p.data) is torch.Tensor and p.layout == torch.strided and p.storage_offset() == 0
            and p.is_contiguous() and p.untyped_storage().nbytes() == p.numel() * p.element_size())


def _why_not_resident(p: torch.Tensor) -> str | None:
    """Why ``p`` cannot live in a chunk buffer (``resident_weights``), or None when it can (storage sharing aside)."""
    if p.device.type != "cpu":
        return f"parameters on {p.device.type}"
    if p.dtype != torch.float32:
        return f"{str(p.dtype).replace('torch.', '')} parameters"
    if not _owns_storage(p) or p.numel() == 0:
        return "parameters that view a larger tensor or are empty"
    return None


def _move_into(pack: FlatPack, memory, index: int, p: torch.Tensor) -> None:
    """``p``'s values into its slice of the chunk buffer (``memory``: the buffer as a NumPy array), and ``p.data``
    onto that slice, as a tensor that is its whole storage (it keeps the buffer alive)."""
    offset, numel = pack.offsets[index], pack.numels[index]
    resident = torch.frombuffer(memory[offset:offset + numel], dtype=torch.float32).view(pack.shapes[index])
    resident.copy_(p.detach())
    p.data = resident


def _shared_storages(params: list[torch.Tensor]) -> set[int]:
    """Storages that more than one distinct param of the list uses (those params must keep their storage)."""
    seen: set[int] = set()
    shared = set()
    for p in {id(p): p for p in params}.values():  # a param listed twice is one param
        key = _storage_key(p)
        if key in seen:
            shared.add(key)
        seen.add(key)
    return shared


def _row_length(p: torch.Tensor) -> int:
    return p.numel() // p.shape[0] if p.dim() >= 2 and p.shape[0] else 0


def _normalize_param_groups(params: Any) -> list[dict]:
    """Accept tensors, ``(name, tensor)`` pairs, or param-group dicts (with ``param_names`` or ``named``)."""
    if isinstance(params, torch.Tensor):
        raise TypeError("params must be an iterable of tensors, (name, tensor) pairs or dicts, not a single tensor")
    items = list(params)
    if not items:
        raise ValueError("optimizer got an empty parameter list")
    if not isinstance(items[0], dict):
        items = [{"params": items}]
    groups = []
    for group in items:
        if not isinstance(group, dict):
            raise TypeError(f"param groups must all be dicts, got {type(group).__name__}")
        group = dict(group)
        group_params = group["params"]
        group_params = [group_params] if isinstance(group_params, torch.Tensor) else list(group_params)
        names = group.pop("named", None)
        if group_params and isinstance(group_params[0], (tuple, list)):
            names = [name for name, _ in group_params]
            group_params = [p for _, p in group_params]
        if names is not None:
            names = [n[0] if isinstance(n, (tuple, list)) else n for n in names]
            if len(names) != len(group_params):
                raise ValueError(f"'named' has {len(names)} names for {len(group_params)} params")
            group["param_names"] = list(names)
        group["params"] = group_params
        groups.append(group)
    for gi, group in enumerate(groups):
        for pi, p in enumerate(group["params"]):
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"group {gi} param {pi} is a {type(p).__name__}, not a tensor")
            if not p.is_floating_point():
                raise TypeError(f"group {gi} param {pi} (shape {tuple(p.shape)}) is {p.dtype}; only floating-point "
                                "tensors can be optimized (float32, float16 or bfloat16)")
    # torch.optim requires param_names on all groups or none.
    if any("param_names" in g for g in groups):
        for g in groups:
            g.setdefault("param_names", [None] * len(g["params"]))
    return groups


class HinaOptimizer(torch.optim.Optimizer):
    """Base class. A subclass sets ``recipe`` (stages.py: its stages, in order, and its defaults) and defines
    ``fused_step``; its constructor signature, argument validation, ``defaults``, ``feature_flags``,
    ``state_specs`` and ``vector_specs`` come from the recipe."""

    recipe: Recipe
    optimizer_type = "HinaOptimizer"
    #: Feature flags reported by ``get_optimization_info()['features']`` (set from the recipe).
    feature_flags: tuple[str, ...] = ()
    #: Elements per chunk; None: sized by the model (``model_chunk_elements``). Tests set a tiny value on an instance.
    chunk_elements: int | None = None

    def __init_subclass__(cls, **kwargs):
        """A class with its own ``recipe`` gets the recipe's signature on its ``__init__`` (``inspect.signature``,
        ``help()`` and registry.py's ``--optimizer_args`` check read it) and its feature flags."""
        super().__init_subclass__(**kwargs)
        recipe = cls.__dict__.get("recipe")
        if recipe is None:
            return
        cls.feature_flags = recipe.feature_flags
        inner = cls.__init__

        def __init__(self, params, *args, **kwargs):
            inner(self, params, *args, **kwargs)

        __init__.__signature__ = recipe.signature()
        __init__.__qualname__ = f"{cls.__qualname__}.__init__"
        __init__.__doc__ = recipe.doc()
        cls.__init__ = __init__

    def __init__(self, params: Iterable, *args, **kwargs):
        recipe = type(self).recipe
        bound = recipe.signature().bind(self, params, *args, **kwargs)
        bound.apply_defaults()
        settings = recipe.settings(bound.arguments)
        group_flags = [flag.name for flag in recipe.flags if flag.group]
        #: Optimizer-wide settings (codec, compile_step, ...): the recipe's flags that are not param-group keys.
        self.settings = {name: value for name, value in settings.items() if name not in group_flags}
        self.optim_bits = self.settings.get("optim_bits", 32)
        self.block_size = self.settings.get("block_size", 256)
        self.min_8bit_size = self.settings.get("min_8bit_size", MIN_8BIT_SIZE)
        self.compile_step = self.settings.get("compile_step")
        self.resident_weights = self.settings.get("resident_weights", False)
        self._layouts: dict[int, GroupLayout] = {}
        self._work = WorkPool()
        super().__init__(_normalize_param_groups(params), {name: settings[name] for name in group_flags})

    # ------------------------------------------------------------------------------------------------
    # subclass interface
    def state_specs(self, group: dict, roles: list[str]) -> list[tuple[str, bool]]:
        """Flat states (name, signed) kept by the codec for a chunk whose tensors have ``roles``: those the recipe's
        stages declare, in recipe order."""
        return self.recipe.state_specs(group, roles)

    def vector_specs(self, group: dict) -> list[str]:
        """Per-tensor scalar states (one float per tensor) kept in fp32, as the recipe's stages declare them."""
        return self.recipe.vector_specs(group)

    def fused_step(self, group: dict, pack: FlatPack, grad: torch.Tensor, weight: torch.Tensor, steps: list[int],
                   active: list[bool]) -> torch.Tensor:
        """One chunk's step: decode its states, run the recipe on the gathered ``grad`` and ``weight`` (which becomes
        the new weights), encode. Returns the tensors skipped as non-finite, a bool per slot."""
        raise NotImplementedError

    def lr_multipliers(self, group: dict, roles: list[str]) -> list[float]:
        return [1.0] * len(roles)

    def weight_decay_multipliers(self, group: dict, roles: list[str]) -> list[float]:
        return [1.0] * len(roles)

    def row_scaled(self, group: dict, roles: list[str]) -> list[bool]:
        """Tensors whose update gets ALLoRA's per-row coefficient."""
        return [False] * len(roles)

    def observe_loss(self, loss) -> None:
        """The trainer reports each step's loss here; optimizers that use it override this."""

    # ------------------------------------------------------------------------------------------------
    # names and layout
    def attach_names(self, module: torch.nn.Module) -> "HinaOptimizer":
        """Name the params after ``module.named_parameters()`` (for role detection); returns self."""
        for group in self.param_groups:
            mapping = naming.names_from_module(module, group["params"])
            old = group.get("param_names") or [None] * len(group["params"])
            group["param_names"] = [mapping.get(id(p), o) for p, o in zip(group["params"], old)]
            group["name_source"] = "attach_names"
        for group in self.param_groups:  # torch requires the key on every group
            group.setdefault("param_names", [None] * len(group["params"]))
        self._layouts.clear()
        self.__dict__.pop("_roles_checked", None)  # names changed: check roles and LoRA+ groups again
        return self

    def add_param_group(self, param_group: dict) -> None:
        if hasattr(self, "_layouts") and isinstance(param_group, dict):
            [param_group] = _normalize_param_groups([param_group])
        super().add_param_group(param_group)
        if hasattr(self, "_layouts"):
            self._layouts.clear()
            self.__dict__.pop("_roles_checked", None)

    def _name_source(self, group: dict) -> str:
        if group.get("name_source"):
            return group["name_source"]
        return "param_names"

    def _model_pairing(self) -> naming.ModelPairing:
        """Roles and pairs over all param groups (the one place roles come from): pairs are formed by module
        prefix across groups (kohya's LoRA+ puts ``lora_down`` and ``lora_up`` in different groups)."""
        return naming.pair_groups([
            naming.GroupParams(group.get("param_names"), [tuple(p.shape) for p in group["params"]],
                               self._name_source(group), _initial_lr(group))
            for group in self.param_groups])

    def _pairings(self) -> list[naming.Pairing]:
        """One ``naming.Pairing`` per param group (roles, and the pairs that lie inside the group)."""
        return self._model_pairing().groups

    def _check_roles_once(self) -> None:
        """At the first step: say once when no names reached the optimizer (stock sd-scripts), and when the
        param groups already carry kohya's LoRA+ ratio, apply it once (B-side multiplier 1.0 in those groups:
        ``group['lora_plus_from_groups']``, read by ``lr_multipliers``)."""
        if self.__dict__.get("_roles_checked"):
            return
        self._roles_checked = True
        model = self._model_pairing()
        notice = naming.unnamed_parameters_notice(model, self.optimizer_type)
        if notice:
            warnings.warn(f"{notice} Outside sd-scripts: pass model.named_parameters(), or call "
                          "optimizer.attach_names(model) before the first step.", UserWarning, stacklevel=4)
        split = naming.detect_split_lora_plus(model, [_initial_lr(g) for g in self.param_groups])
        if split is None:
            return
        for index in split.b_groups:
            self.param_groups[index]["lora_plus_from_groups"] = True
        ratio = self.defaults.get("alora_ratio", 1.0)
        if self.defaults.get("use_alora") and ratio != 1.0:
            warnings.warn(split.message(self.optimizer_type, ratio), UserWarning, stacklevel=4)
        self._layouts.clear()  # the multipliers of the B-side chunks change

    def _layout(self, index: int, group: dict) -> GroupLayout:
        layout = self._layouts.get(index)
        if layout is None:
            layout = self._layouts[index] = self._build_layout(group, self._pairings()[index].roles())
        return layout

    def chunk_size(self) -> int:
        """Elements per chunk: ``chunk_elements`` if set, else ``model_chunk_elements`` of all param groups."""
        if self.chunk_elements is not None:
            return int(self.chunk_elements)
        return model_chunk_elements(sum(p.numel() for g in self.param_groups for p in g["params"]))

    def _build_layout(self, group: dict, roles: list[str]) -> GroupLayout:
        chunk_elements = self.chunk_size()
        buckets: dict[tuple, list[int]] = {}
        seen: set[int] = set()
        for index, p in enumerate(group["params"]):
            if id(p) in seen:  # a param listed twice steps once
                continue
            seen.add(id(p))
            eight_bit = (self.optim_bits == 8 and p.numel() >= self.min_8bit_size
                         and not _has_fp32_codec_state(self.state.get(p, {}), self.state_specs(group, [roles[index]])))
            key = (str(p.device), eight_bit, tuple(self.state_specs(group, [roles[index]])))
            buckets.setdefault(key, []).append(index)
        chunks = []
        shared = _shared_storages(group["params"])
        for (_, eight_bit, specs), indices in buckets.items():
            align = self.block_size if eight_bit else FP32_ALIGN
            sizes = {i: -(-max(group["params"][i].numel(), 1) // align) * align for i in indices}
            # Within a chunk, order by row length, so tensors whose rows are equally long sit side by side and
            # ALLoRA's row scaling treats each run of them as one matrix (techniques/alora.py); then by shape, so
            # equal shapes are adjacent (CAME's statistics batch them, techniques/came.py).
            member_lists = [sorted(members, key=lambda i: (_row_length(group["params"][i]),
                                                           tuple(group["params"][i].shape), i))
                            for members in pack_chunks(sizes, chunk_elements)]
            shapes = [chunk_shape(sum(sizes[i] for i in members), len(members), align, chunk_elements)
                      for members in member_lists]
            # chunks of one total share the largest slot count: one compiled graph per total, not per (total, slots)
            widest = {}
            for total, slots in shapes:
                widest[total] = max(widest.get(total, 0), slots)
            for members, (total, _) in zip(member_lists, shapes):
                slots = widest[total]
                chunk = FlatPack([group["params"][i] for i in members], members, align=align, total=total, slots=slots)
                chunk.pool = self._work
                chunk.roles = [roles[i] for i in members]
                chunk.state_specs = list(specs)  # the chunk's states, fixed with its layout
                chunk.codec = self.make_codec(chunk, eight_bit)
                chunk.vectors = {name: torch.zeros(slots, device=chunk.device) for name in self.vector_specs(group)}
                for name, signed in specs:
                    chunk.codec.create(name, signed)
                self._adopt_state(chunk, [name for name, _ in specs])
                self._make_resident(chunk, shared)
                chunks.append(chunk)
        if any(chunk.weights is not None for chunk in chunks):
            release_freed_host_memory()
        self._say_why_not_resident(chunks)
        return GroupLayout(chunks)

    def _say_why_not_resident(self, chunks: list[FlatPack]) -> None:
        """With ``resident_weights`` asked for, say once when chunks keep gathering their weights, and why (the flag
        applies to float32 params on CPU that own their storage)."""
        if not self.resident_weights or self.__dict__.get("_warned_resident"):
            return
        reasons = set()
        for chunk in chunks:
            if chunk.weights is None:
                reasons |= ({_why_not_resident(p) for p in chunk.params} - {None}
                            or {"parameters that share storage with another"})
        reasons = sorted(reasons)
        if reasons:
            self._warned_resident = True
            left = sum(chunk.weights is None for chunk in chunks)
            warnings.warn(f"{self.optimizer_type}: resident_weights: {left} of {len(chunks)} chunks keep gathering "
                          f"their weights each step ({'; '.join(reasons)}); it applies to float32 parameters on CPU "
                          "that own their storage", UserWarning, stacklevel=4)

    def make_codec(self, chunk: FlatPack, eight_bit: bool):
        """The state storage of one chunk: 8-bit blockwise or fp32 (a subclass may store its states otherwise)."""
        return Blockwise8bitCodec(chunk, self.block_size) if eight_bit else Fp32Codec(chunk)

    def _adopt_state(self, pack: FlatPack, names: list[str]) -> None:
        """Move existing per-param state (from load_state_dict) into the chunk, then point state at views."""
        views = {}
        for name in names:
            views.update(pack.codec.state_views(name))
        for i, p in enumerate(pack.params):
            state = self.state[p]
            for key, per_param in views.items():
                if key in state and state[key] is not per_param[i]:
                    per_param[i].copy_(state[key].reshape(per_param[i].shape))
                state[key] = per_param[i]
            for name, vector in pack.vectors.items():
                if name in state:
                    vector[i] = state[name]
                state[name] = vector[i]  # a 0-d view
            state.setdefault("step", 0)

    def use_compile(self) -> bool:
        """compile_step True/False, or None: compile when the model is large enough to repay compiling."""
        if self.compile_step is not None:
            return self.compile_step
        if "_auto_compile" not in self.__dict__:
            total = sum(p.numel() for g in self.param_groups for p in g["params"])
            self._auto_compile = total >= AUTO_MIN_ELEMENTS
        return self._auto_compile

    # ------------------------------------------------------------------------------------------------
    # the step
    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
            if loss is not None:
                self.observe_loss(loss)
        if self.__dict__.pop("_rebuild_layouts", False):
            self._layouts.clear()
        self._check_roles_once()
        for index, group in enumerate(self.param_groups):
            if not any(p.grad is not None for p in group["params"]):
                continue  # nothing to do: global_step (dynamic weight decay, lr-mask warm-up) does not advance
            layout = self._layout(index, group)
            group["global_step"] = group.get("global_step", 0) + 1
            stepped = [(chunk, self._step_chunk(group, chunk)) for chunk in layout.chunks]
            self._finish_group(group, [(chunk, result) for chunk, result in stepped if result is not None])
        return loss

    def _step_chunk(self, group: dict, pack: FlatPack) -> tuple[list[bool], torch.Tensor] | None:
        """One chunk through ``fused_step``; returns (which tensors had a gradient, which of them it skipped as
        non-finite: a bool tensor per slot), or None when no tensor of the chunk has a gradient."""
        grads = [p.grad for p in pack.params]
        active = [g is not None for g in grads]
        if not any(active):
            return None
        for g in grads:
            if g is not None and g.is_sparse:
                raise RuntimeError(f"{self.optimizer_type} does not support sparse gradients; "
                                   "use dense gradients (e.g. nn.Embedding(sparse=False))")
        pack.begin_step()
        grad = pack.gather_present(grads, pack.buffer("grad"))
        weight = self._resident_weight(pack)
        resident = weight is not None
        if not resident:
            weight = pack.gather(pack.params, pack.buffer("weight"))  # the step runs under no_grad: no detach needed
        nonfinite = self.fused_step(group, pack, grad, weight, [self.state[p]["step"] for p in pack.params], active)
        if not resident:
            torch._foreach_copy_([p for p, a in zip(pack.params, active) if a],
                                 [v for v, a in zip(pack.views(weight), active) if a])
        return active, nonfinite

    # --- weight residency -------------------------------------------------------------------------------------
    def _make_resident(self, pack: FlatPack, shared: set[int]) -> None:
        """With ``resident_weights``: the chunk's fp32 params move into one flat buffer of the chunk's layout (the
        Parameter objects stay; each one's ``.data`` becomes a tensor over its slice of the buffer), so
        ``fused_step`` updates the weights where they live: no gather before the step and no copy back after it
        (two passes over the weights out of a handful).

        Each param gets a storage of its own over that memory (``torch.frombuffer``), not a view of the buffer:
        savers that keep one tensor per storage (accelerate's ``save_state``, which kohya's ``--save_state`` uses,
        drops the others) must see separate tensors. With plain views the real sd-scripts' saved state lost all
        but one param per chunk (benchmarks/sd_scripts_check.py, hook-resume). That needs host memory: on other
        devices the chunk gathers and writes back as before. Only float32 params that own their storage (not
        views of a larger tensor, not sharing it with another param of the group: ``shared``) move.
        ``pack.weights`` is the buffer, or None.
        """
        pack.weights = None
        if not self.resident_weights or any(_why_not_resident(p) or _storage_key(p) in shared for p in pack.params):
            return
        buffer = pack.zeros()
        try:
            memory = buffer.numpy()
        except RuntimeError as error:  # torch built without NumPy: the chunk gathers, said once
            if not self.__dict__.get("_warned_resident"):
                self._warned_resident = True
                warnings.warn(f"{self.optimizer_type}: resident_weights needs NumPy ({error}); the weights are "
                              "gathered each step instead (pip install numpy)", RuntimeWarning, stacklevel=4)
            return
        for i, p in enumerate(pack.params):
            _move_into(pack, memory, i, p)
        pack.weights = buffer

    def _resident_weight(self, pack: FlatPack) -> torch.Tensor | None:
        """The chunk's weight buffer when its params live there, else None (gather). A param whose ``.data`` was
        replaced since (``Module.to``, a ``.data`` assignment) is moved back in if it is still a float32 tensor of
        its own on the chunk's device; otherwise (kohya's ``--full_bf16`` cast it to bf16) the chunk gathers from
        then on."""
        buffer = pack.weights
        if buffer is None:
            return None
        start = buffer.data_ptr()
        moved = [i for i, (p, offset) in enumerate(zip(pack.params, pack.offsets))
                 if p.data_ptr() != start + offset * buffer.element_size()]
        if moved:
            if any(_why_not_resident(pack.params[i]) or pack.params[i].shape != pack.shapes[i] for i in moved):
                pack.weights = None
                return None
            memory = buffer.numpy()
            for i in moved:
                _move_into(pack, memory, i, pack.params[i])
        if pack._gaps:  # padding stays zero (per-tensor sums over blocks include it)
            torch._foreach_zero_(pack._gap_views(buffer))
        return buffer

    def _finish_group(self, group: dict, stepped: list[tuple[FlatPack, tuple[list[bool], torch.Tensor]]]) -> None:
        """After a group's chunks: count the steps and the skipped tensors, and move any 8-bit state that became
        non-finite to fp32. One host read of the skipped flags per group and step (not one per chunk: on a GPU
        each read waits for the device)."""
        if not stepped:
            return
        device = stepped[0][0].device
        skipped = torch.cat([nonfinite[:len(pack)].to(device) for pack, (_, nonfinite) in stepped]).tolist()
        position = 0
        for pack, (active, _) in stepped:
            for p, is_active in zip(pack.params, active):
                if is_active and skipped[position]:
                    group["skipped_updates"] = group.get("skipped_updates", 0) + 1
                elif is_active:
                    self.state[p]["step"] += 1
                position += 1
        eight_bit = [pack for pack, _ in stepped if pack.codec.bits == 8]
        if eight_bit and not self._eight_bit_finite(eight_bit):
            for pack in eight_bit:
                self._fall_back_to_fp32(pack, pack.state_specs, [self.state[p] for p in pack.params])

    @staticmethod
    def _eight_bit_finite(packs: list[FlatPack]) -> bool:
        """True when every block absmax of these chunks' 8-bit states is finite (a block holding a non-finite value
        has a NaN or inf absmax): one concatenation and one host read for all of them."""
        device = packs[0].device
        absmax = [values.to(device) for pack in packs for values in pack.codec.absmax.values()]
        return not absmax or bool(torch.isfinite(torch.cat(absmax)).all())

    # --- 8-bit states that are not finite -----------------------------------------------------------------
    def _fall_back_to_fp32(self, pack, specs, states) -> None:
        """A non-finite value has no 8-bit code: such a tensor keeps its states in fp32 from now on, with a
        warning, instead of being corrupted.

        Its decoded values (non-finite across the block) go into ``optimizer.state`` in place of the codes; the
        layout is rebuilt at the next step, and ``_build_layout`` puts a tensor whose state is already fp32 into an
        fp32 chunk (so a state_dict saved after a fallback loads the same way). Called only when the step's combined
        check (``_eight_bit_finite``) found a non-finite block absmax; this finds the tensors, state by state.
        """
        bad: dict[int, list[str]] = {}
        codec = pack.codec
        for name, _ in specs:
            absmax = codec.absmax[name]
            if bool(torch.isfinite(absmax).all()):
                continue
            for i, view in enumerate(pack.padded_views(absmax, codec.block_size)):  # rare path
                if not bool(torch.isfinite(view).all()):
                    bad.setdefault(i, []).append(name)
        if not bad:
            return
        for i, names in bad.items():
            state = states[i]
            for name, _ in specs:  # every codec state of that tensor moves to fp32 together
                state[name] = pack.views(codec.decode(name))[i].clone()
                state.pop(f"{name}_absmax", None)
            warnings.warn(f"{self.optimizer_type}: non-finite values in the 8-bit state(s) {', '.join(names)} of a "
                          f"tensor of shape {tuple(pack.shapes[i])}: that tensor keeps its states in fp32 from now on",
                          RuntimeWarning, stacklevel=4)
        self._rebuild_layouts = True  # at the next step: subclasses may still read this step's layout

    # --- learning rate and weight decay per step -----------------------------------------------------------------
    def _lr_vector(self, group: dict, pack: FlatPack, roles: list[str]) -> torch.Tensor:
        """lr_i = group lr x role multiplier, (slots,) on the chunk's device (spare slots 0)."""
        lr = group["lr"]
        if isinstance(lr, torch.Tensor):
            lr = float(lr)
        return pack.per_tensor([lr * m for m in self.lr_multipliers(group, roles)])

    def current_weight_decay(self, group: dict) -> float:
        wd = group.get("weight_decay", 0.0)
        if group.get("dynamic_weight_decay", False):
            wd *= weight_decay_ratio(group.get("global_step", 0), group["wd_transition_steps"],
                                     group["wd_decay_factor"], group["wd_min_ratio"])
        return wd

    # ------------------------------------------------------------------------------------------------
    # state dict
    def load_state_dict(self, state_dict: dict) -> None:
        """Like torch's, but state tensors keep their dtype (8-bit codes, fp32 states of bf16 params), and
        are copied: the state is moved into flat buffers at the next step, so an in-memory state_dict of
        another optimizer that keeps stepping must not be aliased."""
        state_dict = copy.copy(state_dict)
        groups = self.param_groups
        saved_groups = state_dict["param_groups"]
        if len(groups) != len(saved_groups):
            raise ValueError(f"loaded state dict has {len(saved_groups)} parameter groups, "
                             f"this optimizer has {len(groups)}")
        for g, s in zip(groups, saved_groups):
            if len(g["params"]) != len(s["params"]):
                raise ValueError(f"loaded state dict has a group of {len(s['params'])} params where this "
                                 f"optimizer has {len(g['params'])}")
        id_map = dict(zip(chain.from_iterable(s["params"] for s in saved_groups),
                          chain.from_iterable(g["params"] for g in groups)))
        state: defaultdict = defaultdict(dict)
        for key, value in state_dict["state"].items():
            if key in id_map:
                param = id_map[key]
                state[param] = {k: (v.to(param.device, copy=True) if isinstance(v, torch.Tensor) else copy.deepcopy(v))
                                for k, v in value.items()}
            else:
                state[key] = copy.deepcopy(value)
        new_groups = []
        for group, saved in zip(groups, saved_groups):
            new_group = copy.deepcopy({k: v for k, v in saved.items() if k != "params"})
            new_group["params"] = group["params"]
            if "param_names" in group:
                new_group["param_names"] = group["param_names"]
            new_groups.append(new_group)
        self.__setstate__({"state": state, "param_groups": new_groups})
        self._layouts = {}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_layouts", {})
        self.__dict__.setdefault("_work", WorkPool())

    # ------------------------------------------------------------------------------------------------
    # introspection
    def state_nbytes(self) -> int:
        """Bytes of optimizer state (flat codec buffers and per-tensor vectors), layouts built so far."""
        total = 0
        for layout in self._layouts.values():
            for pack in layout.chunks:
                total += pack.codec.nbytes() + sum(v.numel() * v.element_size() for v in pack.vectors.values())
        return total

    def workspace_nbytes(self) -> int:
        """Bytes of the step's work buffers (the pool): bounded by the chunk size, not the model."""
        return self._work.nbytes()

    def features(self) -> dict:
        return {flag: self.defaults.get(flag) for flag in self.feature_flags}

    def get_optimization_info(self) -> dict:
        model = self._model_pairing()
        pairings, pairs = model.groups, model.counts()
        count = lambda *roles: sum(p.count(*roles) for p in pairings)  # noqa: E731
        return {
            "optimizer_type": self.optimizer_type,
            "total_params": sum(p.numel() for g in self.param_groups for p in g["params"]),
            "features": self.features(),
            "optim_bits": self.optim_bits,
            "lora_stats": {
                "lora_a_params": count("lora_a"),
                "lora_b_params": count("lora_b"),
                "lora_pairs": pairs["lora_pairs"],
                "lora_pairs_across_groups": pairs["lora_pairs_across_groups"],
                "unpaired_lora_params": pairs["unpaired_lora"],
                "name_sources": sorted({p.name_source for p in pairings}),
            },
            "lokr_stats": {
                "lokr_w1_params": count(*naming.LOKR_W1_SIDE),
                "lokr_w2_params": count(*naming.LOKR_W2_SIDE),
                "lokr_pairs": pairs["lokr_pairs"],
                "lokr_incomplete_modules": pairs["lokr_incomplete_modules"],
                "w_norm_params": count("w_norm"),
                "b_norm_params": count("b_norm"),
                "norm_pairs": pairs["norm_pairs"],
            },
            "training_stats": {
                "global_step": max((g.get("global_step", 0) for g in self.param_groups), default=0),
                "skipped_updates": sum(g.get("skipped_updates", 0) for g in self.param_groups),
                "state_bytes": self.state_nbytes(),
                "workspace_bytes": self.workspace_nbytes(),
            },
        }

    def diagnose_lora_pairing(self) -> dict:
        model = self._model_pairing()
        groups = []
        for index, (group, pairing) in enumerate(zip(self.param_groups, model.groups)):
            infos = pairing.infos
            describe = lambda i: {"index": i, "name": infos[i].name, "shape": list(infos[i].shape)}  # noqa: E731
            paired = {i for pair in pairing.lora_pairs for i in pair}
            groups.append({
                "group": index,
                "name_source": pairing.name_source,
                "num_params": len(infos),
                "roles": {role: pairing.count(role) for role in naming.ROLES if pairing.count(role)},
                "lora_pairs": [{"a": describe(a), "b": describe(b)} for a, b in pairing.lora_pairs],
                "unpaired_a": [describe(i.index) for i in infos if i.role == "lora_a" and i.index not in paired],
                "unpaired_b": [describe(i.index) for i in infos if i.role == "lora_b" and i.index not in paired],
                "lokr_pairs": [{"w1": [describe(i) for i in w1], "w2": [describe(i) for i in w2]}
                               for w1, w2 in pairing.lokr_pairs],
                "norm_pairs": len(pairing.norm_pairs),
                "note": ("no parameter names: roles guessed from consecutive (r, in)/(out, r) shapes; pass "
                         "named parameters or call attach_names(module) for reliable roles")
                if pairing.name_source == "shape_fallback" else "roles from parameter names",
            })
        ref = lambda r: {"group": r[0], "index": r[1], "name": model.groups[r[0]].infos[r[1]].name}  # noqa: E731
        return {"optimizer_type": self.optimizer_type, "groups": groups,
                "lora_pairs_across_groups": [{"a": ref(a), "b": ref(b)} for a, b in model.lora_pairs if a[0] != b[0]],
                "lora_plus_from_groups": [i for i, g in enumerate(self.param_groups) if g.get("lora_plus_from_groups")]}


def decoupled_update(weight, update, grad, anchor, segments, lr, decay, spd_lambda: float, *, spd: bool):
    """weight * decay_i - lr_i * u, then SPD (arXiv 2411.01713) toward ``anchor`` (None: zero); a new tensor.

    ``lr`` and ``decay`` hold one value per tensor (decay = 1 - lr_i * wd_i, decoupled as in AdamW); ``grad``
    is the transformed gradient, whose sign against the deviation decides where SPD acts.
    Pure tensor code, so it runs eagerly or under ``torch.compile``.
    """
    block = segments.block
    w = weight.view(-1, block)
    new = w * segments.expand(decay) - update.view(-1, block) * segments.expand(lr)
    if spd:
        deviation = weight if anchor is None else weight - anchor
        grad_dot_dev = segments.sum(grad * deviation)
        old_norm = segments.sum(deviation * deviation).sqrt()
        new_deviation = new if anchor is None else new - anchor.view(-1, block)
        new_norm = segments.sum(new_deviation * new_deviation).sqrt()
        factor = spd_ratio(grad_dot_dev, old_norm, new_norm, spd_lambda)
        new = new - new_deviation * segments.expand(factor)
    return new.view_as(weight)
