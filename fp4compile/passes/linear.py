"""The linear pass: a linear layer on a module weight -> ``fp4::linear`` on the weight's fp4 form."""

from dataclasses import dataclass

import torch

from .. import quantized_weights
from ..config import Fp4Config
from ..formats import get_format
from ..formats.blocks import SUPPORTED_DTYPES
from ..ops.chooser import AUTO
from ..ops.implementations import implementation_for
from ..ops.linear import choice_prefix as linear_choice_prefix
from ..quantized_weights import nbytes
from ..report import LayerRecord, record_layer
from .graph import DynamoGraph
from .linear_match import LinearSite, match_linear, only_used_as_weight
from .manager import PassResult
from .weights import fp8_weights_for


LAYER_META = "fp4compile_layer"
"""``node.meta`` key under which ``LinearPass`` leaves a ``QuantizedLayer`` on each node it makes
(read by ``ProjectionFusionPass``)."""


@dataclass(frozen=True)
class QuantizedLayer:
    """The quantized layer behind an ``fp4::linear`` node: its parameter and module name."""

    weight: torch.Tensor
    name: str


class LinearPass:
    """Replaces every eligible linear layer (see ``linear_match``) with ``torch.ops.fp4.linear``.

    Eligible: the weight is a 2-D floating parameter (a module attribute) selected by the config,
    with in_features a multiple of the format's group size, and used only as a linear weight in
    the graph (a weight also read elsewhere, e.g. tied to an embedding, is kept).
    """

    name = "linear"

    def __call__(self, graph: DynamoGraph, config: Fp4Config) -> PassResult:
        result = PassResult(self.name)
        for node in list(graph.gm.graph.nodes):
            site = match_linear(node)
            if isinstance(site, str):
                result.skip(site)
            elif site is not None:
                self._rewrite(graph, config, site, result)
        return result

    def _rewrite(self, graph: DynamoGraph, config: Fp4Config, site: LinearSite, result: PassResult) -> None:
        found = graph.parameter_of(site.weight)
        if found is None:
            result.skip("weight is not a module parameter")
            return
        weight, path = found
        name = path.removesuffix(".weight")
        shape = tuple(weight.shape[::-1] if site.transposed else weight.shape)
        reason = _ineligible(weight, shape, site, name, config)
        if reason is not None and quantized_weights.is_released(weight):
            raise RuntimeError(
                f"fp4compile: {name} is now kept in its original dtype ({reason}), but an earlier compile "
                f"quantized it and released its original values. Rebuild the model, or compile with "
                f"release_weights=False to change which layers are quantized."
            )
        if reason is not None:
            result.skip(reason)
            record_layer(weight, LayerRecord(name, shape, nbytes(weight), nbytes(weight), skipped=reason))
            return
        stored = quantized_weights.quantize_once(
            weight, config.format, config.scale_rule, config.release_weights, site.transposed
        )
        graph.pin(site.weight)
        q = stored.quantized
        e4m3 = fp8_weights_for(weight, stored, name, config)
        fx_graph = graph.gm.graph
        with fx_graph.inserting_before(site.node):
            weights = graph.quantized_nodes(f"fp4_{name}", q)
            e4m3_nodes = [graph.constant_node(f"fp4_{name}_{part}", tensor)
                          for part, tensor in zip(("e4m3", "e4m3_scale"), e4m3)]
            replacement = fx_graph.call_function(
                torch.ops.fp4.linear.default,
                (site.x, *weights, None, site.bias, config.format, config.act_mode, config.implementation,
                 *e4m3_nodes),
            )
        replacement.meta.update(site.node.meta)
        replacement.meta[LAYER_META] = QuantizedLayer(weight, name)
        site.node.replace_all_uses_with(replacement)
        fx_graph.erase_node(site.node)
        if site.transpose_node is not None and not site.transpose_node.users:
            fx_graph.erase_node(site.transpose_node)
        result.matched += 1
        record_layer(
            weight,
            LayerRecord(name, shape, stored.original_bytes, stored.quantized_bytes + nbytes(*e4m3), config.format,
                        config.act_mode,
                        implementation_for(weight.device, config.format, config.act_mode, config.implementation),
                        choice_prefix=linear_choice_prefix(config.format, config.act_mode, *shape)
                        if config.implementation == AUTO else ""),
        )


def _ineligible(weight: torch.Tensor, shape: tuple, site: LinearSite, name: str, config: Fp4Config) -> str | None:
    """Why the layer must stay in its dtype, or None if it can be quantized."""
    selected, reason = config.selects(name)
    if not selected:
        return reason
    if weight.dim() != 2 or weight.dtype not in SUPPORTED_DTYPES:
        return f"weight is {weight.dtype} of shape {tuple(weight.shape)}, not a 2-D float tensor"
    group = get_format(config.format).group_size
    if shape[1] % group:
        return f"in_features={shape[1]} is not a multiple of the {config.format} group size {group}"
    if not only_used_as_weight(site.weight):
        return "weight is also used outside linear layers (tied weights)"
    return None
