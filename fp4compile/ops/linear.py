"""Custom op ``fp4::linear``: ``y = x @ w.T + bias`` with an fp4 weight in its canonical form.

One op for W4A4 (``act_mode="fp4"``: the activation is quantized inside the op, so a kernel can
fuse it into the GEMM) and W4A16 (``act_mode="none"``). The global scales enter only as
``alpha = gs_activation * gs_weight``, formed on the device from the two global-scale tensors,
so a forward never syncs with the host.
"""

import torch

from ..formats import QuantizedTensor
from ..formats.blocks import SUPPORTED_DTYPES, check_quantized, dequantize_blocks
from ..formats.linear import check_act_mode, linear_reference, mode_label
from ..formats.nvfp4 import check_global_scale
from ..formats.spec import NVFP4, get_format
from .chooser import bucket, check_implementation, run_chosen
from .implementations import (
    check_e4m3_weight, cutlass_kernels, cutlass_unsupported, triton_kernels, triton_unsupported,
)


@torch.library.custom_op("fp4::linear", mutates_args=())
def linear(
    x: torch.Tensor,
    w_packed: torch.Tensor,
    w_scales: torch.Tensor,
    w_global_scale: torch.Tensor,
    act_global_scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    fmt: str,
    act_mode: str,
    implementation: str = "auto",
    w_e4m3: torch.Tensor | None = None,
    w_e4m3_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """x (..., K) times an fp4 weight (N, K) [+ bias (N,)] -> (..., N) in x's dtype.

    ``w_global_scale``: one element, or for NVFP4 one per weight row (N,): a weight fused at
    compile time from projections that share their input (q/k/v, gate/up) keeps each one's own
    global scale. ``act_global_scale``: only for NVFP4 W4A4, a static activation global scale
    (None: computed from x on the device in every call). ``implementation``: "auto" (see
    ``ops/chooser.py``) or one of "torch", "triton", "cutlass". ``w_e4m3``/``w_e4m3_scale``: MXFP4 only, the weight's
    exact e4m3 form (N, K) uint8 and row scales (N,), made at compile time for the fp8 GEMMs.
    """
    check_linear_args(x, w_packed, w_scales, w_global_scale, act_global_scale, bias, fmt, act_mode, implementation,
                      w_e4m3, w_e4m3_scale)
    n, k = w_packed.shape[0], x.shape[-1]
    weight_e4m3 = (w_e4m3, w_e4m3_scale) if w_e4m3 is not None else None
    args = (x, w_packed, w_scales, w_global_scale, act_global_scale, bias, fmt, act_mode)
    options = {
        "torch": lambda: linear_reference(x, QuantizedTensor(w_packed, w_scales, w_global_scale, fmt), act_global_scale,
                                          bias, act_mode),
        "triton": triton_unsupported(x.device) or (lambda: triton_kernels().fp4_linear(*args, weight_e4m3)),
        "cutlass": (cutlass_unsupported(x.device)
                    or cutlass_kernels().linear_unsupported(x, fmt, act_mode, n, k, w_global_scale.numel() > 1))
                   or (lambda: cutlass_kernels().linear(x, w_packed, w_scales, w_global_scale, act_global_scale, bias,
                                                        fmt, weight_e4m3)),
    }
    rows = x.numel() // k if k else 0
    key = (f"{choice_prefix(fmt, act_mode, n, k)}{bucket(rows)} {x.dtype}"
           f"{' e4m3-weight' if weight_e4m3 else ''}{' row-scaled' if w_global_scale.numel() > 1 else ''}")
    return run_chosen("fp4::linear", implementation, key, x.device, options)


def choice_prefix(fmt: str, act_mode: str, n: int, k: int) -> str:
    """The start of ``fp4::linear``'s choice keys for an (N, K) weight, up to the M bucket (the
    layer report finds a layer's measured choices by it)."""
    return f"fp4::linear {fmt} {mode_label(act_mode)} N={n} K={k} M<="


@linear.register_fake
def _(x, w_packed, w_scales, w_global_scale, act_global_scale, bias, fmt, act_mode, implementation="auto", w_e4m3=None,
      w_e4m3_scale=None):
    check_linear_args(x, w_packed, w_scales, w_global_scale, act_global_scale, bias, fmt, act_mode, implementation,
                      w_e4m3, w_e4m3_scale)
    return x.new_empty((*x.shape[:-1], w_packed.shape[0]))


def _setup_backward(ctx, inputs, output) -> None:
    x, w_packed, w_scales, w_global_scale, _, bias, fmt, *_ = inputs
    ctx.save_for_backward(w_packed, w_scales, w_global_scale)
    ctx.fmt = fmt
    ctx.has_bias = bias is not None


def _backward(ctx, grad: torch.Tensor):
    """Gradients for the activation and the bias; the fp4 weight is frozen (no gradient).

    Activation quantization (W4A4) is treated as the identity (straight-through estimator), so
    a compiled model can still train the parts left in high precision (e.g. adapters, norms).
    """
    w_packed, w_scales, w_global_scale = ctx.saved_tensors
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        weight = dequantize_blocks(w_packed, w_scales, get_format(ctx.fmt)) * w_global_scale.reshape(-1, 1)
        grad_x = (grad.float() @ weight).to(grad.dtype)
    if ctx.has_bias and ctx.needs_input_grad[5]:
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
    return grad_x, None, None, None, None, grad_bias, None, None, None, None, None


linear.register_autograd(_backward, setup_context=_setup_backward)


def check_linear_args(
    x: torch.Tensor,
    w_packed: torch.Tensor,
    w_scales: torch.Tensor,
    w_global_scale: torch.Tensor,
    act_global_scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    fmt: str,
    act_mode: str,
    implementation: str = "auto",
    w_e4m3: torch.Tensor | None = None,
    w_e4m3_scale: torch.Tensor | None = None,
) -> None:
    """Raise a clear error for anything ``fp4::linear`` cannot compute (shared by every backend)."""
    spec = get_format(fmt)
    check_act_mode(act_mode)
    check_implementation(implementation, "fp4::linear's implementation")
    if w_packed.dim() != 2:
        raise ValueError(f"fp4::linear needs a 2-D (N, K/2) packed weight, got shape {tuple(w_packed.shape)}")
    rows = w_packed.shape[0]
    if w_global_scale.numel() != 1 and tuple(w_global_scale.shape) != (rows,):
        raise ValueError(f"fp4::linear's w_global_scale must have one element or one per weight row ({rows},), "
                         f"got shape {tuple(w_global_scale.shape)}")
    if w_global_scale.numel() != 1 and spec is not NVFP4:
        raise ValueError(f"per-row weight global scales apply to NVFP4 only; {fmt}'s global scale is one element")
    check_quantized(w_packed, w_scales, w_global_scale[:1] if w_global_scale.numel() > 1 else w_global_scale, spec)
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"fp4::linear takes {', '.join(map(str, SUPPORTED_DTYPES))} activations, got {x.dtype}")
    if x.dim() == 0:
        raise ValueError("fp4::linear needs an activation with at least one dimension, got a 0-dim tensor")
    n, k = w_packed.shape[0], w_packed.shape[1] * 2
    if x.shape[-1] != k:
        raise ValueError(f"activation of shape {tuple(x.shape)} has K={x.shape[-1]}, the weight has K={k}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
    if act_global_scale is not None and not (spec is NVFP4 and act_mode == "fp4"):
        raise ValueError(f"act_global_scale applies only to NVFP4 with act_mode='fp4', not {fmt} with {act_mode!r}")
    if act_global_scale is not None:
        check_global_scale(act_global_scale, x.device, "act_global_scale")
    check_e4m3_weight("w_e4m3", w_e4m3, w_e4m3_scale, (n, k), spec)
    tensors = {"x": x, "w_packed": w_packed, "w_scales": w_scales, "w_global_scale": w_global_scale,
               "act_global_scale": act_global_scale, "bias": bias, "w_e4m3": w_e4m3, "w_e4m3_scale": w_e4m3_scale}
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        raise ValueError(f"fp4::linear inputs are on different devices: {devices}")
