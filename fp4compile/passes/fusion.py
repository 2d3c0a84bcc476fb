"""The projection-fusion pass: quantized linear layers that read the same activation become one GEMM.

At decode every linear layer is a GEMM launch of its own, and the small ones (a Llama's k and v
projections, 1024 x 4096: 2 MB of fp4) cost about as much in launch and GPU fill as in reading
their weights. q/k/v, and gate/up, read the same activation: one GEMM over their concatenated
weight rows does the same arithmetic in one launch, on a shape the kernels stream near bandwidth,
and W4A4 quantizes the shared activation once instead of once per layer.

Runs after ``LinearPass``, on the ``fp4::linear`` nodes it made. Every layer keeps its own
quantization: rows are concatenated as they are, and NVFP4 layers with different global scales
pass one scale per row (``fp4::linear``'s ``w_global_scale`` of shape (N,)). Each layer's output
is its columns of the fused output, made contiguous (user code may ``view`` it freely; Inductor
fuses that copy into the consumers where it can).
"""

import operator
from collections import Counter
from dataclasses import replace

import torch
from torch import fx

from .. import quantized_weights
from ..config import Fp4Config
from ..ops.linear import choice_prefix as linear_choice_prefix
from ..report import record_layer, record_of
from .graph import DynamoGraph
from .linear import LAYER_META
from .manager import PassResult

# fp4::linear's positional arguments, as LinearPass writes them.
_X, _PACKED, _SCALES, _GLOBAL_SCALE, _ACT_GLOBAL_SCALE, _BIAS, _FMT, _ACT_MODE, _IMPLEMENTATION, _E4M3, _E4M3_SCALE = \
    range(11)


class ProjectionFusionPass:
    """Replaces each group of ``fp4::linear`` nodes on the same input (same format, mode,
    implementation, and all with or all without a bias) by one ``fp4::linear`` and a split.

    Left separate: layers with a static activation scale or an e4m3 weight form (each has its
    own, so nothing is shared), and weights that already run fused with other layers."""

    name = "fuse_projections"

    def __call__(self, graph: DynamoGraph, config: Fp4Config) -> PassResult:
        result = PassResult(self.name)
        if not config.fuse_projections:
            return result
        groups: dict[tuple, list[fx.Node]] = {}
        position = {node: index for index, node in enumerate(graph.gm.graph.nodes)}
        for node in position:
            key = _group_key(node)
            if key is not None:
                groups.setdefault(key, []).append(node)
        for nodes in groups.values():
            # A weight applied twice to the same input is left alone: its rows would be stored twice.
            uses = Counter(id(node.meta[LAYER_META].weight) for node in nodes)
            distinct = [node for node in nodes if uses[id(node.meta[LAYER_META].weight)] == 1]
            if len(distinct) > 1:
                self._fuse(graph, distinct, position, result)
        return result

    def _fuse(self, graph: DynamoGraph, nodes: list[fx.Node], position: dict[fx.Node, int],
              result: PassResult) -> None:
        """``position``: each original node's index in the graph (the fused node goes before the first)."""
        fx_graph = graph.gm.graph
        first = nodes[0]
        if any(node.args[_BIAS] is not None and position[node.args[_BIAS]] > position[first] for node in nodes):
            result.skip("a bias is computed between the layers")
            return
        members = [node.meta[LAYER_META] for node in nodes]
        fused = quantized_weights.fuse_once([m.weight for m in members])
        if fused is None:
            result.skip("weight already runs fused with other layers")
            return
        constants = {arg.target for node in nodes for arg in node.args
                     if isinstance(arg, fx.Node) and arg.op == "get_attr"}
        args = list(first.args)
        name = "+".join(m.name for m in members)
        with fx_graph.inserting_before(first):
            args[_PACKED], args[_SCALES], args[_GLOBAL_SCALE] = graph.quantized_nodes(f"fp4_fused_{name}", fused.quantized)
            if args[_BIAS] is not None:
                args[_BIAS] = fx_graph.call_function(torch.cat, ([node.args[_BIAS] for node in nodes],))
            combined = fx_graph.call_function(torch.ops.fp4.linear.default, tuple(args))
            parts = fx_graph.call_function(torch.split, (combined, list(fused.out_features)), {"dim": -1})
        for index, node in enumerate(nodes):
            with fx_graph.inserting_before(node):
                part = fx_graph.call_function(operator.getitem, (parts, index))
                output = fx_graph.call_method("contiguous", (part,))
            output.meta.update(node.meta)
            output.meta.pop(LAYER_META)
            node.replace_all_uses_with(output)
            fx_graph.erase_node(node)
        graph.drop_unused_constants(constants)  # each layer's stored form is now a view of the fused one
        for member in members:
            record = record_of(member.weight)
            if record is not None:
                others = tuple(m.name for m in members if m is not member)
                prefix = record.choice_prefix and linear_choice_prefix(record.fmt, record.act_mode,
                                                                       sum(fused.out_features), record.shape[1])
                record_layer(member.weight, replace(record, fused_with=others, choice_prefix=prefix))
        result.matched += len(nodes)


def _group_key(node: fx.Node) -> tuple | None:
    """What ``node`` must share with others to run in one GEMM with them; None if it cannot."""
    if node.op != "call_function" or node.target is not torch.ops.fp4.linear.default or LAYER_META not in node.meta:
        return None
    args = node.args
    if args[_ACT_GLOBAL_SCALE] is not None or args[_E4M3] is not None:
        return None
    weight = node.meta[LAYER_META].weight
    return (args[_X], args[_FMT], args[_ACT_MODE], args[_IMPLEMENTATION], args[_BIAS] is None, weight.device)

