"""Compute kernels behind one dispatch point: a torch path for CPU (and reference), Triton on CUDA."""
