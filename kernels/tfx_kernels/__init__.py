"""tfx_kernels: Triton kernels for the TokenFLEX projector (placeholder until the kernel lands)."""
