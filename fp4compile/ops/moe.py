"""Custom op ``fp4::moe``: a SwiGLU mixture-of-experts block with fp4 expert weights.

From the routing decision (``topk_ids``, ``topk_weights``) to the combined output: dispatch,
gate/up projection, activation, down projection, weighted combine (``formats/moe.py``). One
functional op so a kernel can fuse the whole expert computation; the router stays in the graph.
On CUDA the Triton kernels of ``kernels/triton/moe.py`` or, on Hopper for MXFP4 W4A4, the CUTLASS
grouped fp8 GEMMs run it, whichever is faster (``ops/chooser.py``; no host sync either way:
CUDA-graph safe); elsewhere the reference.
"""

import torch

from ..formats import QuantizedTensor
from ..formats.blocks import SUPPORTED_DTYPES, check_quantized
from ..formats.linear import check_act_mode, mode_label
from ..formats.moe import check_activation, moe_reference
from ..formats.spec import get_format
from .chooser import bucket, check_implementation, run_chosen
from .implementations import (
    check_e4m3_weight, cutlass_kernels, cutlass_unsupported, triton_kernels, triton_unsupported,
)


@torch.library.custom_op("fp4::moe", mutates_args=())
def moe(
    hidden: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    gate_up_packed: torch.Tensor,
    gate_up_scales: torch.Tensor,
    gate_up_global_scale: torch.Tensor,
    down_packed: torch.Tensor,
    down_scales: torch.Tensor,
    down_global_scale: torch.Tensor,
    gate_up_bias: torch.Tensor | None,
    down_bias: torch.Tensor | None,
    fmt: str,
    act_mode: str,
    activation: str,
    alpha: float,
    limit: float,
    implementation: str = "auto",
    gate_up_e4m3: torch.Tensor | None = None,
    gate_up_e4m3_scale: torch.Tensor | None = None,
    down_e4m3: torch.Tensor | None = None,
    down_e4m3_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """hidden (T, H) routed to experts ``topk_ids`` (T, k) with weights ``topk_weights`` (T, k)
    -> (T, H) in hidden's dtype. gate_up: fp4 (E, 2I, H), gate rows then up rows; down: fp4
    (E, H, I); biases (E, 2I) and (E, H) or None. ``alpha``/``limit``: ``clamped_swiglu`` only.
    ``implementation``: "auto" (see ``ops/chooser.py``) or "torch", "triton", "cutlass".
    ``*_e4m3``/``*_e4m3_scale``: MXFP4 only, the expert weights' exact e4m3 forms (E, N, K) uint8
    and row scales (E, N), made at compile time for the fp8 GEMMs.
    """
    args = (hidden, topk_ids, topk_weights, gate_up_packed, gate_up_scales, gate_up_global_scale, down_packed,
            down_scales, down_global_scale, gate_up_bias, down_bias, fmt, act_mode, activation)
    e4m3 = (gate_up_e4m3, gate_up_e4m3_scale, down_e4m3, down_e4m3_scale)
    check_moe_args(*args, implementation, *e4m3)
    experts, two_inter, _ = gate_up_packed.shape
    tokens, size = hidden.shape
    gate_up_fp8 = (gate_up_e4m3, gate_up_e4m3_scale) if gate_up_e4m3 is not None else None
    down_fp8 = (down_e4m3, down_e4m3_scale) if down_e4m3 is not None else None
    options = {
        "torch": lambda: moe_reference(
            hidden, topk_ids, topk_weights,
            QuantizedTensor(gate_up_packed, gate_up_scales, gate_up_global_scale, fmt),
            QuantizedTensor(down_packed, down_scales, down_global_scale, fmt),
            gate_up_bias, down_bias, act_mode, activation, alpha, limit,
        ),
        "triton": triton_unsupported(hidden.device) or (lambda: triton_kernels().fp4_moe(*args, alpha, limit)),
        "cutlass": (cutlass_unsupported(hidden.device)
                    or cutlass_kernels().moe_unsupported(hidden, fmt, act_mode, size, two_inter // 2))
                   or (lambda: cutlass_kernels().moe(
                       hidden, topk_ids, topk_weights, (gate_up_packed, gate_up_scales, gate_up_global_scale),
                       (down_packed, down_scales, down_global_scale), gate_up_bias, down_bias, activation, alpha,
                       limit, gate_up_fp8, down_fp8)),
    }
    key = (f"{choice_prefix(fmt, act_mode, experts, size, two_inter // 2, topk_ids.shape[1])}{bucket(tokens)} "
           f"{hidden.dtype}{' e4m3-weights' if gate_up_fp8 else ''}")
    return run_chosen("fp4::moe", implementation, key, hidden.device, options)


def choice_prefix(fmt: str, act_mode: str, experts: int, hidden: int, inter: int, top_k: int) -> str:
    """The start of ``fp4::moe``'s choice keys for one expert block, up to the token bucket (the
    layer report finds the block's measured choices by it)."""
    return f"fp4::moe {fmt} {mode_label(act_mode)} E={experts} H={hidden} I={inter} k={top_k} T<="


@moe.register_fake
def _(hidden, topk_ids, topk_weights, gate_up_packed, gate_up_scales, gate_up_global_scale, down_packed, down_scales,
      down_global_scale, gate_up_bias, down_bias, fmt, act_mode, activation, alpha, limit, implementation="auto",
      gate_up_e4m3=None, gate_up_e4m3_scale=None, down_e4m3=None, down_e4m3_scale=None):
    check_moe_args(hidden, topk_ids, topk_weights, gate_up_packed, gate_up_scales, gate_up_global_scale,
                   down_packed, down_scales, down_global_scale, gate_up_bias, down_bias, fmt, act_mode, activation,
                   implementation, gate_up_e4m3, gate_up_e4m3_scale, down_e4m3, down_e4m3_scale)
    return torch.empty_like(hidden, memory_format=torch.contiguous_format)


def _setup_backward(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs[:11])  # absent biases are saved as None
    ctx.attributes = inputs[11:16]


def _backward(ctx, grad: torch.Tensor):
    """Gradients for the hidden states and the routing weights, by differentiating the reference
    (fp4 weights frozen, activation quantization straight-through): a compiled MoE model can
    still train what stays in high precision, and the router."""
    hidden, topk_ids, topk_weights, *weights, gate_up_bias, down_bias = ctx.saved_tensors
    fmt, act_mode, activation, alpha, limit = ctx.attributes
    with torch.enable_grad():
        hidden = hidden.detach().requires_grad_()
        topk_weights = topk_weights.detach().requires_grad_()
        out = moe_reference(hidden, topk_ids, topk_weights, QuantizedTensor(*weights[0:3], fmt),
                            QuantizedTensor(*weights[3:6], fmt), gate_up_bias, down_bias, act_mode, activation, alpha,
                            limit)
        grad_hidden, grad_weights = torch.autograd.grad(out, (hidden, topk_weights), grad)
    return (grad_hidden, None, grad_weights) + (None,) * 18


moe.register_autograd(_backward, setup_context=_setup_backward)


def check_moe_args(
    hidden: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    gate_up_packed: torch.Tensor,
    gate_up_scales: torch.Tensor,
    gate_up_global_scale: torch.Tensor,
    down_packed: torch.Tensor,
    down_scales: torch.Tensor,
    down_global_scale: torch.Tensor,
    gate_up_bias: torch.Tensor | None,
    down_bias: torch.Tensor | None,
    fmt: str,
    act_mode: str,
    activation: str,
    implementation: str = "auto",
    gate_up_e4m3: torch.Tensor | None = None,
    gate_up_e4m3_scale: torch.Tensor | None = None,
    down_e4m3: torch.Tensor | None = None,
    down_e4m3_scale: torch.Tensor | None = None,
) -> None:
    """Raise a clear error for anything ``fp4::moe`` cannot compute (shared by every backend)."""
    spec = get_format(fmt)
    check_act_mode(act_mode)
    check_implementation(implementation, "fp4::moe's implementation")
    check_activation(activation)
    check_quantized(gate_up_packed, gate_up_scales, gate_up_global_scale, spec)
    check_quantized(down_packed, down_scales, down_global_scale, spec)
    if hidden.dim() != 2 or hidden.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"fp4::moe needs float hidden states of shape (T, H), got {hidden.dtype} {tuple(hidden.shape)}")
    tokens, size = hidden.shape
    if topk_ids.dim() != 2 or topk_ids.shape[0] != tokens or topk_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"topk_ids must be int32/int64 of shape ({tokens}, k), got {topk_ids.dtype} {tuple(topk_ids.shape)}")
    if tuple(topk_weights.shape) != tuple(topk_ids.shape) or not topk_weights.is_floating_point():
        raise ValueError(f"topk_weights must be float of shape {tuple(topk_ids.shape)}, got "
                         f"{topk_weights.dtype} {tuple(topk_weights.shape)}")
    if gate_up_packed.dim() != 3 or down_packed.dim() != 3:
        raise ValueError(f"expert weights must be 3-D (E, N, K/2), got gate_up {tuple(gate_up_packed.shape)} "
                         f"and down {tuple(down_packed.shape)}")
    experts, two_i, half_h = gate_up_packed.shape
    if half_h * 2 != size or two_i % 2:
        raise ValueError(f"gate_up weight {tuple(gate_up_packed.shape)} (E, 2I, H/2) does not fit hidden size {size}")
    if tuple(down_packed.shape) != (experts, size, two_i // 4):
        raise ValueError(f"down weight {tuple(down_packed.shape)} must be (E, H, I/2) = {(experts, size, two_i // 4)}")
    for name, bias, expected in (("gate_up_bias", gate_up_bias, (experts, two_i)), ("down_bias", down_bias, (experts, size))):
        if bias is not None and tuple(bias.shape) != expected:
            raise ValueError(f"{name} must have shape {expected}, got {tuple(bias.shape)}")
    check_e4m3_weight("gate_up_e4m3", gate_up_e4m3, gate_up_e4m3_scale, (experts, two_i, size), spec)
    check_e4m3_weight("down_e4m3", down_e4m3, down_e4m3_scale, (experts, size, two_i // 2), spec)
    tensors = {"hidden": hidden, "topk_ids": topk_ids, "topk_weights": topk_weights, "gate_up_packed": gate_up_packed,
               "down_packed": down_packed, "gate_up_bias": gate_up_bias, "down_bias": down_bias,
               "gate_up_e4m3": gate_up_e4m3, "down_e4m3": down_e4m3}
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        raise ValueError(f"fp4::moe inputs are on different devices: {devices}")
