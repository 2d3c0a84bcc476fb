"""Which implementation runs the fp4 ops on a device: Triton kernels on CUDA, else the reference."""

import importlib.util

import torch

TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None

TRITON = "triton"
REFERENCE = "torch (reference)"


def implementation_for(device: torch.device) -> str:
    """The implementation the ops dispatch to for tensors on ``device`` (shown in the report)."""
    return TRITON if device.type == "cuda" and TRITON_AVAILABLE else REFERENCE
