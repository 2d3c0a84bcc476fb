"""What a pass needs to know about a Dynamo graph: the real tensors behind its placeholders and
the module paths they come from, and how to add compile-time tensors to it."""

import re
import weakref
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
    baked_inputs: dict[int, "weakref.ref[torch.Tensor]"] = field(default_factory=dict)
    """Input positions whose tensors a pass baked into the graph (as their quantized form), so the
    compiled graph is valid only when called with those very tensors."""

    def __post_init__(self) -> None:
        placeholders = self.gm.graph.find_nodes(op="placeholder")
        self.values = dict(zip(placeholders, self.example_inputs))
        self._positions = {node: i for i, node in enumerate(placeholders)}

    def bake(self, placeholder: fx.Node) -> None:
        """Record that ``placeholder``'s tensor is baked into the graph (see ``baked_inputs``)."""
        self.baked_inputs[self._positions[placeholder]] = weakref.ref(self.values[placeholder])

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
