"""fp4 linear layers on Blackwell's fp4 tensor cores (compute capability 10.x, 12.x).

NOT RUN ON HARDWARE: no Blackwell GPU was available. Built to the documented call contracts of
the two libraries and tested on CPU against stand-ins that check every argument (shape, dtype,
layout, padding) and compute the product with the reference math (``tests/test_cutlass.py``).

- ``qutlass`` (when importable): ``matmul_mxf4_bf16_tn`` / ``matmul_nvf4_bf16_tn`` take the codes
  as uint8 (M, K/2) and (N, K/2), both K-major, the block scales in the swizzled 128x4-tile layout
  (``float8_e8m0fnu`` / ``float8_e4m3fn``), and ``alpha`` as a float32 device tensor of one
  element, and return ``alpha * a @ w.T`` in bf16. MXFP4 needs K % 128 == 0 (its CUTLASS
  alignment), NVFP4 K % 32; N % 8. Other K are padded with zero codes (see ``_padded_codes``).
- Else PyTorch's block-scaled ``torch._scaled_mm``: ``float4_e2m1fn_x2`` operands (the weight as a
  column-major (K/2, N) view), the same swizzled scales, bf16 output; it has no per-tensor scale
  for a bf16 output, so ``alpha`` multiplies the result. K % 32 (padded), N % 16. PyTorch runs MXFP4 only
  on 10.x (B200/B300), NVFP4 on 10.x and 12.x.

The activation is quantized by this project's Triton quantizer (``fp4_quantize``), not by
qutlass's fused quantizers: qutlass's rounding rules differ from the formats' (its MXFP4
``abs_max`` stores codes of ``3x / 2**floor(log2 amax)``, its ``quest`` uses the group's standard
deviation), and W4A4 here must equal the reference's quantization bit for bit. The identity
transform qutlass would need (``torch.eye``) is therefore not involved either.
"""

import functools
import importlib
import sys
from types import ModuleType

import torch

from ...formats.spec import MXFP4, get_format
from ...formats.swizzle import swizzle_scales
from ..triton.launch import cdiv
from ..triton.quantize import fp4_quantize

SCALE_DTYPES = {"mxfp4": torch.float8_e8m0fnu, "nvfp4": torch.float8_e4m3fn}


def qutlass_module() -> ModuleType | None:
    """qutlass if it is installed, else None. Every op call asks: ``sys.modules`` answers once it
    is imported (or a test put a stand-in there), and a failed import is tried once per process,
    not per call (it searches the module path each time)."""
    if "qutlass" in sys.modules:
        return sys.modules["qutlass"]
    return _import_qutlass()


@functools.cache
def _import_qutlass() -> ModuleType | None:
    try:
        return importlib.import_module("qutlass")
    except ImportError:
        return None


def _torch_has_fp4() -> bool:
    return hasattr(torch, "float4_e2m1fn_x2")


def unsupported(fmt: str, act_mode: str, op: str, device: torch.device | None = None) -> str | None:
    """Why neither library can compute ``op`` in this format and mode here, or None."""
    if op != "linear":
        return "no grouped fp4 GEMM is lowered on Blackwell yet (qutlass has none): the Triton kernels run"
    if act_mode != "fp4":
        return "Blackwell's fp4 tensor cores multiply fp4 activations (W4A4) only"
    if qutlass_module() is not None:
        return None
    if not _torch_has_fp4():
        return f"qutlass is not installed and torch {torch.__version__} has no float4_e2m1fn_x2"
    if get_format(fmt) is MXFP4 and device is not None and torch.cuda.get_device_capability(device)[0] != 10:
        return "qutlass is not installed and PyTorch runs MXFP4 block-scaled GEMMs on compute capability 10.x only"
    return None


def _k_multiple(fmt: str) -> int:
    """The K alignment of the library that ``linear`` calls."""
    return 128 if qutlass_module() is not None and get_format(fmt) is MXFP4 else 32


def shape_unsupported(x: torch.Tensor, fmt: str, n: int, k: int) -> str | None:
    """Why the library that ``linear`` would call cannot take these sizes and activations, or None
    (K is padded to the library's alignment; N is not, which would pad the output too)."""
    if x.numel() == 0 or n == 0:
        return "empty input or output"
    if x.dtype != torch.bfloat16:
        return f"the fp4 GEMMs write bf16, the activations are {x.dtype}"
    n_multiple = 8 if qutlass_module() is not None else 16
    if n % n_multiple:
        return f"needs N % {n_multiple} == 0, got N={n}"
    return None


def _padded_codes(packed: torch.Tensor, k: int, k_multiple: int) -> torch.Tensor:
    """Codes (rows, K/2) with zero bytes appended up to K a multiple of ``k_multiple``. Zero codes
    are +0, so the padded columns add nothing whatever their scales. No scales are added here:
    ``swizzle_scales`` already pads the scale columns to whole tiles of 4 groups (zero bytes,
    finite in e8m0 and e4m3), which covers every padded group of either format."""
    padded_k = cdiv(k, k_multiple) * k_multiple
    if padded_k == k:
        return packed.contiguous()
    return torch.nn.functional.pad(packed, (0, (padded_k - k) // 2)).contiguous()


def linear(
    x: torch.Tensor,
    w_packed: torch.Tensor,
    w_scales: torch.Tensor,
    w_global_scale: torch.Tensor,
    act_global_scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    fmt: str,
) -> torch.Tensor:
    """W4A4 ``fp4::linear`` (x (..., K) bf16) on fp4 tensor cores."""
    *lead, k = x.shape
    a_packed, a_scales, a_global_scale = fp4_quantize(x.reshape(-1, k).contiguous(), fmt, act_global_scale)
    alpha = (a_global_scale.float() * w_global_scale.float()).reshape(1)
    scale_dtype = SCALE_DTYPES[get_format(fmt).name]
    a_sf = swizzle_scales(a_scales).view(scale_dtype)
    w_sf = swizzle_scales(w_scales.contiguous()).view(scale_dtype)
    n = w_packed.shape[0]
    # Unaligned K costs a padded copy of the weight per call (not measured: no Blackwell here).
    a_packed, w_packed = (_padded_codes(codes, k, _k_multiple(fmt)) for codes in (a_packed, w_packed))
    qutlass = qutlass_module()
    if qutlass is not None:
        matmul = qutlass.matmul_mxf4_bf16_tn if get_format(fmt) is MXFP4 else qutlass.matmul_nvf4_bf16_tn
        out = matmul(a_packed, w_packed, a_sf, w_sf, alpha)
    else:
        fp4 = torch.float4_e2m1fn_x2
        out = torch._scaled_mm(a_packed.view(fp4), w_packed.view(fp4).t(), a_sf, w_sf, out_dtype=torch.bfloat16)
        out = out.mul_(alpha)
    if bias is not None:
        out = out.add_(bias)
    return out.reshape(*lead, n)
