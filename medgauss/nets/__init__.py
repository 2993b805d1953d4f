"""Networks: the ViT3D encoder, MedGMAE / MedGMAE* / voxel-MAE pretraining models, a named-size
registry (``create_model``), safetensors persistence, export of encoders to MONAI's UNETR, and the fine-tuning
networks built on a pretrained encoder (segmentation UNETR, TransMorph-style registration, classification)."""

from medgauss.nets import zoo  # noqa: F401  (registers the named sizes)
from medgauss.nets.classification import ViTClassifier, classifier_from_encoder
from medgauss.nets.gaussian_mae import GaussianMAE, GaussianMAEOutput
from medgauss.nets.ilrm import IterativeGaussianDecoder
from medgauss.nets.masking import MaskingResult, random_masking
from medgauss.nets.monai_export import encoder_to_monai_state_dict, monai_vit_kwargs
from medgauss.nets.pretrained import load_pretrained
from medgauss.nets.pretrained_runs import PretrainingPreprocessing, load_pretrained_encoder, run_preprocessing
from medgauss.nets.registration import ViTRegistrationNet, registration_net_from_encoder
from medgauss.nets.registry import create_model, list_models, register_model
from medgauss.nets.unetr import PretrainedUNETR, ScratchSwinUNETR, unetr_from_encoder, unetr_from_pretrained
from medgauss.nets.vit3d import ViT3D
from medgauss.nets.voxel_mae import VoxelMAE, VoxelMAEOutput
from medgauss.nets.voxgs import VoxGSDecoder, subvolume_geometry
from medgauss.nets.xgrm import XGRM, XGRMOutput, geometry_inputs

__all__ = [
    "GaussianMAE",
    "GaussianMAEOutput",
    "VoxelMAE",
    "VoxelMAEOutput",
    "ViT3D",
    "MaskingResult",
    "random_masking",
    "create_model",
    "list_models",
    "register_model",
    "load_pretrained",
    "encoder_to_monai_state_dict",
    "monai_vit_kwargs",
    "XGRM",
    "XGRMOutput",
    "VoxGSDecoder",
    "geometry_inputs",
    "subvolume_geometry",
    "IterativeGaussianDecoder",
    "PretrainingPreprocessing",
    "load_pretrained_encoder",
    "run_preprocessing",
    "PretrainedUNETR",
    "ScratchSwinUNETR",
    "unetr_from_encoder",
    "unetr_from_pretrained",
    "ViTRegistrationNet",
    "registration_net_from_encoder",
    "ViTClassifier",
    "classifier_from_encoder",
]
