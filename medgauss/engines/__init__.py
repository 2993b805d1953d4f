"""Training engines on Accelerate (no Hydra here): the one training loop, its tasks, checkpoints, optimiser.

``TrainingEngine`` runs the loop for every recipe; a recipe plugs in its
step as a ``TrainTask`` (``MaskedPretrainTask`` for masked pretraining) and optionally a held-out
``Validator`` (``MaskedReconstructionValidator`` scores an MAE on held-out crops beside the trivial fills);
``XGRMTask`` / ``ReconstructionValidator`` train and score feed-forward sparse-view CT reconstruction (X-GRM)
beside FDK; ``build_optimizer`` gives AdamW + warmup-cosine; ``CheckpointManager`` writes crash-safe Accelerate
checkpoints with a ``latest`` pointer; ``save_slice_panel`` draws PNG panels.
"""

from medgauss.engines.checkpoint import TRAINER_STATE_FILE, CheckpointManager
from medgauss.engines.optim import build_optimizer, param_groups, warmup_cosine_factor
from medgauss.engines.panels import panel_from_output, save_slice_panel
from medgauss.engines.reconstruction import (
    ReconstructionReport,
    ReconstructionValidator,
    XGRMTask,
    save_reconstruction_panel,
)
from medgauss.engines.tasks import MaskedPretrainTask, TrainTask, as_task
from medgauss.engines.training import TrainingEngine, TrainResult, loss_summary
from medgauss.engines.validation import (
    MaskedReconstructionValidator,
    ValidationReport,
    ValidationResult,
    Validator,
)

__all__ = [
    "TRAINER_STATE_FILE",
    "CheckpointManager",
    "MaskedPretrainTask",
    "MaskedReconstructionValidator",
    "TrainResult",
    "TrainTask",
    "TrainingEngine",
    "ValidationReport",
    "ValidationResult",
    "Validator",
    "as_task",
    "build_optimizer",
    "loss_summary",
    "panel_from_output",
    "param_groups",
    "save_slice_panel",
    "warmup_cosine_factor",
    "ReconstructionReport",
    "ReconstructionValidator",
    "XGRMTask",
    "save_reconstruction_panel",
]
