"""The layer report: what fp4compile did to each layer of a model, and why it skipped others."""

import logging
from dataclasses import dataclass

import torch
from torch.utils.weak import WeakIdKeyDictionary
from torch import nn

from .ops import chooser

logger = logging.getLogger("fp4compile")


@dataclass(frozen=True)
class LayerRecord:
    """One layer as the passes left it: quantized (``skipped`` is None) or kept, with the reason."""

    name: str
    shape: tuple[int, ...]
    bytes_before: int
    bytes_after: int
    fmt: str = ""
    act_mode: str = ""
    implementation: str = ""
    skipped: str | None = None
    fused_with: tuple[str, ...] = ()
    """The other layers this one runs in one GEMM with (``Fp4Config.fuse_projections``)."""
    choice_prefix: str = ""
    """Where the chooser picks per shape: the start of the op's choice keys for this layer (its
    GEMM's, when fused), by which the report finds what the calls so far ran."""


_RECORDS: WeakIdKeyDictionary = WeakIdKeyDictionary()  # by identity: tensor == compares values


def record_of(weight: torch.Tensor) -> LayerRecord | None:
    """The record of the layer owning ``weight``, if any."""
    return _RECORDS.get(weight)


def record_layer(weight: torch.Tensor, record: LayerRecord) -> None:
    """Remember what happened to the layer owning ``weight`` (the latest compile wins)."""
    _RECORDS[weight] = record


def records_of(tensors: object) -> list[LayerRecord]:
    """Records of the layers whose weights are among ``tensors`` (e.g. a graph's inputs)."""
    return [_RECORDS[t] for t in tensors if isinstance(t, torch.Tensor) and t in _RECORDS]


def layer_records(model: nn.Module) -> list[LayerRecord]:
    """Records of ``model``'s layers (the compiled wrapper or the original module), in module order."""
    model = getattr(model, "_orig_mod", model)
    seen: set[int] = set()
    records = []
    for param in model.parameters():
        if id(param) not in seen and param in _RECORDS:
            seen.add(id(param))
            records.append(_RECORDS[param])
    return records


def report(model: nn.Module) -> str:
    """A table of ``model``'s layers: name, shape, format, mode, implementation, bytes before and
    after, or the reason a layer was kept; then totals. Run the compiled model once first:
    compilation happens at the first call."""
    records = layer_records(model)
    if not records:
        return "fp4compile: no linear layers were found in the compiled graphs (has the model run once?)"
    implementations = {id(r): _implementation_cell(r) for r in records}
    width = max([len("implementation")] + list(map(len, implementations.values())))
    lines = [f"{'layer':<44} {'shape':>12} {'format':>6} {'mode':>5} {'implementation':>{width}} {'bytes':>22}"]
    for r in records:
        shape = "x".join(map(str, r.shape))
        if r.skipped is None:
            size = f"{r.bytes_before:,} -> {r.bytes_after:,}"
            fused = f"  one GEMM with {', '.join(r.fused_with)}" if r.fused_with else ""
            lines.append(f"{r.name:<44} {shape:>12} {r.fmt:>6} {r.act_mode:>5} {implementations[id(r)]:>{width}} "
                         f"{size:>22}{fused}")
        else:
            lines.append(f"{r.name:<44} {shape:>12}  kept: {r.skipped}")
    lines.append(summary(records))
    return "\n".join(lines)


def _implementation_cell(record: LayerRecord) -> str:
    """The record's implementation; where the chooser picks per shape and calls have run, what it
    picked for each size bucket instead (e.g. ``auto chose triton at M<=16, cutlass at M<=4096``)."""
    if not record.choice_prefix:
        return record.implementation
    used = chooser.used_choices(record.choice_prefix)
    if not used:
        return record.implementation
    label = record.choice_prefix.rsplit(" ", 1)[-1]  # "M<=" or "T<="
    picks = dict.fromkeys(f"{name} at {label}{rest.split(' ', 1)[0]}" for rest, name in used.items())
    return "auto chose " + ", ".join(picks)


def summary(records: list[LayerRecord]) -> str:
    """One line of totals over ``records``."""
    done = [r for r in records if r.skipped is None]
    before, after = sum(r.bytes_before for r in done), sum(r.bytes_after for r in done)
    ratio = f" ({after / before:.3f}x)" if before else ""
    return (
        f"fp4compile: {len(done)} layer(s) quantized, {before / 2**20:.2f} MiB -> {after / 2**20:.2f} MiB"
        f"{ratio}; {len(records) - len(done)} kept in their original dtype"
    )
