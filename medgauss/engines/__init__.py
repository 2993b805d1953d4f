"""Training engines on Accelerate (no Hydra here): the masked-pretraining loop, checkpoints, optimiser.

``PretrainEngine`` runs the loop; ``build_optimizer`` gives AdamW + warmup-cosine; ``CheckpointManager``
writes crash-safe Accelerate checkpoints with a ``latest`` pointer; ``save_slice_panel`` draws PNG panels;
``MaskedReconstructionValidator`` scores a model on held-out crops beside the trivial fills.
"""

from medgauss.engines.checkpoint import TRAINER_STATE_FILE, CheckpointManager
from medgauss.engines.optim import build_optimizer, param_groups, warmup_cosine_factor
from medgauss.engines.panels import panel_from_output, save_slice_panel
from medgauss.engines.pretrain import PretrainEngine, TrainResult, loss_summary
from medgauss.engines.validation import MaskedReconstructionValidator, ValidationResult

__all__ = [
    "TRAINER_STATE_FILE",
    "CheckpointManager",
    "MaskedReconstructionValidator",
    "PretrainEngine",
    "TrainResult",
    "ValidationResult",
    "build_optimizer",
    "loss_summary",
    "panel_from_output",
    "param_groups",
    "save_slice_panel",
    "warmup_cosine_factor",
]
