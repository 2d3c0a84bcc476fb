"""MXFP4 (OCP Microscaling v1.0): groups of 32 e2m1 values sharing one e8m0 (power-of-two) scale.

Scale rules (exponent ``e`` of the block scale ``2**e``):

- ``spec``: the OCP rule ``e0 = floor(log2(amax)) - 2`` (2 is e2m1's largest exponent), clamped to
  e8m0's [-127, 127]. Cheap, but a block whose amax lies in (6, 8) * 2**e0 saturates.
- ``optimal``: the least squared error over every e8m0 scale. It is always one of ``e0 - 1``,
  ``e0``, ``e0 + 1``, so those three are tried (ties keep ``e0``, then ``e0 + 1``). Why three:

  * ``e0 + 2`` and above never beat ``e0 + 1``: all values are below ``8 * 2**e0``, and on
    [0, 8 * 2**e0] the grid of ``e0 + 2`` ({0, 2, 4, 6, 8} * 2**e0) is a subset of the grid of
    ``e0 + 1``, so no element gets closer.
  * ``e0 - k`` for ``k >= 2`` never beats ``e0``: the largest element (>= 4 * 2**e0) saturates
    at ``6 * 2**(e0 - k) <= 1.5 * 2**e0``, costing at least 6.25 * 4**e0 more than at ``e0``,
    while each of the other 31 elements gains at most 0.0625 * 4**e0 (1.94 in all).
  * ``e0 - 1`` can win: one element at 4 and 31 at 0.3 (times 2**e0) have squared error 1.24 at
    ``e0`` and 1.08 at ``e0 - 1``. So trying only ``e0`` and ``e0 + 1`` is *not* optimal.
"""

import torch

from .blocks import (
    QuantizedTensor,
    encode_blocks,
    has_non_finite,
    pack_blocks,
    pick_least_error,
    split_into_blocks,
)
from .scale_codecs import E8M0_MAX_EXPONENT, E8M0_MIN_EXPONENT, e8m0_exponent, encode_e8m0
from .spec import MXFP4, check_scale_rule

_E2M1_MAX_EXPONENT = 2  # floor(log2(6)), the exponent of e2m1's largest value


def spec_exponent(amax: torch.Tensor) -> torch.Tensor:
    """OCP scale exponent ``floor(log2(amax)) - 2`` per block, int32, clamped to e8m0's range.

    ``frexp`` gives ``amax = m * 2**p`` with m in [0.5, 1), so ``floor(log2(amax)) = p - 1``
    exactly (subnormals included); an all-zero block gets the smallest scale.
    """
    _, p = torch.frexp(amax)
    exponent = torch.where(amax > 0, p.to(torch.int32) - 1 - _E2M1_MAX_EXPONENT, E8M0_MIN_EXPONENT)
    return exponent.clamp(E8M0_MIN_EXPONENT, E8M0_MAX_EXPONENT)


def _power_of_two(exponent: torch.Tensor) -> torch.Tensor:
    return torch.ldexp(torch.ones_like(exponent, dtype=torch.float32), exponent)


def optimal_exponent(blocks: torch.Tensor, spec: torch.Tensor) -> torch.Tensor:
    """The e8m0 exponent with the least squared error per block (see the module docstring)."""
    candidates = [
        spec,
        (spec + 1).clamp(max=E8M0_MAX_EXPONENT),
        (spec - 1).clamp(min=E8M0_MIN_EXPONENT),
    ]
    best = pick_least_error(blocks, [_power_of_two(c) for c in candidates])
    return torch.stack(candidates).gather(0, best.unsqueeze(0)).squeeze(0)


def quantize_mxfp4(x: torch.Tensor, scale_rule: str = "spec") -> QuantizedTensor:
    """Quantize ``x`` (..., K) to MXFP4, K a multiple of 32.

    Returns packed codes (..., K // 2), e8m0 scales (..., K // 32) and a global scale of 1.0.
    """
    check_scale_rule(scale_rule)
    blocks = split_into_blocks(x, MXFP4)
    exponent = spec_exponent(blocks.abs().amax(dim=-1))
    if scale_rule == "optimal":
        exponent = optimal_exponent(blocks, exponent)
    scales = encode_e8m0(exponent, is_nan=has_non_finite(blocks))
    codes = encode_blocks(blocks, _power_of_two(e8m0_exponent(scales)))
    global_scale = torch.ones((), dtype=torch.float32, device=x.device)
    return QuantizedTensor(pack_blocks(codes), scales, global_scale, MXFP4.name)
