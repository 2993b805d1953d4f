"""Segmentation networks for fine-tuning: MONAI's UNETR on a pretrained ViT3D encoder, and SwinUNETR from scratch.

:class:`PretrainedUNETR` *is* ``monai.networks.nets.UNETR`` (a subclass: MONAI's encoder/decoder blocks, MONAI's
``ViT`` as ``.vit``), generalised where MONAI hard-codes the ViT-B layout, so that the CPU-scale encoders fit:

- **depth:** MONAI builds 12 transformer layers and taps the hidden states of layers 3, 6 and 9 (0-based block
  outputs). Here the encoder's depth ``L`` is kept and the taps are ``(L // 4, L // 2, 3 L // 4)``, which is
  (3, 6, 9) for ``L = 12`` and (1, 3, 4) for the 6-layer tiny encoder.
- **patch size:** MONAI assumes 16^3 patches (tokens at 1/16 resolution; skips at 1/2, 1/4, 1/8 made by 3, 2 and 1
  transposed convolutions, the bottleneck upsampled once to 1/8). With 8^3 patches the tokens are already at 1/8:
  the skips take 2, 1 and 0 upsamplings (the last a plain ``UnetrBasicBlock``) and the bottleneck joins the 1/8 skip
  through a stride-1 ``UnetrUpBlock``. Every other block is MONAI's, unchanged.

With a ViT-B encoder (patch 16, 12 layers) the network is exactly MONAI's UNETR: same state-dict keys, same output
(tested). The encoder's weights go into ``.vit`` through :func:`medgauss.nets.encoder_to_monai_state_dict`, loaded
strictly; a missing or unexpected key is an error that lists them.

:func:`unetr_from_pretrained` is the one-call builder from a pretraining run; :class:`ScratchSwinUNETR` is MONAI's
SwinUNETR with ``save_pretrained`` (the from-scratch reference of the segmentation benchmark).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from monai.networks.blocks import UnetrBasicBlock, UnetrPrUpBlock, UnetrUpBlock
from monai.networks.nets import UNETR, SwinUNETR, ViT
from torch import Tensor

from medgauss.nets.blocks import to_3tuple
from medgauss.nets.monai_export import encoder_to_monai_state_dict, monai_vit_kwargs
from medgauss.nets.pretrained import PretrainedMixin, config_from_locals
from medgauss.nets.pretrained_runs import load_pretrained_encoder
from medgauss.nets.vit3d import ViT3D, check_images

__all__ = ["PretrainedUNETR", "ScratchSwinUNETR", "tap_layers", "unetr_from_encoder", "unetr_from_pretrained"]

SUPPORTED_PATCH_SIZES = (8, 16)


def tap_layers(num_layers: int) -> tuple[int, int, int]:
    """The 0-based transformer blocks whose outputs feed UNETR's 1/2, 1/4 and 1/8 skips: ``(L//4, L//2, 3L//4)``."""
    if num_layers < 4:
        raise ValueError(f"UNETR needs an encoder of at least 4 layers (three distinct skip taps), got {num_layers}")
    return num_layers // 4, num_layers // 2, 3 * num_layers // 4


