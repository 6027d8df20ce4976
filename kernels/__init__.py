"""Numba kernels: pure functions over numpy arrays that write into caller-provided outputs."""
