"""``Fp4Config``: the one description of how a model is quantized, shared by every pass and op."""

import dataclasses
import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .formats.linear import ACT_MODES, check_act_mode
from .formats.spec import FORMATS, SCALE_RULES, check_scale_rule, get_format
from .ops.chooser import AUTO, IMPLEMENTATIONS, check_implementation

DEFAULT_KEPT = ("lm_head", "*.lm_head", "*.gate", "*.router", "*.shared_expert_gate")
"""Layers kept in their dtype unless ``include`` names them: the LM head (the output embedding,
most sensitive to error and often tied to the input embedding) and MoE router gates."""


@dataclass(frozen=True)
class Fp4Config:
    """How fp4compile quantizes a model.

    Attributes:
        format: "nvfp4" (groups of 16, e4m3 scales, per-tensor fp32 scale; the more accurate) or
            "mxfp4" (groups of 32, power-of-two e8m0 scales; exact on fp8 tensor cores).
        act_mode: "none" quantizes weights only (W4A16: activations stay bf16/fp16/fp32), "fp4"
            also quantizes each activation inside the op (W4A4).
        scale_rule: how weight block scales are chosen, once at compile time: "optimal" searches
            nearby scales for the least squared error per block, "spec" uses the format's closed
            form. Activations always use "spec" (it runs in every forward).
        include: module-name patterns (``fnmatch``, e.g. ``"model.layers.*.mlp.*"``) of layers to
            quantize; empty means every eligible layer.
        exclude: module-name patterns of layers to keep in their original dtype; wins over include.
        release_weights: free each quantized weight's original storage after compilation (the
            memory saving). The uncompiled model must then not be called: its weights are gone.
        implementation: which implementation runs the fp4 ops: "auto" (the fastest capable one,
            timed per shape at the first call and cached on disk; the ``FP4COMPILE_BACKEND``
            environment variable can force one instead), or "triton", "cutlass", "torch" (the
            reference) for every layer, raising where it cannot run a call.
        fp8_weights: MXFP4 W4A4 on GPUs with fp8 tensor cores: also keep each weight in its exact
            e4m3 form (1 byte per value), made at compile time, so the fp8 prefill GEMMs skip the
            per-call conversion. Costs 0.5x of the bf16 weight bytes on top of the fp4 form
            (about 0.77x in all); ignored, with a logged reason, where it does not apply.
        fuse_projections: run quantized linear layers that read the same activation (q/k/v,
            gate/up) as one GEMM over their concatenated weights (``passes/fusion.py``): one
            launch instead of several small ones at decode, and W4A4 quantizes that activation
            once. Each layer keeps its own quantization (NVFP4: its own global scale), so outputs
            are those of the separate layers up to float32 summation order.
    """

    format: str = "nvfp4"
    act_mode: str = "none"
    scale_rule: str = "optimal"
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    release_weights: bool = True
    implementation: str = "auto"
    fp8_weights: bool = False
    fuse_projections: bool = True

    def __post_init__(self) -> None:
        for name in ("format", "act_mode", "scale_rule", "implementation"):
            _require_str(name, getattr(self, name))
        check_implementation(self.implementation, "Fp4Config.implementation")
        get_format(self.format)
        check_act_mode(self.act_mode)
        check_scale_rule(self.scale_rule)
        for name in ("include", "exclude"):
            object.__setattr__(self, name, _pattern_tuple(name, getattr(self, name)))
        for name in ("release_weights", "fp8_weights", "fuse_projections"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"Fp4Config.{name} must be True or False, got {getattr(self, name)!r}")

    def selects(self, module_name: str) -> tuple[bool, str]:
        """Whether the layer called ``module_name`` is to be quantized, and if not, why."""
        if matched := _first_match(module_name, self.exclude):
            return False, f"excluded by pattern {matched!r}"
        if self.include:
            if _first_match(module_name, self.include):
                return True, ""
            return False, "not matched by any include pattern"
        if matched := _first_match(module_name, DEFAULT_KEPT):
            return False, f"kept by default ({matched!r}: LM head or router); name it in include to quantize it"
        return True, ""

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None) -> "Fp4Config":
        """Build a config from ``torch.compile(..., options={...})``; unknown keys raise."""
        return cls().with_options(options)

    def with_options(self, options: Mapping[str, Any] | None) -> "Fp4Config":
        """This config with the fields named in ``options`` replaced; unknown keys raise."""
        options = dict(options or {})
        valid = [f.name for f in dataclasses.fields(self)]
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise ValueError(f"unknown fp4compile option(s) {unknown}; valid options are {valid}")
        return dataclasses.replace(self, **options)


def _first_match(name: str, patterns: tuple[str, ...]) -> str | None:
    return next((p for p in patterns if fnmatch.fnmatchcase(name, p)), None)


def _require_str(name: str, value: object) -> None:
    if not isinstance(value, str):
        choices = {"format": sorted(FORMATS), "act_mode": list(ACT_MODES), "scale_rule": list(SCALE_RULES),
                   "implementation": [AUTO, *IMPLEMENTATIONS]}
        raise TypeError(f"Fp4Config.{name} must be a string, one of {choices[name]}; got {value!r}")


def _pattern_tuple(name: str, patterns: object) -> tuple[str, ...]:
    if isinstance(patterns, str):
        raise TypeError(f"Fp4Config.{name} takes a list of patterns, got the string {patterns!r}; wrap it in a list")
    try:
        patterns = tuple(patterns)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"Fp4Config.{name} takes a list of module-name patterns, got {patterns!r}") from None
    bad = [p for p in patterns if not isinstance(p, str)]
    if bad:
        raise TypeError(f"Fp4Config.{name} patterns must be strings, got {bad!r}")
    return patterns
