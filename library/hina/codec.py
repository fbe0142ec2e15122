"""State codecs: how a pack's optimizer states are stored between steps.

- ``Fp32Codec``: plain float32 flat buffers.
- ``Blockwise8bitCodec``: 8-bit blockwise dynamic quantisation (Dettmers et al., "8-bit Optimizers via
  Block-wise Quantization", arXiv 2110.02861): uint8 codes into bitsandbytes' dynamic map plus one float32
  absmax per ``block_size`` elements, written in plain torch (``quant.py``) so the codec can run inside the
  compiled step. Signed states (first moments) use the signed dynamic map, non-negative ones (second
  moments) the unsigned one, as bitsandbytes' own 8-bit optimizers do; the codes are bitsandbytes', so
  state_dicts saved by earlier releases (which quantised through bitsandbytes) load unchanged.

Each codec owns the flat storage of one pack and hands out per-parameter views for ``optimizer.state``.
``decode`` gives an fp32 buffer (the storage itself for fp32; a pool buffer of the pack's size for 8-bit)
and ``encode`` writes it back; the fused step reads ``storage(name)`` directly instead.
"""

from __future__ import annotations

import torch

from . import quant
from .pack import FlatPack


class Fp32Codec:
    bits = 32

    def __init__(self, pack: FlatPack):
        self.pack = pack
        self.flat: dict[str, torch.Tensor] = {}

    def create(self, name: str, signed: bool = True) -> None:
        self.flat[name] = self.pack.zeros()

    def state_views(self, name: str) -> dict[str, list[torch.Tensor]]:
        """Per-parameter views: ``{state_key: [view per param]}``."""
        return {name: self.pack.views(self.flat[name])}

    def storage(self, name: str) -> torch.Tensor:
        return self.flat[name]

    def decode(self, name: str) -> torch.Tensor:
        return self.flat[name]  # decoded in place: the math updates the stored buffer directly

    def encode(self, name: str, value: torch.Tensor) -> None:
        if value.data_ptr() != self.flat[name].data_ptr():
            self.flat[name].copy_(value)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.flat.values())


_DYNAMIC_MAPS: dict[tuple[bool, str], torch.Tensor] = {}


def dynamic_map(signed: bool, device) -> torch.Tensor:
    """bitsandbytes' dynamic map (256 values), one copy per (signedness, device)."""
    key = (signed, str(torch.device(device)))
    if key not in _DYNAMIC_MAPS:
        _DYNAMIC_MAPS[key] = quant.dynamic_map(signed, device)
    return _DYNAMIC_MAPS[key]


class Blockwise8bitCodec:
    """uint8 codes plus one float32 absmax per ``block_size`` elements (pack aligned to the block)."""

    bits = 8

    def __init__(self, pack: FlatPack, block_size: int):
        if pack.align % block_size:
            raise ValueError(f"pack alignment {pack.align} is not a multiple of block_size {block_size}")
        self.pack = pack
        self.block_size = block_size
        self.codes: dict[str, torch.Tensor] = {}
        self.absmax: dict[str, torch.Tensor] = {}
        self.signed: dict[str, bool] = {}

    def create(self, name: str, signed: bool = True) -> None:
        self.signed[name] = signed
        self.codes[name] = self.pack.zeros(torch.uint8)
        # absmax 0 decodes every code to 0, so a fresh state reads as zeros.
        self.absmax[name] = self.pack.zeros(torch.float32, scale=self.block_size)

    def qmap(self, name: str) -> torch.Tensor:
        return dynamic_map(self.signed[name], self.pack.device)

    def state_views(self, name: str) -> dict[str, list[torch.Tensor]]:
        return {name: self.pack.padded_views(self.codes[name]),
                f"{name}_absmax": self.pack.padded_views(self.absmax[name], self.block_size)}

    def storage(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.codes[name], self.absmax[name]

    def decode(self, name: str) -> torch.Tensor:
        out = self.pack.buffer(f"decoded_{name}")
        out.copy_(quant.decode(self.codes[name], self.absmax[name], self.qmap(name), self.block_size))
        return out

    def encode(self, name: str, value: torch.Tensor) -> None:
        codes, absmax = quant.encode(value, self.qmap(name), self.block_size, self.signed[name])
        self.codes[name].copy_(codes)  # into the existing storage: the per-parameter views stay valid
        self.absmax[name].copy_(absmax)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.codes.values(), *self.absmax.values()))
