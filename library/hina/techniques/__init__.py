"""One module per technique: pure functions over a pack's flat buffers, each citing its paper.

Each technique has one functional form (``agr``, ``cautious``, ...) that returns new tensors, so a chain
of them fuses under ``torch.compile``; callers that keep a buffer write the result back themselves.
"""

from .agr import agr
from .cautious import cautious
from .grams import grams
from .orthogonal import orthogonalize
from .tam import tam_step

__all__ = ["agr", "cautious", "grams", "orthogonalize", "tam_step"]
