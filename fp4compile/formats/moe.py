"""Reference SwiGLU mixture of experts with fp4 expert weights: the oracle for the MoE kernels.

The computation ``fp4::moe`` stands for, from the routing decision on: every token goes to its
``k`` chosen experts, each expert computes ``down(act(gate_up(x)))``, and the token's output is
the routing-weighted sum. The router itself (logits, softmax or sigmoid, top-k, renormalization)
stays in the model's graph: it is small, model-specific, and every fused-MoE kernel starts from
the same two tensors it produces, ``topk_ids`` and ``topk_weights``.

Numerics follow the linear reference: each projection multiplies ``e2m1 * block_scale`` values
with float32 accumulation and then applies its global scale; the bias, the activation and the
weighted sum are float32; the result is cast to the hidden states' dtype once, at the end. W4A4
quantizes the hidden states and the intermediate activations (each as one tensor, so NVFP4 gets
one global scale per tensor) before their projection.
"""

import torch
import torch.nn.functional as F

from .blocks import QuantizedTensor, dequantize
from .mxfp4 import quantize_mxfp4
from .nvfp4 import quantize_nvfp4
from .spec import MXFP4, get_format

ACTIVATIONS = ("silu", "clamped_swiglu")
"""``silu``: ``silu(gate) * up`` (Qwen, Mixtral, DeepSeek). ``clamped_swiglu``: gpt-oss's
``(clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g)`` with ``g = clamp(gate, max=limit)``.
In both, the gate/up projection's output rows are the gate rows followed by the up rows (an
interleaved checkpoint is reordered once, when its weight is quantized)."""


def check_activation(activation: str) -> None:
    """Raise unless ``activation`` is one of ``ACTIVATIONS``."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown MoE activation {activation!r}; expected one of {list(ACTIVATIONS)}")


def swiglu(gate_up: torch.Tensor, activation: str, alpha: float, limit: float) -> torch.Tensor:
    """(..., 2I) gate/up projection output ([gate | up] halves) -> (..., I)."""
    gate, up = gate_up.chunk(2, dim=-1)
    if activation == "silu":
        return F.silu(gate) * up
    gate = gate.clamp(max=limit)
    return (up.clamp(-limit, limit) + 1) * (gate * torch.sigmoid(gate * alpha))


def fake_quantize(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """float32 values of ``x`` quantized to ``fmt`` as one tensor (W4A4 activations), global
    scale included, with a straight-through gradient (the rounding counts as the identity)."""
    q = quantize_mxfp4(x.detach()) if get_format(fmt) is MXFP4 else quantize_nvfp4(x.detach())
    return x + (dequantize(q) - x).detach()


def _expert_matrix(weight: QuantizedTensor, expert: int) -> torch.Tensor:
    """float32 ``e2m1 * block_scale * global_scale`` of one expert's (N, K) matrix."""
    return dequantize(weight._replace(packed=weight.packed[expert], scales=weight.scales[expert]))


def moe_reference(
    hidden: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    gate_up: QuantizedTensor,
    down: QuantizedTensor,
    gate_up_bias: torch.Tensor | None,
    down_bias: torch.Tensor | None,
    act_mode: str,
    activation: str,
    alpha: float,
    limit: float,
    projection_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """hidden (T, H); topk_ids (T, k) expert indices; topk_weights (T, k); gate_up (E, 2I, H) and
    down (E, H, I) fp4 weights; biases (E, 2I) / (E, H) or None -> (T, H) in hidden's dtype.

    ``projection_dtype``: what the gate/up product (before its bias) is rounded to. float32 is
    the op's definition; bf16 describes a lowering whose library GEMM writes bf16 (the CUTLASS
    grouped fp8 GEMM), which in W4A4 then re-quantizes slightly different values.

    Differentiable in ``hidden`` and ``topk_weights`` (the op's backward recomputes through it).
    Validation is the caller's (the op's) job.
    """
    tokens, k = topk_ids.shape
    slot_expert = topk_ids.reshape(-1)
    slot_token = torch.arange(tokens * k, device=hidden.device) // k
    x = fake_quantize(hidden, gate_up.fmt) if act_mode == "fp4" else hidden.float()
    experts = [(e, (slot_expert == e).nonzero().squeeze(1)) for e in range(gate_up.packed.shape[0])]
    experts = [(e, slots) for e, slots in experts if slots.numel()]
    intermediate = x.new_zeros((tokens * k, down.packed.shape[-1] * 2))
    for e, slots in experts:
        projected = (x[slot_token[slots]] @ _expert_matrix(gate_up, e).T).to(projection_dtype).float()
        if gate_up_bias is not None:
            projected = projected + gate_up_bias[e].float()
        intermediate = intermediate.index_copy(0, slots, swiglu(projected, activation, alpha, limit))
    if act_mode == "fp4":
        intermediate = fake_quantize(intermediate, down.fmt)
    out = x.new_zeros((tokens * k, hidden.shape[1]))
    for e, slots in experts:
        projected = intermediate[slots] @ _expert_matrix(down, e).T
        if down_bias is not None:
            projected = projected + down_bias[e].float()
        out = out.index_copy(0, slots, projected)
    combined = (out.view(tokens, k, -1) * topk_weights.float().unsqueeze(-1)).sum(dim=1)
    return combined.to(hidden.dtype)
