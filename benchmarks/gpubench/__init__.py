"""The sections of benchmarks/gpu.py (the entry point): models, whole-engine runs, kernels."""
