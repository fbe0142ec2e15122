"""One module per technique: pure functions over a pack's flat buffers, each citing its paper.

Each technique has one functional form (``agr``, ``cautious``, ...) that returns new tensors, so a chain
of them fuses under ``torch.compile``; callers that keep a buffer write the result back themselves.

Each module also declares its stage (``stages.Stage``: flags, states, per-tensor vectors), exported here by name for
the recipes (hina_adamw.py, adaptive.py, bf16.py, automagic.py).
"""

from .adopt import ADOPT
from .agr import AGR
from .alora import ALLORA_ROWS, LORA_PLUS
from .came import CAME, CAME_MOMENTUM
from .cautious import CAUTIOUS
from .contextual import CONTEXT
from .frequency import FFT_SUPPRESSION
from .grams import GRAMS
from .importance import IMPORTANCE
from .lowrank import LOWRANK_PENALTY
from .lr_mask import LR_MASK
from .multiscale_momentum import MULTISCALE_MOMENTUM
from .orthogonal import ORTHOGONAL_GRAD
from .relationships import RELATIONSHIPS
from .spd import SPD
from .tam import TAM
from .weight_decay import DECOUPLED_WEIGHT_DECAY, WEIGHT_DECAY_SCHEDULE
from .agr import agr
from .cautious import cautious
from .grams import grams
from .orthogonal import orthogonalize
from .tam import tam_step

__all__ = ["agr", "cautious", "grams", "orthogonalize", "tam_step"]
