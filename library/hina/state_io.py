"""Reading and writing a chunk's flat optimizer state inside a fused (compiled) step.

A flat state is stored either as an fp32 buffer or, for the 8-bit codecs, as ``(codes, absmax)``
(``codec.Blockwise8bitCodec.storage``; the codec itself is ``quant.py``). These two pure-torch helpers let a
chunk step decode at its start and encode at its end inside one compiled function, and keep the blocks of
tensors that did not step exactly as they were (codes included).
"""

from __future__ import annotations

import torch

from . import quant


def load_state(stored, qmap, block: int) -> torch.Tensor:
    """A flat state as fp32: fp32 storage as it is, 8-bit ``(codes, absmax)`` decoded with ``qmap``."""
    if isinstance(stored, tuple):
        return quant.decode(stored[0], stored[1], qmap, block)
    return stored


def store_state(stored, value: torch.Tensor, keep: torch.Tensor, qmap, block: int, signed: bool = True) -> None:
    """Write ``value`` into fp32 or 8-bit storage in place; blocks where ``keep`` ((blocks, 1) bool) stay. Storage and
    value may be flat or viewed ``(num_blocks, block)`` (``Segments.blocks``)."""
    if isinstance(stored, tuple):
        codes, absmax = quant.encode_int32(value, qmap, block, signed)
        # Select in int32, not uint8: CPU inductor vectorises a uint8 select lane by lane (measured 2x slower
        # encode); the codes are the same.
        kept = torch.where(keep, quant.code_indices(stored[0]).view(-1, block), codes.view(-1, block))
        stored[0].copy_(kept.to(torch.uint8).view_as(stored[0]))
        stored[1].copy_(torch.where(keep.squeeze(1), stored[1], absmax))
    else:
        stored.copy_(torch.where(keep, stored.view(-1, block), value.view(-1, block)).view_as(stored))
