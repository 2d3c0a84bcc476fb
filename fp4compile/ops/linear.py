"""Custom op ``fp4::linear``: ``y = x @ w.T + bias`` with an fp4 weight in its canonical form.

One op for W4A4 (``act_mode="fp4"``: the activation is quantized inside the op, so a kernel can
fuse it into the GEMM) and W4A16 (``act_mode="none"``). The global scales enter only as
``alpha = gs_activation * gs_weight``, a device tensor, so a forward never syncs with the host.
"""

import torch

from ..formats import QuantizedTensor
from ..formats.blocks import SUPPORTED_DTYPES, check_quantized, dequantize
from ..formats.linear import check_act_mode, linear_reference
from ..formats.spec import NVFP4, get_format
from .implementations import TRITON_AVAILABLE


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
) -> torch.Tensor:
    """x (..., K) times an fp4 weight (N, K) [+ bias (N,)] -> (..., N) in x's dtype.

    ``act_global_scale``: only for NVFP4 W4A4, a static activation global scale (None: computed
    from x on the device in every call).
    """
    check_linear_args(x, w_packed, w_scales, w_global_scale, act_global_scale, bias, fmt, act_mode)
    weight = QuantizedTensor(w_packed, w_scales, w_global_scale, fmt)
    return linear_reference(x, weight, act_global_scale, bias, act_mode)


if TRITON_AVAILABLE:
    from ..kernels.triton import fp4_linear

    @linear.register_kernel("cuda")
    def _(x, w_packed, w_scales, w_global_scale, act_global_scale, bias, fmt, act_mode):
        check_linear_args(x, w_packed, w_scales, w_global_scale, act_global_scale, bias, fmt, act_mode)
        return fp4_linear(x, w_packed, w_scales, w_global_scale, act_global_scale, bias, fmt, act_mode)


@linear.register_fake
def _(x, w_packed, w_scales, w_global_scale, act_global_scale, bias, fmt, act_mode):
    check_linear_args(x, w_packed, w_scales, w_global_scale, act_global_scale, bias, fmt, act_mode)
    return x.new_empty((*x.shape[:-1], w_packed.shape[0]))


def _setup_backward(ctx, inputs, output) -> None:
    x, w_packed, w_scales, w_global_scale, _, bias, fmt, _ = inputs
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
        weight = dequantize(QuantizedTensor(w_packed, w_scales, w_global_scale, ctx.fmt))
        grad_x = (grad.float() @ weight).to(grad.dtype)
    if ctx.has_bias and ctx.needs_input_grad[5]:
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
    return grad_x, None, None, None, None, grad_bias, None, None


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
) -> None:
    """Raise a clear error for anything ``fp4::linear`` cannot compute (shared by every backend)."""
    spec = get_format(fmt)
    check_act_mode(act_mode)
    check_quantized(w_packed, w_scales, w_global_scale, spec)
    if w_packed.dim() != 2:
        raise ValueError(f"fp4::linear needs a 2-D (N, K/2) packed weight, got shape {tuple(w_packed.shape)}")
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
    tensors = {"x": x, "w_packed": w_packed, "w_scales": w_scales, "w_global_scale": w_global_scale,
               "act_global_scale": act_global_scale, "bias": bias}
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        raise ValueError(f"fp4::linear inputs are on different devices: {devices}")
