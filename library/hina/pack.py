"""Flat layout of a list of tensors, so that one optimizer step is a handful of large vector operations.

A ``FlatPack`` lays a few parameters (same device, same state codec) end to end in one flat buffer, each
tensor padded to a multiple of ``align`` (the block size: every tensor owns whole blocks, which are also the
8-bit quantisation blocks). Elementwise math runs once over the buffer, viewed ``(num_blocks, block)``
(``Segments.blocks``); per-tensor quantities (norms, dot products, cosines) are block sums followed by a small
index_add over blocks; per-tensor scalars are broadcast per block. ``Segments`` carries just the tensors that this
needs, so the same technique code runs eagerly or inside ``torch.compile``.

The optimizer core (base.py) cuts each param group into *chunks*: FlatPacks of at most a bounded number of
elements, padded to a few fixed shapes (``total`` elements, ``slots`` per-tensor entries) so that a compiled
step sees a bounded number of distinct input shapes. Padding blocks belong to a spare segment that no
tensor owns: their sums are dropped, and per-tensor values broadcast to them as 0. Spare tensor slots
(``slots`` beyond the real tensor count) own no block and count one element, so ratios over them stay finite.
The optimizer's per-parameter state entries are *views* into the flat state buffers, so ``state_dict()``
stays per parameter, as in torch.optim.

Layout only: no optimizer math here.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Segments(NamedTuple):
    """Which tensor each block belongs to: enough for per-tensor reductions and broadcasts."""

    block_ids: torch.Tensor      # (num_blocks,) int64: tensor slot of each block; padding blocks: len(numel_tensor)
    numel_tensor: torch.Tensor   # (slots,) float32: true (unpadded) element count per tensor (1 for spares, empties)
    block: int

    def sum(self, flat: torch.Tensor) -> torch.Tensor:
        """Per-tensor sums of a flat buffer (alignment padding inside a tensor's blocks must be zero)."""
        block_sums = flat.view(-1, self.block).sum(dim=1)
        count = self.numel_tensor.shape[0]
        # One spare slot takes the padding blocks (and keeps inductor's CPU codegen away from a scatter-add
        # into a one-element buffer, which fails in torch 2.13).
        totals = torch.zeros(count + 1, dtype=block_sums.dtype, device=flat.device)
        return totals.index_add_(0, self.block_ids, block_sums)[:count]

    def dot(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Per-tensor inner products <a_i, b_i>."""
        return self.sum(a * b)

    def blocks(self, stored):
        """A chunk buffer viewed as ``(num_blocks, block)``, the shape a fused step computes in; 8-bit
        ``(codes, absmax)`` storage with its codes so viewed; None as it is.

        Every elementwise value of a chunk step is computed in this one shape, because ``expand`` broadcasts per
        block: inductor fuses into one loop only values of the same loop shape, so a value computed over the flat
        buffer beside one computed per block made it write the new weights to a temporary, copy them back and
        read the gradient and states twice. Measured (HinaAdamW all off, 32-bit, SD1.5 r16, 1 thread, thread CPU
        per step, paired in one process): 0.79x the step with the whole step in this shape.
        """
        if stored is None:
            return None
        if isinstance(stored, tuple):
            return (stored[0].view(-1, self.block), stored[1])
        return stored.view(-1, self.block)

    def expand(self, per_tensor: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """(num_blocks, 1) view of per-tensor values, to broadcast over ``flat.view(-1, block)``.

        Padding blocks get ``fill`` (0, or False for a boolean vector, by default)."""
        padded = torch.cat([per_tensor, per_tensor.new_full((1,), fill)])
        return padded.index_select(0, self.block_ids).unsqueeze(1)

    def scale_(self, flat: torch.Tensor, per_tensor: torch.Tensor) -> None:
        """Multiply each tensor's slice of ``flat`` by its own scalar, in place."""
        flat.view(-1, self.block).mul_(self.expand(per_tensor))


def as_segments(pack_or_segments) -> Segments:
    """Technique functions accept a FlatPack or its Segments."""
    return pack_or_segments.segments if isinstance(pack_or_segments, FlatPack) else pack_or_segments


class FlatPack:
    """Offsets of ``params`` in a flat buffer, with views, gathers and per-tensor reductions.

    ``total`` (elements) and ``slots`` (per-tensor entries) pad the layout to a fixed shape; by default the
    layout is as long as its tensors need and has one slot per tensor.
    """

    def __init__(self, params: list[torch.Tensor], indices: list[int], align: int = 64, *,
                 total: int | None = None, slots: int | None = None):
        self.params = params
        self.indices = indices  # position of each param in its param group
        self.device = params[0].device
        self.shapes = [p.shape for p in params]
        self.numels = [p.numel() for p in params]
        self.padded = [-(-max(n, 1) // align) * align for n in self.numels]
        self.offsets = []
        used = 0
        for size in self.padded:
            self.offsets.append(used)
            used += size
        self.used = used
        self.total = max(used, total or 0)
        if self.total % align:
            raise ValueError(f"pack total {self.total} is not a multiple of its alignment {align}")
        self.slots = max(len(params), slots or 0)
        self.align = align
        # a zero-size tensor counts one element too: ratios over it stay finite (it owns one block of zeros)
        numel = [max(n, 1) for n in self.numels] + [1] * (self.slots - len(params))
        self.numel_tensor = torch.tensor(numel, dtype=torch.float32, device=self.device)
        blocks_per_tensor = [size // align for size in self.padded] + [(self.total - used) // align]
        block_ids = torch.repeat_interleave(torch.arange(len(params) + 1, device=self.device),
                                            torch.tensor(blocks_per_tensor, device=self.device))
        block_ids[block_ids == len(params)] = self.slots  # padding blocks: the spare segment
        self.segments = Segments(block_ids, self.numel_tensor, align)
        self.pool: "WorkPool | None" = None
        self._workspace: dict[str, torch.Tensor] = {}
        self._fresh: set[str] = set()
        self._view_cache: dict[tuple[str, int], tuple[torch.Tensor, list[torch.Tensor]]] = {}
        self._gaps: list[tuple[int, int]] = [(off + n, size - n) for off, n, size in
                                             zip(self.offsets, self.numels, self.padded) if size > n]
        if self.total > used:
            self._gaps.append((used, self.total - used))

    def __len__(self) -> int:
        return len(self.params)

    # --- buffers -------------------------------------------------------------------------------------
    def zeros(self, dtype=torch.float32, scale: int = 1) -> torch.Tensor:
        return torch.zeros(self.total // scale, dtype=dtype, device=self.device)

    def per_tensor(self, values, fill: float = 0.0, dtype=torch.float32) -> torch.Tensor:
        """A (slots,) tensor of one value per tensor, spare slots set to ``fill``."""
        values = list(values) + [fill] * (self.slots - len(values))
        return torch.tensor(values, dtype=dtype, device=self.device)

    def begin_step(self) -> None:
        """Start of this pack's step: workspaces handed out from now on are zeroed on first use."""
        self._fresh.clear()

    def workspace(self, name: str) -> torch.Tensor:
        """An fp32 scratch buffer of ``total`` elements, zero on its first use in a step.

        With a ``pool`` (the optimizer core sets one) the buffer is shared with every other pack of the
        optimizer, so work memory is sized by the largest pack, not by the model; without one it is the
        pack's own.
        """
        if self.pool is not None:
            buf = self.pool.get(name, self.total, torch.float32, self.device)
        else:
            buf = self._workspace.get(name)
            if buf is None:
                buf = self._workspace[name] = self.zeros()
        if name not in self._fresh:
            buf.zero_()
            self._fresh.add(name)
        return buf

    def buffer(self, name: str) -> torch.Tensor:
        """An fp32 buffer of ``total`` elements with arbitrary contents (callers write all of it)."""
        if self.pool is not None:
            return self.pool.get(name, self.total, torch.float32, self.device)
        buf = self._workspace.get(name)
        if buf is None:
            buf = self._workspace[name] = self.zeros()
        return buf

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Views of ``flat`` shaped like the params (padding excluded).

        Views of long-lived buffers (pool buffers, states) are cached: building hundreds of views costs
        more than the arithmetic on them. A cached list is only reused for the same tensor object, so a new
        buffer never gets stale views.
        """
        return self._cached_views("params", flat)

    def _gap_views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Views of the padding of ``flat`` (after each tensor and after the last), cached like ``views``."""
        return self._cached_views("gaps", flat)

    def _cached_views(self, kind: str, flat: torch.Tensor) -> list[torch.Tensor]:
        cached = self._view_cache.get((kind, id(flat)))
        if cached is not None and cached[0] is flat:
            return cached[1]
        if kind == "params":
            views = [flat.narrow(0, off, n).view(shape)
                     for off, n, shape in zip(self.offsets, self.numels, self.shapes)]
        else:
            views = [flat.narrow(0, off, n) for off, n in self._gaps]
        if len(self._view_cache) >= 64:  # bounded: a pack sees a handful of long-lived buffers
            self._view_cache.clear()
        self._view_cache[(kind, id(flat))] = (flat, views)
        return views

    def padded_views(self, flat: torch.Tensor, scale: int = 1) -> list[torch.Tensor]:
        """1-D views over each tensor's padded slice; ``scale`` divides offsets (8-bit absmax arrays)."""
        return [flat.narrow(0, off // scale, size // scale) for off, size in zip(self.offsets, self.padded)]

    def gather(self, tensors: list[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
        """Copy ``tensors`` (shaped like the params) into ``out`` and zero its padding."""
        torch._foreach_copy_(self.views(out), tensors)
        if self._gaps:
            torch._foreach_zero_(self._gap_views(out))
        return out

    def gather_present(self, tensors: list, out: torch.Tensor) -> torch.Tensor:
        """``gather`` where a None entry (a param without gradient) leaves zeros."""
        if all(t is not None for t in tensors):
            return self.gather(tensors, out)
        views = self.views(out)
        present = [i for i, t in enumerate(tensors) if t is not None]
        torch._foreach_copy_([views[i] for i in present], [tensors[i] for i in present])
        torch._foreach_zero_([views[i] for i, t in enumerate(tensors) if t is None] +
                             self._gap_views(out))
        return out

    # --- per-tensor reductions and broadcasts (see Segments) -----------------------------------------------
    def sum(self, flat: torch.Tensor) -> torch.Tensor:
        return self.segments.sum(flat)

    def dot(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.segments.dot(a, b)

    def scale_(self, flat: torch.Tensor, per_tensor: torch.Tensor) -> None:
        self.segments.scale_(flat, per_tensor)


class WorkPool:
    """The work buffers of one optimizer, by name: each as large as the largest pack that asked for it.

    Every pack of the optimizer draws its scratch buffers (gathered gradient, weight copy, decoded states,
    ...) from here, so work memory is bounded by the chunk size (base.py), whatever the model size.
    """

    def __init__(self):
        self._buffers: dict[tuple, torch.Tensor] = {}
        self._slices: dict[tuple, torch.Tensor] = {}

    def get(self, name: str, numel: int, dtype: torch.dtype, device) -> torch.Tensor:
        key = (name, dtype, str(device))
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < numel:
            buf = self._buffers[key] = torch.empty(numel, dtype=dtype, device=device)
            self._slices = {k: v for k, v in self._slices.items() if k[0] != key}
        sliced = self._slices.get((key, numel))
        if sliced is None:  # the same slice object each time, so packs can cache views of it
            sliced = self._slices[(key, numel)] = buf[:numel]
        return sliced

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._buffers.values())

    def clear(self) -> None:
        self._buffers.clear()
        self._slices.clear()
