"""What a pass needs to know about a Dynamo graph: the real tensors behind its placeholders and
the module paths they come from, and how to add compile-time tensors to it."""

import re
from dataclasses import dataclass, field

import torch
from torch import fx

_PATH_PART = re.compile(r"\._(?:modules|parameters|buffers)\['([^']+)'\]")


def module_path(source_name: str) -> str:
    """``L['self']._modules['model']._modules['layers']._modules['0']._parameters['weight']`` ->
    ``model.layers.0.weight`` (the root object, ``self`` or a global, is left out)."""
    return ".".join(_PATH_PART.findall(source_name))


@dataclass
class DynamoGraph:
    """A Dynamo FX graph with its example inputs (the real parameters, during the backend call)."""

    gm: fx.GraphModule
    example_inputs: list
    values: dict[fx.Node, object] = field(init=False)

    def __post_init__(self) -> None:
        placeholders = self.gm.graph.find_nodes(op="placeholder")
        self.values = dict(zip(placeholders, self.example_inputs))

    def pin(self, placeholder: fx.Node) -> None:
        """Make the compiled graph valid only for this very tensor behind ``placeholder``.

        A pass that bakes a derived form of an input (a weight's fp4 form) into the graph must
        pin it: Dynamo otherwise reuses a compiled graph for every instance of a module class
        whose inputs pass its guards, and a second model would run with the first one's weights.
        An identity guard (the one Dynamo itself uses for ``mark_static_address(guard=True)``)
        makes it recompile for the new instance instead. Guards are built after the backend
        returns, so installing one here counts; ``install_guard`` is Dynamo's, not a public API:
        tested on torch 2.11 and 2.13.
        """
        from torch._dynamo.guards import GuardBuilder, install_guard

        install_guard(placeholder._dynamo_source.make_guard(GuardBuilder.ID_MATCH))

    def parameter_of(self, node: fx.Node) -> tuple[torch.Tensor, str] | None:
        """The real tensor and dotted path of a placeholder fed by a module attribute, else None."""
        if node.op != "placeholder" or not isinstance(self.values.get(node), torch.Tensor):
            return None
        source = getattr(node, "_dynamo_source", None)
        path = module_path(source.name) if source is not None else ""
        return (self.values[node], path) if path else None

    def add_constant(self, name: str, tensor: torch.Tensor) -> str:
        """Register ``tensor`` on the graph module for ``get_attr`` nodes; returns its attribute name.

        AOT autograd lifts such tensors into graph inputs and looks up a guard source for each
        (``_param_name_to_source``, set by Dynamo); a ``ConstantSource`` tells it the tensor is a
        compile-time constant. That dictionary is Dynamo's, not a public API: tested on torch 2.11
        and 2.13.
        """
        from torch._dynamo.source import ConstantSource

        attr = re.sub(r"\W", "_", name)
        if not hasattr(self.gm, attr):
            self.gm.register_buffer(attr, tensor)
            sources = getattr(self.gm, "_param_name_to_source", None)
            if sources is not None:
                sources[attr] = ConstantSource(attr)
        return attr
