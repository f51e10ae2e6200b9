"""Meta-kernels: tiling planner, Triton kernels and pure-torch references.

This layer imports neither `lowering` nor `xy_inductor`.
"""
