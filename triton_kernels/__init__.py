"""Triton GPU kernels for medgauss (imports torch and triton only, never medgauss).

Kernels run on CUDA tensors, or on CPU tensors in Triton's interpreter when ``TRITON_INTERPRET=1``
is set before ``triton`` is first imported.
"""

from triton_kernels.splat import splat_tiles

__all__ = ["splat_tiles"]
