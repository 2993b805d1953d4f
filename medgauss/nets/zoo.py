"""The named model sizes (registered on import of :mod:`medgauss.nets`).

=========  =====================================  ==================================  =======
size       encoder (hidden / layers / heads / mlp)  decoder (dim / layers / heads)      queries
=========  =====================================  ==================================  =======
tiny       192 / 6 / 3 / 768                      128 / 2 / 4                         128
base       768 / 12 / 12 / 3072 (UNETR's ViT)     512 / 8 / 16                        512
large      1536 / 12 / 16 / 6144                  528 / 8 / 16                        512
=========  =====================================  ==================================  =======

``gmae_*`` = MedGMAE, ``gmae_star_*`` = MedGMAE* (children per level-0 Gaussian: 2 at level 1,
4 at level 2), ``vmae_*`` = voxel-MAE baseline with the same encoder and decoder trunk.

Every factory takes keyword overrides of its constructor's arguments; a name that is no argument of the
constructor raises ``ValueError`` naming it, before the constructor runs, so that any error raised
inside the constructor is the constructor's own.

Query design: ``gmae_<size>`` and ``gmae_star_<size>`` build the paper's free queries;
``gmae_<size>_anchored`` and ``gmae_star_<size>_anchored`` are the same models with
``query_mode="anchored"`` (128 queries -> a 4x4x8 anchor grid, 512 -> 8x8x8 on cubic crops; see
:mod:`medgauss.nets.decoders`). The override ``query_mode="anchored"`` (and ``anchor_offset``) works on
any ``gmae_*`` name as well; the choice is saved in the checkpoint's config like every other argument.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from medgauss.nets.gaussian_mae import GaussianMAE
from medgauss.nets.registry import register_model
from medgauss.nets.voxel_mae import VoxelMAE
from medgauss.nets.xgrm import XGRM

__all__ = ["SIZES", "STAR_CHILDREN", "check_overrides"]

SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=192, num_layers=6, num_heads=3, mlp_dim=768,
                 decoder_dim=128, decoder_depth=2, decoder_heads=4),
    "base": dict(hidden_size=768, num_layers=12, num_heads=12, mlp_dim=3072,
                 decoder_dim=512, decoder_depth=8, decoder_heads=16),
    "large": dict(hidden_size=1536, num_layers=12, num_heads=16, mlp_dim=6144,
                  decoder_dim=528, decoder_depth=8, decoder_heads=16),
}
QUERIES = {"tiny": 128, "base": 512, "large": 512}
STAR_CHILDREN = (2, 4)


def check_overrides(cls: type[nn.Module], overrides: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming every key of ``overrides`` that is no keyword argument of ``cls``."""
    params = inspect.signature(cls).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    accepted = {n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    unknown = sorted(set(overrides) - accepted)
    if unknown:
        raise ValueError(
            f"invalid overrides {unknown}: no keyword argument of {cls.__name__} has that name "
            f"(accepted: {sorted(accepted)})"
        )


def _gmae(size: str, overrides: dict[str, Any], **extra: Any) -> GaussianMAE:
    check_overrides(GaussianMAE, overrides)
    return GaussianMAE(**{**SIZES[size], "num_queries": QUERIES[size], **extra, **overrides})


def _gmae_anchored(size: str, overrides: dict[str, Any], **extra: Any) -> GaussianMAE:
    if overrides.get("query_mode", "anchored") != "anchored":
        raise ValueError(f"query_mode={overrides['query_mode']!r} contradicts an *_anchored model name; "
                         "use the name without _anchored for free queries")
    return _gmae(size, overrides, **extra, query_mode="anchored")


def _vmae(size: str, overrides: dict[str, Any]) -> VoxelMAE:
    check_overrides(VoxelMAE, overrides)
    return VoxelMAE(**{**SIZES[size], **overrides})


@register_model
def gmae_tiny(**overrides: Any) -> GaussianMAE:
    return _gmae("tiny", overrides)


@register_model
def gmae_base(**overrides: Any) -> GaussianMAE:
    return _gmae("base", overrides)


@register_model
def gmae_large(**overrides: Any) -> GaussianMAE:
    return _gmae("large", overrides)


@register_model
def gmae_star_tiny(**overrides: Any) -> GaussianMAE:
    return _gmae("tiny", overrides, children_per_level=STAR_CHILDREN)


@register_model
def gmae_star_base(**overrides: Any) -> GaussianMAE:
    return _gmae("base", overrides, children_per_level=STAR_CHILDREN)


@register_model
def gmae_star_large(**overrides: Any) -> GaussianMAE:
    return _gmae("large", overrides, children_per_level=STAR_CHILDREN)


@register_model
def gmae_tiny_anchored(**overrides: Any) -> GaussianMAE:
    return _gmae_anchored("tiny", overrides)


@register_model
def gmae_base_anchored(**overrides: Any) -> GaussianMAE:
    return _gmae_anchored("base", overrides)


@register_model
def gmae_large_anchored(**overrides: Any) -> GaussianMAE:
    return _gmae_anchored("large", overrides)


@register_model
def gmae_star_tiny_anchored(**overrides: Any) -> GaussianMAE:
    return _gmae_anchored("tiny", overrides, children_per_level=STAR_CHILDREN)


@register_model
def gmae_star_base_anchored(**overrides: Any) -> GaussianMAE:
    return _gmae_anchored("base", overrides, children_per_level=STAR_CHILDREN)


@register_model
def gmae_star_large_anchored(**overrides: Any) -> GaussianMAE:
    return _gmae_anchored("large", overrides, children_per_level=STAR_CHILDREN)


@register_model
def vmae_tiny(**overrides: Any) -> VoxelMAE:
    return _vmae("tiny", overrides)


@register_model
def vmae_base(**overrides: Any) -> VoxelMAE:
    return _vmae("base", overrides)


@register_model
def vmae_large(**overrides: Any) -> VoxelMAE:
    return _vmae("large", overrides)


# ------------------------------------------------------------------ X-GRM (sparse-view CT reconstruction)
#
# =====  ==========  ================================  ===========================  ========  ==========
# size   img / patch encoder (hidden/layers/heads/mlp)  fusion (dim/layers/heads/mlp)  features  data grid
# =====  ==========  ================================  ===========================  ========  ==========
# tiny   64 / 16     128 / 4 / 4 / 512                 128 / 2 / 4 / 512            32 @ x4   32^3
# base   256 / 16    768 / 12 / 12 / 3072 (ViT-B/16)   768 / 12 / 12 / 3072         64 @ x4   256^3
# =====  ==========  ================================  ===========================  ========  ==========
#
# The VoxGS decoder works on any output grid (the geometry's ``vol_shape``); XGRM_GRID_SIZES records the
# grid each size is meant for (the paper's 256^3; 32^3 for CPU training), for recipes to read.

XGRM_SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(img_size=64, patch_size=16, hidden_size=128, num_layers=4, num_heads=4, mlp_dim=512,
                 fusion_size=128, fusion_layers=2, fusion_heads=4, fusion_mlp_dim=512, feature_dim=32,
                 upsample_factor=4, decoder_hidden=64, decoder_layers=3),
    "base": dict(img_size=256, patch_size=16, hidden_size=768, num_layers=12, num_heads=12, mlp_dim=3072,
                 fusion_size=768, fusion_layers=12, fusion_heads=12, fusion_mlp_dim=3072, feature_dim=64,
                 upsample_factor=4, decoder_hidden=128, decoder_layers=3),
}
XGRM_GRID_SIZES = {"tiny": 32, "base": 256}


