"""tfx_kernels: Triton kernels for the TokenFLEX projector (adaptive pool + SwiGLU, fwd + bwd).

Imported only by `tfx.model.projector`, lazily, when `projector.kernel` selects Triton.
Under TRITON_INTERPRET=1 (set it before this import) the kernels run on the CPU for tests.
"""

from tfx_kernels.pool import pool, pool_ln, unpool
from tfx_kernels.projector import FusedProjectorFn, fused_projector
from tfx_kernels.reference import reference_projector
from tfx_kernels.swiglu import dgrad_swiglu, gateup_swiglu

__all__ = ["FusedProjectorFn", "dgrad_swiglu", "fused_projector", "gateup_swiglu", "pool",
           "pool_ln", "reference_projector", "unpool"]
