"""The implementations behind the fp4 ops, what each needs, and what the layer report says.

``torch``: the reference math (``formats``), anywhere. ``triton``: the Triton kernels, on CUDA.
``cutlass``: CUTLASS-class library GEMMs (``kernels/cutlass``), on Hopper and Blackwell GPUs, for
the cases each can compute exactly. The kernel packages are imported on first use, so the ops
(and their reference) work where Triton is not installed.
"""

import importlib.util
from types import ModuleType

import torch

from ..formats.linear import mode_label
from ..formats.spec import MXFP4, Fp4Format, get_format
from .chooser import AUTO

TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None

REFERENCE = "torch (reference)"


def triton_unsupported(device: torch.device) -> str | None:
    """Why the Triton kernels cannot run on ``device``, or None."""
    if not TRITON_AVAILABLE:
        return "Triton is not installed"
    if device.type != "cuda":
        return "the Triton kernels run on CUDA tensors"
    return None


def cutlass_unsupported(device: torch.device) -> str | None:
    """Why ``kernels.cutlass`` cannot even be asked about ``device`` (checked before importing it,
    which needs Triton); what each GPU generation computes is its own check."""
    if device.type != "cuda":
        return "the CUTLASS GEMMs run on CUDA tensors"
    if not TRITON_AVAILABLE:
        return "its conversion kernels need Triton, which is not installed"
    return None


def fp8_weights_unsupported(device: torch.device, fmt: str, act_mode: str) -> str | None:
    """Why ``Fp4Config.fp8_weights`` does not apply to a layer (or None): the e4m3 weight form is
    exact for MXFP4 only and used by the W4A4 fp8 GEMMs, on GPUs with fp8 tensor cores."""
    if get_format(fmt) is not MXFP4 or act_mode != "fp4":
        return f"e4m3 weights serve MXFP4 W4A4 only, this layer is {fmt} {mode_label(act_mode)}"
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
        return "e4m3 weights need a GPU with fp8 tensor cores (compute capability 8.9 and up)"
    if not TRITON_AVAILABLE:
        return "the e4m3 conversion needs Triton, which is not installed"
    return None


def triton_kernels() -> ModuleType:
    from ..kernels import triton

    return triton


def cutlass_kernels() -> ModuleType:
    from ..kernels import cutlass

    return cutlass


def check_e4m3_weight(name: str, e4m3: torch.Tensor | None, row_scale: torch.Tensor | None,
                      shape: tuple[int, ...], spec: Fp4Format) -> None:
    """Raise unless (``e4m3``, ``row_scale``) is absent or an MXFP4 weight's e4m3 form: uint8 of
    ``shape`` and float32 row scales of ``shape[:-1]``."""
    if e4m3 is None and row_scale is None:
        return
    if e4m3 is None or row_scale is None:
        raise ValueError(f"{name} and {name}_scale come together; got only one of them")
    if spec is not MXFP4:
        raise ValueError(f"{name}: an e4m3 weight form exists for MXFP4 only (exact in e4m3), not {spec.name}")
    if e4m3.dtype != torch.uint8 or tuple(e4m3.shape) != shape:
        raise ValueError(f"{name} must be uint8 e4m3 bytes of shape {shape}, got {e4m3.dtype} {tuple(e4m3.shape)}")
    if row_scale.dtype != torch.float32 or tuple(row_scale.shape) != shape[:-1]:
        raise ValueError(f"{name}_scale must be float32 of shape {shape[:-1]}, got {row_scale.dtype} "
                         f"{tuple(row_scale.shape)}")


def implementation_for(device: torch.device, fmt: str, act_mode: str, configured: str = AUTO, op: str = "linear") -> str:
    """What runs ``op`` ("linear" or "moe") for weights on ``device`` (the layer report's column):
    the forced implementation, else the candidates the chooser times per shape at the first call;
    for linear layers also the Triton kernel per M bucket."""
    if configured != AUTO:
        return configured
    if triton_unsupported(device) is not None:
        return REFERENCE
    triton = "triton"
    if op == "linear":
        from ..kernels.triton.linear import kernel_plan

        triton = f"triton ({kernel_plan(fmt, act_mode, device)})"
    if (cutlass_unsupported(device) or cutlass_kernels().unsupported(device, fmt, act_mode, op)) is not None:
        return triton
    return f"auto: {triton} or cutlass, timed per shape"
