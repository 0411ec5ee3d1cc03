"""Triton kernels of pycurv, installed as ``pycurv.kernels`` (one module per op family)."""
