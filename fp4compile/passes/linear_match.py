"""Recognising linear layers in a Dynamo graph, in the forms user code writes them.

``F.linear(x, w, b)``; ``x @ w.t()`` / ``w.T`` / ``w.transpose(0, 1)`` / ``w.permute(1, 0)`` with
``matmul``, ``mm`` or ``@``; ``addmm(b, x, w.t())``; and the same with a weight stored as
(in_features, out_features) and used untransposed (``x @ w``, ``addmm(b, x, w)``: GPT-2's Conv1D).
"""

import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx

LINEAR_FUNCTIONS = {F.linear, torch.ops.aten.linear.default}
MATMUL_FUNCTIONS = {operator.matmul, torch.matmul, torch.mm, torch.ops.aten.mm.default}
MATMUL_METHODS = {"matmul", "mm", "__matmul__"}
ADDMM = {torch.addmm, torch.ops.aten.addmm.default}


@dataclass(frozen=True)
class LinearSite:
    """One linear layer in the graph: ``node`` computes ``x @ W.T + bias`` with W = (N, K).

    ``weight`` is the placeholder holding the parameter; ``transposed`` says the parameter is
    stored as (K, N) (so W is its transpose); ``transpose_node`` is the node that transposed an
    (N, K) parameter for the matmul, if any (dead once the site is rewritten).
    """

    node: fx.Node
    x: fx.Node
    weight: fx.Node
    bias: fx.Node | None
    transposed: bool
    transpose_node: fx.Node | None


def match_linear(node: fx.Node) -> LinearSite | str | None:
    """The linear site computed by ``node``; None if it is no matmul; a reason if it is a matmul
    that fp4::linear cannot take over (e.g. ``addmm`` with ``beta`` or ``alpha``)."""
    if node.op == "call_function" and node.target in LINEAR_FUNCTIONS:
        x, weight, bias = _linear_arguments(node)
        if not isinstance(weight, fx.Node) or weight.op != "placeholder":
            return "weight is computed in the graph, not a module parameter"
        return LinearSite(node, x, weight, bias, transposed=False, transpose_node=None)
    if node.op == "call_function" and node.target in ADDMM:
        if set(node.kwargs) - {"input", "mat1", "mat2"} or len(node.args) != 3:
            return "addmm with beta/alpha scaling"
        bias, x, right = node.args
        if _rank(bias) != 1:
            return "addmm adds a matrix, not a bias vector"
    elif (node.op == "call_function" and node.target in MATMUL_FUNCTIONS) or (
        node.op == "call_method" and node.target in MATMUL_METHODS
    ):
        if node.kwargs or len(node.args) != 2:
            return None
        (x, right), bias = node.args, None
    else:
        return None
    if not isinstance(right, fx.Node):
        return None
    if right.op == "placeholder":
        return LinearSite(node, x, right, bias, transposed=True, transpose_node=None)
    source = _transposed_placeholder(right)
    if source is None:
        return None  # a matmul of two activations (attention scores, ...)
    return LinearSite(node, x, source, bias, transposed=False, transpose_node=right)


def _linear_arguments(node: fx.Node) -> tuple:
    """(input, weight, bias) of an ``F.linear`` call, positional or by keyword."""
    names = ("input", "weight", "bias")
    values = list(node.args) + [None] * (3 - len(node.args))
    return tuple(node.kwargs.get(name, value) for name, value in zip(names, values))


def _rank(node: object) -> int | None:
    """The number of dimensions of a traced tensor argument (None if unknown)."""
    value = node.meta.get("example_value") if isinstance(node, fx.Node) else None
    return value.dim() if isinstance(value, torch.Tensor) else None


def _transposed_placeholder(node: fx.Node) -> fx.Node | None:
    """The placeholder that ``node`` transposes (``.t()``, ``.T``, ``transpose(0, 1)``,
    ``permute(1, 0)``), else None."""
    args = node.args
    if not args or not isinstance(args[0], fx.Node) or args[0].op != "placeholder":
        return None
    if node.op == "call_method" and node.target == "t" and len(args) == 1:
        return args[0]
    if node.op == "call_function" and node.target is getattr and args[1:] in (("T",), ("mT",)):
        return args[0]
    if node.op == "call_method" and node.target == "transpose" and sorted(args[1:]) in ([0, 1], [-2, -1]):
        return args[0]
    if node.op == "call_method" and node.target == "permute" and list(args[1:]) == [1, 0]:
        return args[0]
    return None


def only_used_as_weight(placeholder: fx.Node) -> bool:
    """Whether every use of ``placeholder`` is as the weight of a linear site (directly or through
    a transpose); a weight read anywhere else (tied to an embedding, say) must keep its values."""
    for user in placeholder.users:
        if _transposed_placeholder(user) is placeholder:
            if not all(_is_weight_use(u, placeholder) for u in user.users):
                return False
        elif not _is_weight_use(user, placeholder):
            return False
    return True


def _is_weight_use(node: fx.Node, placeholder: fx.Node) -> bool:
    site = match_linear(node)
    return isinstance(site, LinearSite) and site.weight is placeholder and site.x is not placeholder
