"""Data: datalists, MONAI pipelines, cached crop datasets, phantoms (pretraining), and the X-GRM
reconstruction cases built from the bundled CT and phantoms (``build_xgrm_dataset``).

Typical use::

    from medgauss.data import build_pretrain_dataset, example_ct_datalist
    dataset = build_pretrain_dataset(example_ct_datalist(), spatial_size=96)
    sample = dataset[0]["image"]          # [1, 96, 96, 96] float32 in [0, 1]

At scale (thousands of volumes, many ranks) give an on-disk cache: each rank then preprocesses and
reads only its shard, memory-mapped, once::

    dataset = build_pretrain_dataset(datalist, cache_dir="/scratch/medgauss_cache")  # rank from torch.distributed
"""

from medgauss.data.datalist import (
    NIFTI_SUFFIXES,
    example_ct_datalist,
    example_ct_path,
    load_decathlon_datalist,
    nifti_folder_datalist,
    shard_datalist,
)
from medgauss.data.dataset import (
    CACHE_MODES,
    CachedVolumeDataset,
    PretrainCropDataset,
    build_pretrain_dataset,
    heldout_crops,
)
from medgauss.data.phantom import PHANTOM_HU, PHANTOM_LABELS, make_ct_phantom, write_phantom_dataset
from medgauss.data.sampling import SampleSchedule, ShardedSampleSampler, distributed_rank
from medgauss.data.transforms import DataError, pretrain_augment, pretrain_preprocess, sample_seed
from medgauss.data.volume_cache import CACHE_FORMAT
from medgauss.data.xgrm_cases import (
    XGRM_CPU_PREPARE,
    CaseTransform,
    XGRMCases,
    build_xgrm_dataset,
    draw_case_transform,
    resample_case,
    xgrm_prepare_config,
)
from medgauss.data.xgrm_samples import (
    XGRM_VIEW_COUNTS,
    XGRMSampleDataset,
    box_size_for,
    collate_xgrm_samples,
    rotated_even_views,
)

__all__ = [
    "CACHE_FORMAT",
    "CACHE_MODES",
    "NIFTI_SUFFIXES",
    "PHANTOM_HU",
    "PHANTOM_LABELS",
    "CachedVolumeDataset",
    "DataError",
    "PretrainCropDataset",
    "SampleSchedule",
    "ShardedSampleSampler",
    "build_pretrain_dataset",
    "heldout_crops",
    "distributed_rank",
    "example_ct_datalist",
    "example_ct_path",
    "load_decathlon_datalist",
    "make_ct_phantom",
    "nifti_folder_datalist",
    "pretrain_augment",
    "pretrain_preprocess",
    "sample_seed",
    "shard_datalist",
    "write_phantom_dataset",
    "XGRM_CPU_PREPARE",
    "CaseTransform",
    "XGRMCases",
    "build_xgrm_dataset",
    "draw_case_transform",
    "resample_case",
    "xgrm_prepare_config",
    "XGRM_VIEW_COUNTS",
    "XGRMSampleDataset",
    "box_size_for",
    "collate_xgrm_samples",
    "rotated_even_views",
]
