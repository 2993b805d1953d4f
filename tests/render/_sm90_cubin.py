"""Compile a Triton kernel to an sm_90 (H100/H200) cubin without a GPU and read its register use.

Used by the slow "compiles without spills" tests of the splat and X-ray kernels, which run it in a
subprocess with ``TRITON_INTERPRET`` unset. Imports only triton (and the standard library).
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Iterable, Mapping

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


def sm90_resource_usage(kernel, *, ints: Iterable[str], int_ptrs: Iterable[str], fp: str,
                        consts: Mapping[str, object], num_warps: int) -> str:
    """``cuobjdump --dump-resource-usage`` line (``REG:... STACK:... LOCAL:...``) of ``kernel``'s sm_90 cubin.

    Arguments named in ``ints`` are ``i32``, in ``int_ptrs`` ``*i32``, in ``consts`` constexprs, every other
    one a pointer of type ``fp`` (``"*fp32"`` / ``"*fp64"``).
    """
    ints, int_ptrs = set(ints), set(int_ptrs)
    sig = {a: ("i32" if a in ints else "*i32" if a in int_ptrs else "constexpr" if a in consts else fp)
           for a in kernel.arg_names}
    compiled = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=dict(consts)),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True,
                               check=True).stdout
    return next(s for s in usage.splitlines() if "REG:" in s).strip()
