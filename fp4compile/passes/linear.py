"""The linear pass: ``F.linear(x, w, b)`` on a module weight -> ``fp4::linear`` on its fp4 form."""

import torch
import torch.nn.functional as F
from torch import fx

from .. import quantized_weights
from ..config import Fp4Config
from ..formats import get_format
from ..formats.blocks import SUPPORTED_DTYPES
from ..report import LayerRecord, record_layer
from .graph import DynamoGraph
from .manager import PassResult

LINEAR_TARGETS = (F.linear, torch.ops.aten.linear.default)
IMPLEMENTATION = "torch (reference)"


class LinearPass:
    """Replaces every eligible linear layer with ``torch.ops.fp4.linear``.

    Eligible: the weight is a 2-D floating parameter (a module attribute) selected by the config,
    with K a multiple of the format's group size, used only as linear weights in the graph (a
    weight also read elsewhere, e.g. tied to an embedding, is kept).
    """

    name = "linear"

    def __call__(self, graph: DynamoGraph, config: Fp4Config) -> PassResult:
        result = PassResult(self.name)
        for node in list(graph.gm.graph.nodes):
            if node.op == "call_function" and node.target in LINEAR_TARGETS:
                self._rewrite(graph, config, node, result)
        return result

    def _rewrite(self, graph: DynamoGraph, config: Fp4Config, node: fx.Node, result: PassResult) -> None:
        x, weight_node, bias = (list(node.args) + [node.kwargs.get("bias")])[:3]
        found = graph.parameter_of(weight_node) if isinstance(weight_node, fx.Node) else None
        if found is None:
            result.skip("weight is not a module parameter")
            return
        weight, path = found
        name = path.removesuffix(".weight")
        reason = _ineligible(weight, weight_node, name, config)
        if reason is not None:
            result.skip(reason)
            record_layer(weight, LayerRecord(name, tuple(weight.shape), _nbytes(weight), _nbytes(weight), skipped=reason))
            return
        stored = quantized_weights.quantize_once(weight, config.format, config.scale_rule, config.release_weights)
        graph.pin(weight_node)
        q = stored.quantized
        with graph.gm.graph.inserting_before(node):
            attrs = [
                graph.gm.graph.get_attr(graph.add_constant(f"fp4_{name}_{part}", tensor))
                for part, tensor in (("packed", q.packed), ("scales", q.scales), ("global_scale", q.global_scale))
            ]
            replacement = graph.gm.graph.call_function(
                torch.ops.fp4.linear.default, (x, *attrs, None, bias, config.format, config.act_mode)
            )
        replacement.meta.update(node.meta)
        node.replace_all_uses_with(replacement)
        graph.gm.graph.erase_node(node)
        result.matched += 1
        record_layer(
            weight,
            LayerRecord(name, tuple(weight.shape), stored.original_bytes, stored.quantized_bytes,
                        config.format, config.act_mode, IMPLEMENTATION),
        )


def _ineligible(weight: torch.Tensor, weight_node: fx.Node, name: str, config: Fp4Config) -> str | None:
    """Why the layer must stay in its dtype, or None if it can be quantized."""
    selected, reason = config.selects(name)
    if not selected:
        return reason
    if weight.dim() != 2 or weight.dtype not in SUPPORTED_DTYPES:
        return f"weight is {weight.dtype} of shape {tuple(weight.shape)}, not a 2-D float tensor"
    group = get_format(config.format).group_size
    if weight.shape[1] % group:
        return f"in_features={weight.shape[1]} is not a multiple of the {config.format} group size {group}"
    if any(user.target not in LINEAR_TARGETS or user.args[1] is not weight_node for user in weight_node.users):
        return "weight is also used outside linear layers (tied weights)"
    return None


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()
