"""Quantized weights, made once per parameter and shared by every graph that uses it.

Keyed by the ``nn.Parameter`` object itself (weakly), so recompiles (new shapes, graph breaks, a
second ``torch.compile`` of the same model) find the quantized form instead of quantizing again.
Once quantized, the parameter's original storage is released unless the config says otherwise
(its tensor metadata stays, which is what Dynamo's guards look at), so the bf16 copy no longer
takes memory. The uncompiled module must not be called after that: its weights are gone.
"""

import dataclasses
import weakref
from dataclasses import dataclass

import torch
from torch.utils.weak import WeakIdKeyDictionary

from .formats import QuantizedTensor, quantize


@dataclass(frozen=True)
class StoredWeight:
    """A parameter's quantized form and what it was quantized with."""

    quantized: QuantizedTensor
    scale_rule: str
    transposed: bool
    original_bytes: int
    deinterleaved: bool = False

    @property
    def quantized_bytes(self) -> int:
        q = self.quantized
        return nbytes(q.packed, q.scales, q.global_scale)


def nbytes(*tensors: torch.Tensor | None) -> int:
    """Bytes held by ``tensors`` (absent ones count 0), as the layer report counts them."""
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


_STORE: WeakIdKeyDictionary = WeakIdKeyDictionary()  # by identity: tensor == compares values


def lookup(weight: torch.Tensor) -> StoredWeight | None:
    """The stored quantized form of ``weight``, if it has one."""
    return _STORE.get(weight)


def quantize_once(
    weight: torch.Tensor, fmt: str, scale_rule: str, release: bool, transposed: bool = False,
    deinterleave: bool = False,
) -> StoredWeight:
    """Quantize ``weight`` (..., N, K) on its device, or return the form made earlier.

    ``release``: free the original storage after quantizing. ``transposed``: the parameter is
    stored as (..., K, N) (e.g. GPT-2's Conv1D, gpt-oss's experts) and its transpose is quantized.
    ``deinterleave``: the N rows alternate between two projections (gpt-oss's gate and up); the
    even rows are quantized first, then the odd ones (rows are quantized independently, so this
    reorders the result and changes no value).

    A weight already quantized with another format, rule or layout is quantized again while its
    values are still there (``release=False``), and raises once they are gone.
    """
    stored = _STORE.get(weight)
    wanted = (fmt, scale_rule, transposed, deinterleave)
    if stored is not None and (stored.quantized.fmt, stored.scale_rule, stored.transposed, stored.deinterleaved) == wanted:
        return stored
    if stored is not None and is_released(weight):
        raise ValueError(
            f"this weight was already quantized as {_describe(stored.quantized.fmt, stored.scale_rule, stored.transposed)} "
            f"by an earlier fp4compile compile and its original values were released; cannot quantize it again as "
            f"{_describe(fmt, scale_rule, transposed)}. Rebuild the model, or compile with release_weights=False."
        )
    with torch.no_grad():
        matrix = weight.detach().transpose(-2, -1) if transposed else weight.detach()
        if deinterleave:
            matrix = torch.cat((matrix[..., 0::2, :], matrix[..., 1::2, :]), dim=-2)
        q = quantize(matrix, fmt, scale_rule=scale_rule)
    stored = StoredWeight(q, scale_rule, transposed, weight.numel() * weight.element_size(), deinterleave)
    _STORE[weight] = stored
    if release and owns_its_storage(weight):
        release_storage(weight)
    return stored


def owns_its_storage(weight: torch.Tensor) -> bool:
    """Whether ``weight`` is all of its storage: a view into a shared buffer (a fused checkpoint
    split into views, a flat-parameter loader) must not free the other views' values."""
    return weight.storage_offset() == 0 and weight.untyped_storage().nbytes() == weight.numel() * weight.element_size()


def _describe(fmt: str, scale_rule: str, transposed: bool) -> str:
    return f"{fmt}/{scale_rule}" + (" (transposed)" if transposed else "")


