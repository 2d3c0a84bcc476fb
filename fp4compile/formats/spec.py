"""What distinguishes the two fp4 formats, in one place.

Both store e2m1 elements in groups along the last dimension with one scale per group:

========  ==========  =================  ==========================================
format    group size  block scale        per-tensor global scale
========  ==========  =================  ==========================================
MXFP4     32          e8m0 (power of 2)  none (always 1.0)
NVFP4     16          e4m3               fp32, ``amax / (6 * 448)`` by default
========  ==========  =================  ==========================================

The one convention for both: ``value = e2m1 * block_scale * global_scale`` (multiply in decode),
so a GEMM of two quantized operands is ``alpha * sum(e2m1_a * bs_a * e2m1_w * bs_w)`` with
``alpha = global_scale_a * global_scale_w``.
"""

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Fp4Format:
    """A block-scaled fp4 format: its name, group size and block-scale type.

    Scales are stored as raw uint8 bytes holding ``scale_dtype`` bit patterns (like the packed
    e2m1 data, which is uint8 rather than ``float4_e2m1fn_x2``): every torch op and kernel handles
    uint8, while float8 dtypes lack many ops (even ``allclose``) on some devices and releases.
    """

    name: str
    group_size: int
    scale_dtype: torch.dtype

    def decode_scales(self, scales: torch.Tensor) -> torch.Tensor:
        """uint8 scale bytes -> float32 scale values (NaN for the NaN encodings)."""
        return scales.view(self.scale_dtype).float()

    def check_k(self, k: int) -> None:
        """Raise unless ``k`` (the last dimension) splits into whole groups."""
        if k % self.group_size:
            raise ValueError(
                f"K={k} is not a multiple of the {self.name.upper()} group size {self.group_size}"
            )


MXFP4 = Fp4Format("mxfp4", group_size=32, scale_dtype=torch.float8_e8m0fnu)
NVFP4 = Fp4Format("nvfp4", group_size=16, scale_dtype=torch.float8_e4m3fn)
FORMATS: dict[str, Fp4Format] = {f.name: f for f in (MXFP4, NVFP4)}

SCALE_RULES = ("spec", "optimal")
"""How block scales are chosen: ``spec`` is the closed-form rule of each format; ``optimal``
searches nearby scales for the least squared error per block (slower; meant for weights)."""


def get_format(fmt: str) -> Fp4Format:
    """Look up a format by name ("mxfp4" or "nvfp4"), with a clear error for anything else."""
    try:
        return FORMATS[fmt]
    except (KeyError, TypeError):
        raise ValueError(f"unknown fp4 format {fmt!r}; expected one of {sorted(FORMATS)}") from None


def check_scale_rule(scale_rule: str) -> None:
    """Raise unless ``scale_rule`` is one of ``SCALE_RULES``."""
    if scale_rule not in SCALE_RULES:
        raise ValueError(f"unknown scale rule {scale_rule!r}; expected one of {list(SCALE_RULES)}")
