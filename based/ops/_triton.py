"""Triton helpers shared by the decode kernels: the two halves of programmatic dependent launch.

With `PDL` (see `_backend.chained_launch`), a kernel calls `let_next_kernel_start` first, so the next kernel's
programs can be scheduled while this one runs, and `wait_for_previous_kernel` before it reads or writes
anything the previous kernel may touch. Without `PDL` both are no-ops (the interpreter has no PDL).
"""
import triton
import triton.language as tl


@triton.jit
def let_next_kernel_start(PDL: tl.constexpr):
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def wait_for_previous_kernel(PDL: tl.constexpr):
    if PDL:
        tl.extra.cuda.gdc_wait()