def _xgrm(size: str, overrides: dict[str, Any]) -> XGRM:
    check_overrides(XGRM, overrides)
    return XGRM(**{**XGRM_SIZES[size], **overrides})


@register_model
def xgrm_tiny(**overrides: Any) -> XGRM:
    return _xgrm("tiny", overrides)


@register_model
def xgrm_base(**overrides: Any) -> XGRM:
    return _xgrm("base", overrides)


__all__ += ["XGRM_SIZES", "XGRM_GRID_SIZES"]


# ------------------------------------------------------------- X-GRM with the iLRM-style iterative decoder
#
# xgrm_tiny_iterative: the xgrm_tiny encoder and fusion ViT with feature maps at twice the token grid (8 x 8
# per 64^2 view, 64 image tokens per view), decoded by IterativeGaussianDecoder: one query per 4^3 voxels
# (8^3 queries on the 32^3 grid), windows of 4^3 queries, 2 layers of width 128 (4 heads, MLP 512), 32
# features per cell; plain cross-attention, no uplifting (decoder_options turns both on).
# decoder_options passed as an override are merged into these.

XGRM_ITERATIVE_OPTIONS: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=128, num_layers=2, num_heads=4, mlp_dim=512, block_size=4, window_size=4,
                 cell_dim=32, cross_attention_groups=1, cross_attention_schedule="layer", uplift=1),
}


def _xgrm_iterative(size: str, overrides: dict[str, Any]) -> XGRM:
    check_overrides(XGRM, overrides)
    if overrides.get("decoder", "iterative") != "iterative":
        raise ValueError(f"decoder={overrides['decoder']!r} contradicts an *_iterative model name; "
                         "use the name without _iterative for the VoxGS decoder")
    options = {**XGRM_ITERATIVE_OPTIONS[size], **(overrides.get("decoder_options") or {})}
    kwargs = {**XGRM_SIZES[size], "upsample_factor": 2, **overrides}
    return XGRM(**{**kwargs, "decoder": "iterative", "decoder_options": options})


@register_model
def xgrm_tiny_iterative(**overrides: Any) -> XGRM:
    return _xgrm_iterative("tiny", overrides)


__all__ += ["XGRM_ITERATIVE_OPTIONS"]
