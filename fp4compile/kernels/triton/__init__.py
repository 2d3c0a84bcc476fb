"""Triton kernels: activation quantization, fp4 GEMMs and the fp4 MoE (CUDA; the interpreter
runs them on CPU)."""

from .linear import fp4_linear
from .moe import fp4_moe
from .quantize import fp4_fake_quantize, fp4_quantize

__all__ = ["fp4_fake_quantize", "fp4_linear", "fp4_moe", "fp4_quantize"]
