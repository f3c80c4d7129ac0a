"""The DRR renderer: C-arm geometry, physics, the numba CPU/CUDA kernels, the projector and frame files."""
