"""What a pass needs to know about a Dynamo graph: the real tensors behind its placeholders and
the module paths they come from, and how to add compile-time tensors to it."""

import re
from dataclasses import dataclass, field

import torch
from torch import fx

from ..formats import QuantizedTensor

_ROOT = re.compile(r"^[LG]\['([^']+)'\]")
_PATH_PART = re.compile(r"\._(?:modules|parameters|buffers)\['([^']+)'\]")
_ANONYMOUS_ROOTS = ("self", "fn")  # the module being compiled, as Dynamo names it


def module_path(source_name: str) -> str:
    """``L['self']._modules['model']._modules['layers']._modules['0']._parameters['weight']`` ->
    ``model.layers.0.weight``. The compiled module itself (``self``, ``fn``) is left out; a module
    reached through another variable keeps that name (``G['lin']._parameters['weight']`` ->
    ``lin.weight``)."""
    root = _ROOT.match(source_name)
    parts = _PATH_PART.findall(source_name)
    if root and root.group(1) not in _ANONYMOUS_ROOTS:
        parts.insert(0, root.group(1))
    return ".".join(parts)


def _owner_source(parameter_source):
    """``<module>._parameters['weight']`` -> the source of ``<module>`` (see ``parameter_of``)."""
    return parameter_source.base.base


@dataclass
class DynamoGraph:
    """A Dynamo FX graph with its example inputs (the real parameters, during the backend call)."""

    gm: fx.GraphModule
    example_inputs: list
    values: dict[fx.Node, object] = field(init=False)

    def __post_init__(self) -> None:
        placeholders = self.gm.graph.find_nodes(op="placeholder")
        self.values = dict(zip(placeholders, self.example_inputs))

    def parameter_of(self, node: fx.Node) -> tuple[torch.Tensor, str] | None:
        """The real tensor and dotted path of a placeholder fed by a module parameter, else None."""
        if node.op != "placeholder" or not isinstance(self.values.get(node), torch.Tensor):
            return None
        source = getattr(node, "_dynamo_source", None)
        parent = getattr(source, "base", None)
        if parent is None or not parent.name.endswith("._parameters"):
            return None
        return self.values[node], module_path(source.name)

    def pin(self, placeholder: fx.Node) -> None:
        """Make the compiled graph valid only for the module that owns ``placeholder``'s parameter.

        A pass that bakes a derived form of a parameter (a weight's fp4 form) into the graph must
        pin it: Dynamo otherwise reuses a compiled graph for every instance of a module class
        whose inputs pass its guards, and a second model would run with the first one's weights.
        An identity guard on the owning module makes Dynamo recompile for a new instance instead.
        (On the module, not the parameter: torch 2.11 formats an identity-guarded tensor with
        ``repr``, which reads the values that quantization released.) Guards are built after the
        backend returns, so installing one here counts; ``install_guard`` is Dynamo's, not a
        public API: tested on torch 2.11 and 2.13.
        """
        from torch._dynamo.guards import GuardBuilder, install_guard

        install_guard(_owner_source(placeholder._dynamo_source).make_guard(GuardBuilder.ID_MATCH))

    def add_constant(self, name: str, tensor: torch.Tensor) -> str:
        """Register ``tensor`` on the graph module for ``get_attr`` nodes; returns its attribute name.

        AOT autograd lifts such tensors into graph inputs and looks up a guard source for each
        (``_param_name_to_source``, set by Dynamo); a ``ConstantSource`` tells it the tensor is a
        compile-time constant. That dictionary is Dynamo's, not a public API: tested on torch 2.11
        and 2.13.
        """
        from torch._dynamo.source import ConstantSource

        base = attr = re.sub(r"\W", "_", name)
        suffix = 1
        while hasattr(self.gm, attr):
            if getattr(self.gm, attr) is tensor:
                return attr  # the same weight used again in this graph
            attr, suffix = f"{base}_{suffix}", suffix + 1  # another name that maps to the same attribute
        self.gm.register_buffer(attr, tensor)
        sources = getattr(self.gm, "_param_name_to_source", None)
        if sources is not None:
            sources[attr] = ConstantSource(attr)
        return attr

    def drop_unused_constants(self, names: set[str]) -> None:
        """Remove the constants called ``names`` (see ``add_constant``) that no node reads any
        more, with their ``get_attr`` nodes and guard sources, so that their memory can be freed."""
        graph = self.gm.graph
        for node in list(graph.find_nodes(op="get_attr")):
            if node.target in names and not node.users:
                graph.erase_node(node)
        still_read = {node.target for node in graph.find_nodes(op="get_attr")}
        for name in names - still_read:
            delattr(self.gm, name)
            getattr(self.gm, "_param_name_to_source", {}).pop(name, None)

    def constant_node(self, name: str, tensor: torch.Tensor | None) -> fx.Node | None:
        """A ``get_attr`` node for compile-time tensor ``tensor`` (see ``add_constant``), inserted
        where the graph's insertion point is; None for None (an absent optional op argument)."""
        if tensor is None:
            return None
        return self.gm.graph.get_attr(self.add_constant(name, tensor))

    def quantized_nodes(self, prefix: str, q: QuantizedTensor) -> list[fx.Node]:
        """``constant_node``s for a quantized weight's packed codes, scales and global scale, in the
        order the fp4 ops take them."""
        return [self.constant_node(f"{prefix}_{part}", tensor)
                for part, tensor in (("packed", q.packed), ("scales", q.scales), ("global_scale", q.global_scale))]