def release_storage(weight: torch.Tensor) -> None:
    """Free ``weight``'s memory, keeping its shape, dtype and device (what guards check)."""
    weight.untyped_storage().resize_(0)


def is_released(weight: torch.Tensor) -> bool:
    """Whether ``weight``'s storage was released by ``quantize_once``."""
    return weight in _STORE and weight.untyped_storage().nbytes() == 0


_E4M3: WeakIdKeyDictionary = WeakIdKeyDictionary()


def e4m3_once(weight: torch.Tensor, stored: StoredWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact e4m3 form of ``weight``'s MXFP4 form (bytes (..., N, K), row scales (..., N)):
    the operand of the fp8 prefill GEMMs, made once per quantized form (``Fp4Config.fp8_weights``)."""
    made = _E4M3.get(weight)
    if made is None or made[0] is not stored.quantized:
        from .kernels.cutlass.hopper import weight_to_e4m3

        made = (stored.quantized, weight_to_e4m3(stored.quantized.packed, stored.quantized.scales))
        _E4M3[weight] = made
    return made[1]


@dataclass(frozen=True)
class FusedWeight:
    """The stored quantized forms of layers that read the same activation, concatenated along N:
    the weight of the one GEMM that runs them all (``passes/fusion.py``). ``quantized.global_scale``
    is one element when every member's is the same (always for MXFP4), else one per row (N,)."""

    quantized: QuantizedTensor
    out_features: tuple[int, ...]


@dataclass(frozen=True)
class _Fusion:
    members: tuple[weakref.ref, ...]
    fused: FusedWeight
    views: tuple[QuantizedTensor, ...]

    def is_current(self) -> bool:
        """Whether every member still stores the view made by this fusion (not a later requantization)."""
        members = [ref() for ref in self.members]
        return all(w is not None and w in _STORE and _STORE[w].quantized is view
                   for w, view in zip(members, self.views))


_FUSED: WeakIdKeyDictionary = WeakIdKeyDictionary()


def fuse_once(weights: list[torch.Tensor]) -> FusedWeight | None:
    """The concatenation of ``weights``' stored quantized forms (in this order), made once.

    Each member's stored form then becomes a view into it, so the separate copies can be freed
    and recompiles find both. None when a member already belongs to a different fusion (a
    weight is in at most one, or its rows would be stored twice) or the members cannot be
    concatenated (different formats, K or devices)."""
    earlier = [f for w in weights if (f := _FUSED.get(w)) is not None and f.is_current()]
    if earlier:
        fusion = earlier[0]
        same = len(fusion.members) == len(weights) and all(ref() is w for ref, w in zip(fusion.members, weights))
        return fusion.fused if same else None
    stored = [_STORE[w].quantized for w in weights]
    first = stored[0]
    if any((q.fmt, q.packed.shape[1:], q.packed.device) != (first.fmt, first.packed.shape[1:], first.packed.device)
           or q.packed.dim() != 2 for q in stored):
        return None
    with torch.no_grad():
        packed = torch.cat([q.packed for q in stored])
        scales = torch.cat([q.scales for q in stored])
        if all(torch.equal(q.global_scale, first.global_scale) for q in stored[1:]):
            global_scale = first.global_scale
        else:
            global_scale = torch.cat([q.global_scale.reshape(1).expand(q.packed.shape[0]) for q in stored])
    fused = FusedWeight(QuantizedTensor(packed, scales, global_scale, first.fmt),
                        tuple(q.packed.shape[0] for q in stored))
    views, start = [], 0
    for w, q, rows in zip(weights, stored, fused.out_features):
        views.append(QuantizedTensor(packed[start:start + rows], scales[start:start + rows], q.global_scale, q.fmt))
        _STORE[w] = dataclasses.replace(_STORE[w], quantized=views[-1])
        start += rows
    record = _Fusion(tuple(weakref.ref(w) for w in weights), fused, tuple(views))
    for w in weights:
        _FUSED[w] = record
    return fused
