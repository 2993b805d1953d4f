"""A branch-free float32 ``exp`` for numba loops that LLVM can vectorise (AVX2 / AVX-512).

Why: this numba/llvmlite has no SVML, so ``math.exp`` is a scalar libm call that blocks loop
vectorisation, and the dense splat spends most of its time in ``exp``. ``fast_exp_f32`` uses only
arithmetic, min/max, a float-to-int conversion, integer shifts and a bit cast, which all have
packed forms, so a loop calling it compiles to vector instructions.

Method: ``x = k ln2 + f`` with ``k = round(x / ln2)`` (round-to-nearest by adding and subtracting
``1.5 * 2^23``) and ``|f| <= ln2 / 2`` (``ln2`` split in two so ``f`` is accurate to float32);
``e^f`` by its degree-7 Taylor polynomial (truncation ``< 6e-9`` relative) evaluated in Estrin's
scheme (a shallow dependency tree: the loop is latency-bound otherwise); ``2^k`` from its IEEE-754
bits. Results below the smallest normal float32 (``x < -87.33``) are flushed to 0, as in
flush-to-zero arithmetic: the absolute error is at most ``1.2e-38``. Elsewhere on ``x <= 0`` the
result is within 2 ulps of the correctly rounded value (tested against float64 ``math.exp``).
Callers compile with ``fastmath={"contract"}`` (fused multiply-adds only; no reassociation),
which this function's accuracy accounts for either way.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

_F32 = np.float32
_LOG2E = _F32(1.4426950408889634)
# ln2 = _LN2_HI + _LN2_LO; _LN2_HI has trailing zero bits so k * _LN2_HI is exact for |k| < 2^9.
_LN2_HI = _F32(0.693359375)
_LN2_LO = _F32(-2.12194440e-4)
_ROUND_MAGIC = _F32(12582912.0)  # 1.5 * 2^23: adding and subtracting it rounds to the nearest integer
# Below this, exp(x) is subnormal in float32 (ln of the smallest normal number, rounded up).
_SMALLEST_NORMAL_ARG = _F32(-87.33654)
_ZERO = _F32(0.0)
_ONE = _F32(1.0)
_C2 = _F32(1.0 / 2.0)
_C3 = _F32(1.0 / 6.0)
_C4 = _F32(1.0 / 24.0)
_C5 = _F32(1.0 / 120.0)
_C6 = _F32(1.0 / 720.0)
_C7 = _F32(1.0 / 5040.0)
_EXPONENT_BIAS = np.int32(127)
_MANTISSA_BITS = np.int32(23)

FASTMATH = {"contract"}


@intrinsic
def _bits_to_float32(typingctx, bits):
    """Reinterpret the bits of an ``int32`` as a ``float32`` (an LLVM ``bitcast``, vectorisable)."""
    if bits != types.int32:
        return None
    sig = types.float32(types.int32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


@njit(cache=True, nogil=True, fastmath=FASTMATH)
def fast_exp_f32(x: np.float32) -> np.float32:
    """``exp(x)`` in float32 for ``x <= 0``, branch-free and vectorisable; 0 below ``x = -87.33``.

    ``x`` must be float32 (a float64 operand would promote the caller's whole loop to float64).
    Returns float32 within 2 ulps of the correctly rounded ``exp(x)`` (subnormal results are 0).
    """
    xc = max(x, _SMALLEST_NORMAL_ARG)
    kf = (xc * _LOG2E + _ROUND_MAGIC) - _ROUND_MAGIC
    f = (xc - kf * _LN2_HI) - kf * _LN2_LO
    f2 = f * f
    low = (_ONE + f) + (_C2 + _C3 * f) * f2
    high = (_C4 + _C5 * f) + (_C6 + _C7 * f) * f2
    p = low + high * (f2 * f2)
    scale = _bits_to_float32(np.int32((np.int32(kf) + _EXPONENT_BIAS) << _MANTISSA_BITS))
    return p * scale if x >= _SMALLEST_NORMAL_ARG else _ZERO
