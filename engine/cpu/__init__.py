"""CPU kernels (Numba)."""
