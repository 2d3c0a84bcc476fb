"""Reference fp4 linear layer: ``y = x @ w.T + bias`` with fp4 weights (and optionally activations).

The oracle for the GEMM kernels. It follows their structure: products of ``e2m1 * block_scale``
operands accumulated in float32, then one multiplication by ``alpha = gs_activation * gs_weight``
(a device tensor, never a Python float), then the bias, then the cast to the activation dtype.
"""

import torch

from .blocks import QuantizedTensor, dequantize_blocks
from .mxfp4 import quantize_mxfp4
from .nvfp4 import quantize_nvfp4
from .spec import MXFP4, get_format

ACT_MODES = ("fp4", "none")
"""``fp4``: W4A4, the activation is quantized to the weight's format inside the op.
``none``: W4A16, the activation stays in its own dtype."""


def mode_label(act_mode: str) -> str:
    """``act_mode`` as the implementation choice's keys and the error messages name it: W4A4 or W4A16."""
    return "W4A4" if act_mode == "fp4" else "W4A16"


def check_act_mode(act_mode: str) -> None:
    """Raise unless ``act_mode`` is one of ``ACT_MODES``."""
    if act_mode not in ACT_MODES:
        raise ValueError(f"unknown act_mode {act_mode!r}; expected one of {list(ACT_MODES)}")


def linear_reference(
    x: torch.Tensor,
    weight: QuantizedTensor,
    act_global_scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    act_mode: str,
) -> torch.Tensor:
    """fp4 linear: x (..., K) and an fp4 weight (N, K) -> (..., N) in x's dtype.

    ``act_global_scale``: NVFP4 W4A4 only, a static activation global scale (None: computed from
    ``x`` on its device). ``weight.global_scale`` may hold one scale per weight row (N,): a weight
    fused from projections with their own scales. Validation of shapes and dtypes is the
    caller's (the op's) job.
    """
    fmt = get_format(weight.fmt)
    if act_mode == "fp4":
        if fmt is MXFP4:
            act = quantize_mxfp4(x)
        else:
            act = quantize_nvfp4(x, act_global_scale)
        activation = dequantize_blocks(act.packed, act.scales, fmt)
        alpha = act.global_scale * weight.global_scale.reshape(-1)
    else:
        activation = x.float()
        alpha = weight.global_scale.reshape(-1)
    w = dequantize_blocks(weight.packed, weight.scales, fmt)
    y = (activation @ w.T) * alpha
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
