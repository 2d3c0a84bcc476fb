"""What the passes know about a quantized weight beyond its fp4 form: its optional e4m3 form
(``Fp4Config.fp8_weights``)."""

import torch

from .. import quantized_weights
from ..config import Fp4Config
from ..ops.implementations import fp8_weights_unsupported
from ..report import logger


def fp8_weights_for(weight: torch.Tensor, stored: quantized_weights.StoredWeight, name: str,
                    config: Fp4Config) -> tuple[torch.Tensor, torch.Tensor] | tuple[None, None]:
    """The weight's e4m3 form when ``config.fp8_weights`` asks for it and it applies (else
    (None, None), with the reason logged)."""
    if not config.fp8_weights:
        return None, None
    reason = fp8_weights_unsupported(weight.device, config.format, config.act_mode)
    if reason is not None:
        logger.info("fp4compile: fp8_weights ignored for %s: %s", name, reason)
        return None, None
    return quantized_weights.e4m3_once(weight, stored)
