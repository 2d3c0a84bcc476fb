"""Which implementation runs the fp4 ops on a device: Triton kernels on CUDA, else the reference."""

import importlib.util

import torch

TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None

TRITON = "triton"
REFERENCE = "torch (reference)"


def implementation_for(device: torch.device, fmt: str | None = None, act_mode: str | None = None) -> str:
    """The implementation the ops dispatch to for tensors on ``device`` (shown in the report); with
    a linear layer's format and mode, also which kernel runs at which M (chosen per call)."""
    if device.type != "cuda" or not TRITON_AVAILABLE:
        return REFERENCE
    if fmt is None:
        return TRITON
    from ..kernels.triton.linear import kernel_plan

    return f"{TRITON}: {kernel_plan(fmt, act_mode, device)}"