class PretrainedUNETR(PretrainedMixin, UNETR):
    """MONAI UNETR whose ViT has the depth and patch size of a :class:`ViT3D` encoder (module doc).

    Args:
        out_channels: segmentation classes (background included).
        img_size: input size ``(D, H, W)`` (int = cube), divisible by ``patch_size``.
        patch_size: 8 or 16 (isotropic).
        in_channels, hidden_size, num_layers, num_heads, mlp_dim, qkv_bias: the encoder's (:class:`ViT3D` kwargs).
        feature_size: UNETR's decoder width (MONAI default 16).
        norm_name: decoder normalisation (MONAI default ``"instance"``).
        res_block: residual decoder blocks.
        dropout_rate: ViT dropout.
        class_names: names of the ``out_channels`` classes (background first), kept in the saved config so the
            inference command can name them.

    ``forward(images [B, in_channels, *img_size]) -> logits [B, out_channels, *img_size]``.
    """

    lr_decay_prefix = "vit."

    def __init__(self, out_channels: int, img_size: int | Sequence[int] = 96, patch_size: int = 16,
                 in_channels: int = 1, hidden_size: int = 768, num_layers: int = 12, num_heads: int = 12,
                 mlp_dim: int = 3072, qkv_bias: bool = False, feature_size: int = 16,
                 norm_name: str = "instance", res_block: bool = True, dropout_rate: float = 0.0,
                 class_names: Sequence[str] | None = None) -> None:
        config = config_from_locals(locals())
        size = to_3tuple(img_size, "img_size")
        patch = to_3tuple(patch_size, "patch_size")
        if len(set(patch)) != 1 or patch[0] not in SUPPORTED_PATCH_SIZES:
            raise ValueError(f"patch_size must be one of {SUPPORTED_PATCH_SIZES} (isotropic), got {patch_size!r}")
        if any(s % patch[0] for s in size):
            raise ValueError(f"img_size {size} must be divisible by patch_size {patch[0]}")
        if out_channels < 2:
            raise ValueError(f"out_channels must be >= 2 (background + a class), got {out_channels}")
        if class_names is not None and len(class_names) != out_channels:
            raise ValueError(f"class_names must name the {out_channels} classes, got {len(class_names)}")
        taps = tap_layers(num_layers)
        super().__init__(in_channels=in_channels, out_channels=out_channels, img_size=size,
                         feature_size=feature_size, hidden_size=hidden_size, mlp_dim=mlp_dim, num_heads=num_heads,
                         proj_type="conv", norm_name=norm_name, conv_block=True, res_block=res_block,
                         dropout_rate=dropout_rate, spatial_dims=3, qkv_bias=qkv_bias)
        self.init_config = config
        self.img_size, self.class_names = size, None if class_names is None else list(class_names)
        self.tap_layers = taps
        if num_layers != 12 or patch[0] != 16:
            self._rebuild_for(size, patch, num_layers, hidden_size, mlp_dim, num_heads, qkv_bias, dropout_rate,
                              in_channels, feature_size, norm_name, res_block)
        # MONAI's ViT blocks create a cross-attention LayerNorm they never use without cross-attention: freeze it,
        # so DistributedDataParallel does not wait for its (never coming) gradient.
        for name, param in self.vit.named_parameters():
            if ".norm_cross_attn." in name:
                param.requires_grad_(False)

    def _rebuild_for(self, size, patch, num_layers, hidden_size, mlp_dim, num_heads, qkv_bias, dropout_rate,
                     in_channels, feature_size, norm_name, res_block) -> None:
        self.num_layers, self.patch_size = num_layers, patch
        self.feat_size = tuple(s // p for s, p in zip(size, patch))
        self.proj_view_shape = list(self.feat_size) + [hidden_size]
        self.vit = ViT(in_channels=in_channels, img_size=size, patch_size=patch, hidden_size=hidden_size,
                       mlp_dim=mlp_dim, num_layers=num_layers, num_heads=num_heads, proj_type="conv",
                       classification=False, dropout_rate=dropout_rate, spatial_dims=3, qkv_bias=qkv_bias)
        if patch[0] == 16:
            return  # MONAI's decoder fits 1/16 tokens as built
        common = dict(spatial_dims=3, kernel_size=3, norm_name=norm_name, res_block=res_block)
        up = dict(stride=1, upsample_kernel_size=2, conv_block=True, **common)
        self.encoder2 = UnetrPrUpBlock(in_channels=hidden_size, out_channels=feature_size * 2, num_layer=1, **up)
        self.encoder3 = UnetrPrUpBlock(in_channels=hidden_size, out_channels=feature_size * 4, num_layer=0, **up)
        self.encoder4 = UnetrBasicBlock(in_channels=hidden_size, out_channels=feature_size * 8, stride=1, **common)
        self.decoder5 = UnetrUpBlock(in_channels=hidden_size, out_channels=feature_size * 8,
                                     upsample_kernel_size=1, **common)

    def forward(self, x_in: Tensor) -> Tensor:
        check_images(x_in, self.vit.patch_embedding.patch_embeddings.in_channels, self.img_size)
        x, hidden = self.vit(x_in)
        a, b, c = self.tap_layers
        enc1 = self.encoder1(x_in)
        enc2 = self.encoder2(self.proj_feat(hidden[a]))
        enc3 = self.encoder3(self.proj_feat(hidden[b]))
        enc4 = self.encoder4(self.proj_feat(hidden[c]))
        dec3 = self.decoder5(self.proj_feat(x), enc4)
        dec2 = self.decoder4(dec3, enc3)
        dec1 = self.decoder3(dec2, enc2)
        return self.out(self.decoder2(dec1, enc1))

    def load_encoder(self, encoder: ViT3D) -> None:
        """Copy ``encoder``'s weights into ``.vit`` (strict; raises ``ValueError`` listing any key mismatch)."""
        state = encoder_to_monai_state_dict(encoder)
        own = self.vit.state_dict()
        missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
        shapes = [f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
                  if k in own and v.shape != own[k].shape]
        if missing or unexpected or shapes:
            raise ValueError(f"encoder does not fit this UNETR's ViT: missing keys {missing}, unexpected keys "
                             f"{unexpected}, shape mismatches {shapes}")
        self.vit.load_state_dict(state, strict=True)


def unetr_from_encoder(encoder: ViT3D, out_channels: int, *, feature_size: int = 16, norm_name: str = "instance",
                       res_block: bool = True, dropout_rate: float = 0.0,
                       class_names: Sequence[str] | None = None) -> PretrainedUNETR:
    """A :class:`PretrainedUNETR` of ``encoder``'s architecture with its weights in ``.vit`` (strict load).

    Raises:
        ValueError: ``encoder`` is not a ViT3D, or has a patch size UNETR cannot take (naming it).
    """
    if not isinstance(encoder, ViT3D):
        raise ValueError(f"encoder must be a medgauss.nets.ViT3D, got {type(encoder).__name__}")
    kwargs = monai_vit_kwargs(encoder)
    net = PretrainedUNETR(out_channels, img_size=list(kwargs["img_size"]), patch_size=int(kwargs["patch_size"][0])
                          if len(set(kwargs["patch_size"])) == 1 else list(kwargs["patch_size"]),
                          in_channels=kwargs["in_channels"], hidden_size=kwargs["hidden_size"],
                          num_layers=kwargs["num_layers"], num_heads=kwargs["num_heads"], mlp_dim=kwargs["mlp_dim"],
                          qkv_bias=kwargs["qkv_bias"], feature_size=feature_size, norm_name=norm_name,
                          res_block=res_block, dropout_rate=dropout_rate, class_names=class_names)
    net.load_encoder(encoder)
    return net


def unetr_from_pretrained(checkpoint_dir: str | Path, out_channels: int, **kwargs) -> PretrainedUNETR:
    """UNETR initialised from a MedGMAE / MedGMAE* / voxel-MAE pretraining run (or its ``model/`` export).

    Example::

        net = unetr_from_pretrained("runs/pretrained/medgmae_cpu_30min", out_channels=7)

    ``kwargs`` go to :func:`unetr_from_encoder` (``feature_size``, ``class_names``, ...).

    Raises:
        FileNotFoundError: no model export in or under ``checkpoint_dir``.
        ValueError: the checkpoint holds no ViT3D encoder (e.g. an XGRM) or one UNETR cannot take.
    """
    return unetr_from_encoder(load_pretrained_encoder(checkpoint_dir), out_channels, **kwargs)


class ScratchSwinUNETR(PretrainedMixin, SwinUNETR):
    """MONAI's SwinUNETR (v1) with ``save_pretrained``, trained from scratch as the segmentation reference.

    Args:
        out_channels, in_channels, feature_size (a multiple of 12), depths, num_heads: MONAI's.
        img_size: the crop size it is trained on (each side divisible by 32; checked on input).
        class_names: as in :class:`PretrainedUNETR`.
    """

    def __init__(self, out_channels: int, img_size: int | Sequence[int] = 96, in_channels: int = 1,
                 feature_size: int = 24, depths: Sequence[int] = (2, 2, 2, 2),
                 num_heads: Sequence[int] = (3, 6, 12, 24), class_names: Sequence[str] | None = None) -> None:
        config = config_from_locals(locals())
        size = to_3tuple(img_size, "img_size")
        if any(s % 32 for s in size):
            raise ValueError(f"SwinUNETR needs img_size divisible by 32 on every side, got {size}")
        if feature_size % 12:
            raise ValueError(f"SwinUNETR's feature_size must be a multiple of 12, got {feature_size}")
        super().__init__(in_channels=in_channels, out_channels=out_channels, feature_size=feature_size,
                         depths=tuple(depths), num_heads=tuple(num_heads), spatial_dims=3)
        self.init_config = config
        self.img_size, self.in_channels = size, in_channels
        self.class_names = None if class_names is None else list(class_names)

    def forward(self, x_in: Tensor) -> Tensor:
        check_images(x_in, self.in_channels, self.img_size)
        return super().forward(x_in)
