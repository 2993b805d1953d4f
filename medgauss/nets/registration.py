"""TransMorph-style deformable registration on the ViT3D encoder: ``(fixed, moving) -> displacement field``.

:class:`ViTRegistrationNet` runs a :class:`~medgauss.nets.ViT3D` (``in_channels=2``) on the concatenated pair
``cat([fixed, moving])``; its patch tokens, reshaped to the token grid, go through a convolutional decoder that
doubles the resolution at each stage (trilinear upsampling, concatenation of a skip feature where one exists at that
resolution, ``convs_per_stage`` 3^3 convolutions + LeakyReLU) up to the full input size; a 3^3 convolution head
(initialised near zero: the network starts at the identity) outputs the dense displacement field ``ddf [B, 3, D, H,
W]`` in voxels, channel ``a`` along array axis ``a`` (MONAI's ``Warp`` convention). The skip features come from a
small convolutional stem on the input pair at full, half, quarter ... resolution (average-pooled input, then two
convolutions). Decoder and stem follow the idea of TransMorph's decoder (junyuchen245/TransMorph, ``TransMorph.py``:
upsampling blocks with skips from a conv branch on the input pair, and a flow head drawn from N(0, 1e-5)); the
encoder here is the plain ViT of MedGMAE, so the deepest feature is the ``patch_size`` times coarser token grid.

Warping: ``warped(x) = moving(x + ddf(x))`` by MONAI ``Warp`` (bilinear, border padding) for images,
nearest-neighbour for label maps (:meth:`ViTRegistrationNet.warp`).

Starting from a pretrained 1-channel encoder (:func:`registration_net_from_encoder`): the patch layer ``W [hidden, 1,
p, p, p]`` becomes ``W2 [hidden, 2, p, p, p]`` with **both channels = W / 2** (bias kept), so an identical pair
``(x, x)`` gives exactly the pretrained patch embedding of ``x`` (``W2 * [x, x] = W * x``), and every other encoder
weight is copied unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from monai.networks.blocks import Warp
from torch import Tensor, nn
from torch.nn import functional as F

from medgauss.nets.pretrained import PretrainedMixin, config_from_locals
from medgauss.nets.vit3d import ViT3D, check_images

__all__ = ["WARP_MODES", "ViTRegistrationNet", "registration_net_from_encoder", "widen_patch_weight"]

WARP_MODES = ("bilinear", "nearest")
"""Interpolation of :meth:`ViTRegistrationNet.warp`: ``bilinear`` for images, ``nearest`` for label maps."""


def _conv_block(in_channels: int, out_channels: int, num_convs: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for k in range(num_convs):
        layers += [nn.Conv3d(in_channels if k == 0 else out_channels, out_channels, 3, padding=1),
                   nn.LeakyReLU(0.2, inplace=True)]
    return nn.Sequential(*layers)


def _positive_ints(values: Sequence[int], name: str, allow_empty: bool = False) -> list[int]:
    out = list(values) if isinstance(values, Sequence) and not isinstance(values, str) else None
    if out is None or (not out and not allow_empty) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in out):
        raise ValueError(f"{name} must be a {'' if allow_empty else 'non-empty '}list of positive ints, got {values!r}")
    return out


def widen_patch_weight(weight: Tensor, in_channels: int = 2) -> Tensor:
    """Widen a 1-channel patch-embedding kernel to ``in_channels`` channels, each ``weight / in_channels``.

    Args:
        weight: ``[hidden, 1, p, p, p]`` pretrained Conv3d kernel.
        in_channels: channels of the widened kernel (2 for a fixed / moving pair).

    Returns:
        ``[hidden, in_channels, p, p, p]``: ``sum_c W2[:, c] = W``, so ``in_channels`` identical input channels give
        the pretrained response exactly.
    """
    if not isinstance(weight, Tensor) or weight.ndim != 5 or weight.shape[1] != 1:
        raise ValueError(f"weight must be a 1-channel Conv3d kernel [hidden, 1, p, p, p], got "
                         f"{tuple(getattr(weight, 'shape', ()))}")
    return weight.expand(-1, in_channels, -1, -1, -1) / in_channels


class ViTRegistrationNet(PretrainedMixin, nn.Module):
    """ViT3D encoder on the pair + convolutional decoder -> displacement field in voxels (module doc).

    Args:
        img_size, patch_size, hidden_size, num_layers, num_heads, mlp_dim, qkv_bias, drop_path_rate: the
            :class:`~medgauss.nets.ViT3D` encoder's (built with ``in_channels=2``). ``patch_size`` must be the same
            power of two along every axis (the decoder doubles the resolution ``log2(patch_size)`` times).
        decoder_channels: channels of each decoder stage, coarse to fine; ``log2(patch_size)`` entries (e.g.
            ``[64, 32, 16]`` for 8^3 patches). Stage ``k`` outputs resolution ``grid * 2^(k+1)``.
        stem_channels: channels of the skip features from the input pair, fine to coarse: entry ``j`` is at
            resolution ``1 / (ddf_stride 2^j)`` (0 = the decoder's finest); at most as many as decoder stages
            (``[]``: no skips).
        convs_per_stage: 3^3 convolutions (+ LeakyReLU) per decoder stage (TransMorph uses 2).
        head_init_std: std of the head's kernel (bias 0): near zero, so the initial field is ~identity.
        ddf_stride: 1 (TransMorph: the decoder reaches full resolution) or a power of two ``s``: the decoder stops at
            ``1 / s`` resolution (``log2(patch_size / s)`` entries in ``decoder_channels``) and the field is
            upsampled trilinearly by ``s`` (values times ``s``, voxels of the full grid): much cheaper on a CPU,
            full-resolution 3^3 convolutions dominate the step.

    Attributes:
        lr_decay_prefix: ``"encoder."`` (where layer-wise lr decay finds the ViT, :mod:`medgauss.engines.optim`).
    """

    lr_decay_prefix = "encoder."

    def __init__(self, img_size: int | Sequence[int] = 64, patch_size: int | Sequence[int] = 8,
                 hidden_size: int = 192, num_layers: int = 6, num_heads: int = 3, mlp_dim: int = 768,
                 qkv_bias: bool = False, drop_path_rate: float = 0.0,
                 decoder_channels: Sequence[int] = (64, 32, 16), stem_channels: Sequence[int] = (8, 16),
                 convs_per_stage: int = 2, head_init_std: float = 1e-5, ddf_stride: int = 1) -> None:
        super().__init__()
        self.init_config = config_from_locals(locals())
        self.encoder = ViT3D(img_size=img_size, patch_size=patch_size, in_channels=2, hidden_size=hidden_size,
                             num_layers=num_layers, num_heads=num_heads, mlp_dim=mlp_dim, qkv_bias=qkv_bias,
                             drop_path_rate=drop_path_rate)
        # the pair is encoded without a cls token: frozen, so DistributedDataParallel does not wait for its gradient
        self.encoder.cls_token.requires_grad_(False)
        patch = set(self.encoder.patch_size)
        p = next(iter(patch))
        if len(patch) != 1 or p < 2 or p & (p - 1):
            raise ValueError(f"patch_size must be one power of two >= 2 along every axis, got "
                             f"{self.encoder.patch_size}")
        if (isinstance(ddf_stride, bool) or not isinstance(ddf_stride, int) or ddf_stride < 1
                or ddf_stride & (ddf_stride - 1) or ddf_stride >= p):
            raise ValueError(f"ddf_stride must be a power of two smaller than patch_size {p}, got {ddf_stride!r}")
        self.ddf_stride = ddf_stride
        self.first_level = int(round(math.log2(ddf_stride)))  # the finest decoder resolution is 1 / 2^first_level
        num_stages = int(round(math.log2(p))) - self.first_level
        dec = _positive_ints(decoder_channels, "decoder_channels")
        if len(dec) != num_stages:
            raise ValueError(f"decoder_channels must have log2(patch_size / ddf_stride) = {num_stages} entries (one "
                             f"per upsampling stage), got {len(dec)}: {list(dec)}")
        stem = _positive_ints(stem_channels, "stem_channels", allow_empty=True)
        if len(stem) > num_stages:
            raise ValueError(f"stem_channels may have at most log2(patch_size / ddf_stride) = {num_stages} entries, "
                             f"got {len(stem)}: {list(stem)}")
        if isinstance(convs_per_stage, bool) or not isinstance(convs_per_stage, int) or convs_per_stage < 1:
            raise ValueError(f"convs_per_stage must be a positive int, got {convs_per_stage!r}")
        if not (isinstance(head_init_std, int | float) and head_init_std >= 0):
            raise ValueError(f"head_init_std must be a number >= 0, got {head_init_std!r}")
        self.img_size = self.encoder.img_size
        self.grid_size = self.encoder.grid_size
        self.num_stages = num_stages
        self.stem = nn.ModuleList([_conv_block(2, c, 2) for c in stem])
        self.bottleneck = nn.Sequential(nn.Conv3d(hidden_size, dec[0], 1), nn.LeakyReLU(0.2, inplace=True))
        stages = []
        in_ch = dec[0]
        for k, out_ch in enumerate(dec):
            level = num_stages - 1 - k  # resolution 1 / 2^level after this stage's upsampling
            skip = stem[level] if level < len(stem) else 0
            stages.append(_conv_block(in_ch + skip, out_ch, convs_per_stage))
            in_ch = out_ch
        self.decoder = nn.ModuleList(stages)
        self.head = nn.Conv3d(in_ch, 3, 3, padding=1)
        nn.init.normal_(self.head.weight, 0.0, float(head_init_std))
        nn.init.zeros_(self.head.bias)
        self._warp = {"bilinear": Warp(mode="bilinear", padding_mode="border"),
                      "nearest": Warp(mode="nearest", padding_mode="border")}

    def _check_pair(self, fixed: object, moving: object) -> None:
        check_images(fixed, 1, self.img_size, name="fixed")
        check_images(moving, 1, self.img_size, name="moving")
        if fixed.shape[0] != moving.shape[0]:
            raise ValueError(f"fixed and moving must have the same batch size, got {tuple(fixed.shape)} and "
                             f"{tuple(moving.shape)}")

    def forward(self, fixed: Tensor, moving: Tensor) -> Tensor:
        """Displacement field registering ``moving`` to ``fixed``.

        Args:
            fixed: ``[B, 1, D, H, W]`` float (``(D, H, W)`` = ``img_size``), preprocessed like pretraining.
            moving: ``[B, 1, D, H, W]`` float, same size.

        Returns:
            ``ddf [B, 3, D, H, W]`` in voxels (channel ``a`` along array axis ``a``):
            ``warp(moving, ddf)(x) = moving(x + ddf(x))`` should match ``fixed``.
        """
        self._check_pair(fixed, moving)
        pair = torch.cat([fixed, moving], dim=1)
        tokens = self.encoder.forward_features(pair, include_cls=False)  # [B, L, hidden]
        b = tokens.shape[0]
        x = tokens.transpose(1, 2).reshape(b, -1, *self.grid_size)
        x = self.bottleneck(x)
        skips = []
        inp = pair
        for j, block in enumerate(self.stem):
            if j > 0 or self.ddf_stride > 1:
                inp = F.avg_pool3d(inp, 2 if j > 0 else self.ddf_stride)
            skips.append(block(inp))
        for k, stage in enumerate(self.decoder):
            level = self.num_stages - 1 - k
            size = tuple(s // (self.ddf_stride * 2 ** level) for s in self.img_size)
            x = F.interpolate(x, size=size, mode="trilinear", align_corners=False)
            if level < len(skips):
                x = torch.cat([x, skips[level]], dim=1)
            x = stage(x)
        ddf = self.head(x)
        if self.ddf_stride > 1:
            ddf = F.interpolate(ddf, size=self.img_size, mode="trilinear", align_corners=False) * self.ddf_stride
        return ddf

    def warp(self, image: Tensor, ddf: Tensor, mode: str = "bilinear") -> Tensor:
        """``image`` warped by ``ddf``: ``out(x) = image(x + ddf(x))`` (MONAI ``Warp``, border padding).

        Args:
            image: ``[B, C, D, H, W]`` (float image; a label map may be any dtype with ``mode="nearest"``).
            ddf: ``[B, 3, D, H, W]`` displacement in voxels (same ``B`` and spatial size).
            mode: ``"bilinear"`` (images) or ``"nearest"`` (label maps; returned in ``image``'s dtype).

        Returns:
            ``[B, C, D, H, W]``.
        """
        if mode not in WARP_MODES:
            raise ValueError(f"mode must be one of {WARP_MODES}, got {mode!r}")
        if not isinstance(image, Tensor) or image.ndim != 5:
            raise ValueError(f"image must be [B, C, D, H, W], got {tuple(getattr(image, 'shape', ()))}")
        if not isinstance(ddf, Tensor) or ddf.ndim != 5 or ddf.shape[1] != 3:
            raise ValueError(f"ddf must be [B, 3, D, H, W], got {tuple(getattr(ddf, 'shape', ()))}")
        if image.shape[0] != ddf.shape[0] or image.shape[2:] != ddf.shape[2:]:
            raise ValueError(f"image {tuple(image.shape)} and ddf {tuple(ddf.shape)} differ in batch or spatial size")
        if mode == "nearest":
            out = self._warp["nearest"](image.to(ddf.dtype), ddf)
            return out.round().to(image.dtype) if not image.is_floating_point() else out
        return self._warp["bilinear"](image.to(ddf.dtype), ddf)


def registration_net_from_encoder(encoder: ViT3D, **decoder_kwargs: object) -> ViTRegistrationNet:
    """A :class:`ViTRegistrationNet` whose encoder starts from ``encoder`` (e.g. a pretrained MedGMAE's).

    The 1-channel patch layer is widened to the pair by :func:`widen_patch_weight` (both channels = ``W / 2``, bias
    kept: an identical pair gives the pretrained embedding); every other encoder weight is copied.

    Args:
        encoder: a 1-channel :class:`~medgauss.nets.ViT3D` (its ``init_config`` gives the architecture).
        decoder_kwargs: ``decoder_channels``, ``stem_channels``, ``convs_per_stage``, ``head_init_std``.

    Raises:
        ValueError: ``encoder`` is not a 1-channel ViT3D, or ``decoder_kwargs`` names an encoder argument.
    """
    if not isinstance(encoder, ViT3D):
        raise ValueError(f"encoder must be a medgauss.nets.ViT3D, got {type(encoder).__name__}")
    if encoder.in_channels != 1:
        raise ValueError(f"encoder must have in_channels=1 (a pretrained single-image encoder), got "
                         f"{encoder.in_channels}")
    config = {k: v for k, v in encoder.init_config.items() if k != "in_channels"}
    clash = sorted(set(config) & set(decoder_kwargs))
    if clash:
        raise ValueError(f"decoder_kwargs must not set encoder arguments {clash} (they come from the encoder)")
    net = ViTRegistrationNet(**config, **decoder_kwargs)
    state = dict(encoder.state_dict())
    state["patch_embed.proj.weight"] = widen_patch_weight(state["patch_embed.proj.weight"], 2).clone()
    net.encoder.load_state_dict(state, strict=True)
    return net
