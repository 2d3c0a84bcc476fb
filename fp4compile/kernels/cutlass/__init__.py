"""CUTLASS-class GEMM libraries behind the fp4 ops, by GPU generation.

- Hopper (compute capability 9.x): PyTorch's CUTLASS fp8 GEMMs with row-wise scales
  (``hopper.py``; MXFP4 W4A4 only, the case that is exact in e4m3). Measured on the H100.
- Blackwell (10.x, 12.x): native fp4 tensor cores through ``qutlass`` when it is installed,
  else PyTorch's block-scaled ``torch._scaled_mm`` (``blackwell.py``). Not run on hardware
  here: built to the documented call contracts and tested against stand-ins that check them.

Each entry point has an ``*_unsupported`` twin that returns why it cannot run a call (or None),
which is what the op's implementation choice (``ops/chooser.py``) reads.
"""

import torch

from . import blackwell, hopper

E4m3Weight = hopper.E4m3Weight


def _family(device: torch.device) -> str | None:
    if device.type != "cuda":
        return None
    major, _ = torch.cuda.get_device_capability(device)
    return {9: "hopper", 10: "blackwell", 12: "blackwell"}.get(major)


def _no_family(device: torch.device) -> str:
    if device.type != "cuda":
        return "the CUTLASS GEMMs run on CUDA tensors"
    return (f"no CUTLASS fp4/fp8 GEMM for compute capability {torch.cuda.get_device_capability(device)} "
            "(Hopper 9.x: fp8; Blackwell 10.x/12.x: fp4)")


def unsupported(device: torch.device, fmt: str, act_mode: str, op: str) -> str | None:
    """Why no CUTLASS GEMM on ``device`` computes ``op`` ("linear" or "moe") in this format and
    mode, whatever the shapes, or None."""
    family = _family(device)
    if family == "hopper":
        return hopper.unsupported(fmt, act_mode, op)
    if family == "blackwell":
        return blackwell.unsupported(fmt, act_mode, op, device)
    return _no_family(device)


def linear_unsupported(x: torch.Tensor, fmt: str, act_mode: str, n: int, k: int,
                       row_scaled: bool = False) -> str | None:
    """Why ``linear`` cannot run this ``fp4::linear`` call here, or None. ``row_scaled``: the
    weight has one global scale per row (fused projections), which the CUTLASS GEMMs' scalar
    ``alpha`` cannot apply."""
    reason = unsupported(x.device, fmt, act_mode, "linear")
    if reason is not None:
        return reason
    if row_scaled:
        return "per-row weight global scales (fused projections) need a per-column alpha"
    if _family(x.device) == "hopper":
        return hopper.shape_unsupported(x, {"N": n, "K": k})
    return blackwell.shape_unsupported(x, fmt, n, k)


def linear(
    x: torch.Tensor,
    w_packed: torch.Tensor,
    w_scales: torch.Tensor,
    w_global_scale: torch.Tensor,
    act_global_scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    fmt: str,
    weight_e4m3: E4m3Weight | None = None,
) -> torch.Tensor:
    """``fp4::linear`` W4A4 through the GPU's CUTLASS GEMM (after ``linear_unsupported`` said yes)."""
    if _family(x.device) == "hopper":
        return hopper.scaled_mm_linear(x, w_packed, w_scales, w_global_scale, bias, weight_e4m3)
    return blackwell.linear(x, w_packed, w_scales, w_global_scale, act_global_scale, bias, fmt)


def moe_unsupported(hidden: torch.Tensor, fmt: str, act_mode: str, size: int, inter: int) -> str | None:
    """Why ``moe`` cannot run this ``fp4::moe`` call here, or None."""
    return (unsupported(hidden.device, fmt, act_mode, "moe")
            or hopper.shape_unsupported(hidden, {"hidden size": size, "intermediate size": inter}))


moe = hopper.scaled_grouped_mm_moe
"""``fp4::moe`` MXFP4 W4A4 through the grouped CUTLASS GEMM (after ``moe_unsupported`` said yes)."""
