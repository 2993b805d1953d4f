"""GRM-style transformer upsampler for per-view feature maps: 2x pixel-shuffle steps, each followed by
windowed self-attention (non-overlapping w x w windows per view) and an MLP. Used by
:class:`medgauss.nets.xgrm.XGRM` (``upsampler="transformer"``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

__all__ = ["WindowAttention", "WindowBlock", "TransformerUpsampler"]


class WindowAttention(nn.Module):
    """Multi-head self-attention inside non-overlapping ``window x window`` windows of each image.

    ``forward(x [N, H, W, C]) -> [N, H, W, C]``. Windows are tiled from pixel ``(0, 0)``; along an axis shorter
    than ``window`` the window is the whole axis. When ``window`` does not divide an axis, the last windows are
    padded and the padded pixels are masked out of the keys (a pixel only ever attends to real pixels of its
    own window). SDPA attention (``softmax(q k^T / sqrt(head_dim)) v``), then an output projection.
    """

    def __init__(self, dim: int, num_heads: int, window: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"window attention width {dim} must be divisible by num_heads {num_heads}")
        self.num_heads, self.window = num_heads, window
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def window_shape(self, size: tuple[int, int]) -> tuple[int, int]:
        """Window ``(rows, cols)`` used on an ``(H, W)`` image."""
        return min(self.window, size[0]), min(self.window, size[1])

    def forward(self, x: Tensor) -> Tensor:
        n, h, w, c = x.shape
        wh, ww = self.window_shape((h, w))
        pad_h, pad_w = (-h) % wh, (-w) % ww
        if pad_h or pad_w:
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        rows, cols = (h + pad_h) // wh, (w + pad_w) // ww
        windows = x.reshape(n, rows, wh, cols, ww, c).permute(0, 1, 3, 2, 4, 5).reshape(n * rows * cols, wh * ww, c)
        mask = None
        if pad_h or pad_w:  # [rows cols, wh ww] real pixels, the same for every image
            real = torch.zeros(h + pad_h, w + pad_w, dtype=torch.bool, device=x.device)
            real[:h, :w] = True
            real = real.reshape(rows, wh, cols, ww).permute(0, 2, 1, 3).reshape(rows * cols, 1, wh * ww)
            mask = real.repeat(n, 1, 1)[:, None]  # [n rows cols, 1, 1, wh ww]
        q, k, v = self.qkv(windows).unflatten(-1, (3, self.num_heads, -1)).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [n rows cols, heads, wh ww, hd]
        out = self.proj(out.transpose(1, 2).flatten(2))
        out = out.reshape(n, rows, cols, wh, ww, c).permute(0, 1, 3, 2, 4, 5).reshape(n, h + pad_h, w + pad_w, c)
        return out[:, :h, :w]


class WindowBlock(nn.Module):
    """Pre-norm transformer block on images: ``x + attn(LN(x))`` (:class:`WindowAttention`), ``x + MLP(LN(x))``.

    ``forward(x [N, H, W, C]) -> [N, H, W, C]``; the MLP (timm ``Mlp``, GELU) has ``mlp_ratio * C`` hidden units.
    """

    def __init__(self, dim: int, num_heads: int, window: int, mlp_ratio: float = 4.0, qkv_bias: bool = True) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, window, qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(round(mlp_ratio * dim)), act_layer=nn.GELU)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def _heads_for(width: int, head_dim: int) -> int:
    """The most heads of at least ``head_dim`` channels that divide ``width`` (at least 1)."""
    return max(h for h in range(1, max(1, width // head_dim) + 1) if width % h == 0)


class TransformerUpsampler(nn.Module):
    """GRM's transformer upsampler: tokens ``[N, h w, C_in]`` -> feature maps ``[N, C_out, f h, f w]``.

    ``log2(factor)`` steps, each ``Linear(c -> 4 c')`` + pixel shuffle x2 (``c' = max(out_dim, c // 2)``) and a
    :class:`WindowBlock` (``window x window`` windows; the most heads of at least ``head_dim`` channels that
    divide ``c'``, at least one); then ``LayerNorm`` and ``Linear(c -> out_dim)``. ``factor`` must be a power of 2
    (``1``: no step, the final projection only). There is no position bias in the windows: pixels differ by
    their content (the fused tokens carry the encoder's position embedding; the pixel shuffle gives the four
    sub-pixels of a pixel different channels of the ``Linear``).

    Args:
        in_dim, out_dim: token and feature-map channels.
        factor: upsampling factor of each axis.
        window: window edge (pixels) of every step's attention.
        head_dim: smallest channels per attention head.
        qkv_bias: biases of the attention's query / key / value projections.
    """

    def __init__(self, in_dim: int, out_dim: int, factor: int, window: int = 8, head_dim: int = 32,
                 qkv_bias: bool = True) -> None:
        super().__init__()
        if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1 or factor & (factor - 1):
            raise ValueError(f"the transformer upsampler needs a power-of-2 factor, got {factor!r}")
        for name, value in (("window", window), ("head_dim", head_dim), ("in_dim", in_dim), ("out_dim", out_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"upsampler {name} must be a positive int, got {value!r}")
        self.factor = factor
        widths = [in_dim]
        for _ in range(factor.bit_length() - 1):
            widths.append(max(out_dim, widths[-1] // 2))
        self.expand = nn.ModuleList(nn.Linear(a, 4 * b) for a, b in zip(widths[:-1], widths[1:]))
        self.blocks = nn.ModuleList(WindowBlock(c, _heads_for(c, head_dim), window, qkv_bias=qkv_bias)
                                    for c in widths[1:])
        self.norm = nn.LayerNorm(widths[-1])
        self.out = nn.Linear(widths[-1], out_dim)
        self.widths = tuple(widths)

    def forward(self, tokens: Tensor, grid: tuple[int, int], grad_checkpointing: bool = False) -> Tensor:
        """``tokens [N, gh gw, C_in]`` (rows then columns) of a ``grid = (gh, gw)`` -> ``[N, C_out, f gh, f gw]``."""
        n, _, c = tokens.shape
        x = tokens.reshape(n, grid[0], grid[1], c)
        for expand, block in zip(self.expand, self.blocks):
            x = F.pixel_shuffle(expand(x).permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1)  # [N, 2h, 2w, c']
            if grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.out(self.norm(x)).permute(0, 3, 1, 2)
