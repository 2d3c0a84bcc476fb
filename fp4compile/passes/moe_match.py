"""Recognising SwiGLU mixture-of-experts blocks in a Dynamo graph.

Hugging Face transformers v5 stores a block's experts as two 3-D parameters, ``<experts>.gate_up_proj``
and ``<experts>.down_proj``, and traces them in one of two forms:

- ``grouped_mm``: slots (token, choice) sorted by expert, ``torch._grouped_mm`` (bf16) or
  ``transformers::grouped_mm_fallback`` (other dtypes) over the sorted rows, the combine undoing
  the sort (``weighted[inv_perm]``);
- ``batched_mm``: each slot gathers its expert's matrices (``gate_up_proj[ids]``) and ``torch.bmm``.

Between the two projections: ``silu(gate) * up`` on the halves of a ``chunk``, or gpt-oss's clamped
SwiGLU on interleaved columns (``[..., ::2]``, ``[..., 1::2]``), optionally after an in-place bias
add of ``<experts>.gate_up_proj_bias[ids]``. After the down projection (and its bias): times the
slot's routing weight, back to token order, ``view(T, k, H).sum(dim=1)``.

Some transformers releases (5.17) also mark slots routed to no local expert (an index >= E, used
with expert parallelism): the grouped form zeroes them with ``masked_fill`` before and after each
projection, the batched form clamps the indices. ``fp4::moe`` gives such slots no contribution,
as the grouped form does.

The match is strict: every node between the routing tensors and the combined output must have
one of these forms, or the block is left alone with the reason (never half-matched).
"""

import operator
from dataclasses import dataclass

import torch
from torch import fx

CASTS = {"to", "type", "float", "bfloat16", "half"}


@dataclass(frozen=True)
class ExpertProjection:
    """One expert projection: ``out`` (S, N) = per slot ``x`` (S, K) times its expert's matrix.

    ``weight`` is the parameter placeholder, stored (E, N, K) or, with ``stored_kn``, (E, K, N);
    ``expert_index`` the per-slot expert indices that gather it (the batched form), or None (the
    grouped form, where slots are sorted by expert instead).
    """

    node: fx.Node
    out: fx.Node
    x: fx.Node
    weight: fx.Node
    stored_kn: bool
    expert_index: fx.Node | None = None

    @property
    def batched(self) -> bool:
        return self.expert_index is not None


@dataclass(frozen=True)
class MoeSite:
    """A SwiGLU MoE block: ``output`` (T, H) from ``hidden`` (T, H), ``topk_ids`` and
    ``topk_weights`` (T, k) and the experts' parameters."""

    output: fx.Node
    hidden: fx.Node
    topk_ids: fx.Node
    topk_weights: fx.Node
    gate_up: ExpertProjection
    down: ExpertProjection
    gate_up_bias: fx.Node | None
    down_bias: fx.Node | None
    interleaved: bool
    activation: str
    alpha: float
    limit: float


def _is_call(node: object, name: str) -> bool:
    """Whether ``node`` calls the method ``name`` or a function of that name (torch.x, F.x, operator.x)."""
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_method":
        return node.target == name
    return node.op == "call_function" and getattr(node.target, "__name__", None) == name


def _op_name(target: object) -> str:
    return getattr(target, "_qualified_op_name", None) or getattr(getattr(target, "_schema", None), "name", "")


def strip_casts(node: object) -> object:
    """``node`` without the dtype conversions applied to it (``.to(dtype)``, ``.float()``, ...)."""
    while isinstance(node, fx.Node) and node.op == "call_method" and node.target in CASTS and node.args:
        node = node.args[0]
    return node


def _gathered_parameter(node: object) -> fx.Node | None:
    """P for ``P[ids]`` with P a placeholder (a per-slot gather of expert matrices or biases)."""
    if isinstance(node, fx.Node) and node.op == "call_function" and node.target is operator.getitem:
        base, index = node.args
        if isinstance(base, fx.Node) and base.op == "placeholder" and isinstance(index, fx.Node):
            return base
    return None


def _swapped_last_dims(node: object) -> fx.Node | None:
    """P for ``P.transpose(-2, -1)`` / ``transpose(1, 2)`` / ``P.mT`` of a placeholder P."""
    if not isinstance(node, fx.Node) or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    base = node.args[0]
    if base.op != "placeholder":
        return None
    if _is_call(node, "transpose") and sorted(node.args[1:]) in ([-2, -1], [1, 2]):
        return base
    if node.op == "call_function" and node.target is getattr and node.args[1:] == ("mT",):
        return base
    return None


def _single_user(node: fx.Node, name: str) -> fx.Node | None:
    users = [u for u in node.users if _is_call(u, name)]
    return users[0] if len(users) == 1 else None


def match_projection(node: fx.Node) -> ExpertProjection | None:
    """The expert projection computed by ``node`` (a grouped or batched matmul on a 3-D parameter)."""
    if node.op != "call_function":
        return None
    grouped = node.target is torch._grouped_mm or _op_name(node.target) == "transformers::grouped_mm_fallback"
    if grouped:
        x = node.args[0] if node.args else node.kwargs.get("mat_a")
        weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("mat_b")
        if isinstance(weight, fx.Node) and weight.op == "placeholder":
            return ExpertProjection(node, node, strip_casts(x), weight, stored_kn=True)
        if (placeholder := _swapped_last_dims(weight)) is not None:
            return ExpertProjection(node, node, strip_casts(x), placeholder, stored_kn=False)
        return None
    if node.target is not torch.bmm or len(node.args) != 2:
        return None
    left, right = node.args
    if (placeholder := _gathered_parameter(left)) is not None and _is_call(right, "unsqueeze"):
        stored_kn, gather, x = False, left, right.args[0]
    elif (placeholder := _gathered_parameter(right)) is not None and _is_call(left, "unsqueeze"):
        stored_kn, gather, x = True, right, left.args[0]
    else:
        return None
    squeeze = _single_user(node, "squeeze")
    if squeeze is None:
        return None
    return ExpertProjection(node, squeeze, strip_casts(x), placeholder, stored_kn, expert_index=gather.args[1])


def _after_sentinel_fill(out: fx.Node) -> fx.Node:
    """``out.masked_fill(mask, 0.0)`` if that is how ``out`` is read (slots of no local expert
    zeroed), else ``out``."""
    fills = [u for u in out.users if _is_call(u, "masked_fill") and u.args[0] is out and u.args[2:] == (0.0,)]
    return fills[0] if len(fills) == 1 else out


def _bias_add(out: fx.Node) -> tuple[fx.Node | None, fx.Node]:
    """(bias parameter, the node holding out + bias) for ``out.add_(bias[ids])`` (in place: later
    uses read ``out``) or ``out + bias[ids]``; (None, out) when there is no bias."""
    for user in out.users:
        if (_is_call(user, "add_") or _is_call(user, "add")) and user.args[0] is out and len(user.args) == 2:
            bias = _gathered_parameter(user.args[1])
            if bias is not None:
                return bias, out if _is_call(user, "add_") else user
    return None, out


def _slice_step(node: fx.Node) -> tuple[int, int] | None:
    """(start, step) of ``out[..., start::step]``."""
    if node.op != "call_function" or node.target is not operator.getitem:
        return None
    index = node.args[1]
    if isinstance(index, tuple) and len(index) == 2 and index[0] is Ellipsis and isinstance(index[1], slice):
        s = index[1]
        if s.stop is None:
            return (s.start or 0, s.step or 1)
    return None


def _gate_and_up(out: fx.Node) -> tuple[fx.Node, fx.Node, bool] | str:
    """(gate, up, interleaved): ``chunk(2, dim=-1)`` halves or ``[..., ::2]``/``[..., 1::2]`` columns."""
    users = list(out.users)
    chunks = [u for u in users if _is_call(u, "chunk")]
    if chunks:
        chunk = chunks[0]
        dim = chunk.kwargs.get("dim", chunk.args[2] if len(chunk.args) > 2 else 0)
        if chunk.args[1] != 2 or dim != -1:
            return "gate/up split is not chunk(2, dim=-1)"
        parts = {u.args[1]: u for u in chunk.users if u.target is operator.getitem}
        if set(parts) != {0, 1}:
            return "gate/up halves not both used"
        return parts[0], parts[1], False
    slices = {_slice_step(u): u for u in users}
    if (0, 2) in slices and (1, 2) in slices:
        return slices[(0, 2)], slices[(1, 2)], True
    return "gate/up projection output is not split into gate and up"


def _operands(node: fx.Node, name: str) -> tuple | None:
    return tuple(node.args) if _is_call(node, name) and len(node.args) == 2 and not node.kwargs else None


def _activation(result: fx.Node, gate: fx.Node, up: fx.Node) -> tuple[str, float, float] | str:
    """(activation, alpha, limit) that ``result`` computes from ``gate`` and ``up``."""
    pair = _operands(result, "mul")
    if pair is None:
        return "the expert activation is not a product of gate and up terms"
    for first, second in (pair, pair[::-1]):
        if _is_call(first, "silu") and first.args[0] is gate and second is up:
            return "silu", 0.0, 0.0
    for first, second in (pair, pair[::-1]):
        shifted = _operands(first, "add") if isinstance(first, fx.Node) else None
        glu = _operands(second, "mul") if isinstance(second, fx.Node) else None
        if not shifted or not glu or shifted[1] != 1:
            continue
        up_clamp = shifted[0]
        if not (_is_call(up_clamp, "clamp") and up_clamp.args[0] is up):
            continue
        limit = up_clamp.kwargs.get("max")
        if up_clamp.kwargs.get("min") != -limit:
            continue
        for gate_clamp, sig in (glu, glu[::-1]):
            if not (_is_call(gate_clamp, "clamp") and gate_clamp.args[0] is gate and gate_clamp.kwargs.get("max") == limit
                    and gate_clamp.kwargs.get("min") is None and _is_call(sig, "sigmoid")):
                continue
            scaled = _operands(sig.args[0], "mul")
            if scaled and scaled[0] is gate_clamp and isinstance(scaled[1], (int, float)):
                return "clamped_swiglu", float(scaled[1]), float(limit)
    return "unrecognised expert activation (not silu(gate) * up or gpt-oss's clamped SwiGLU)"


def _routed_hidden(projection: ExpertProjection, k: int) -> fx.Node | None:
    """The (T, H) hidden states whose rows ``projection.x`` repeats per slot."""
    x = projection.x
    if projection.batched:
        if _is_call(x, "repeat_interleave") and x.args[1] == k and x.kwargs.get("dim") == 0:
            return x.args[0]
        return None
    if x.op == "call_function" and x.target is operator.getitem and isinstance(x.args[1], fx.Node):
        return x.args[0]
    return None


def _flattened(node: object) -> fx.Node | None:
    """X for ``X.reshape(-1)`` / ``X.view(-1)``."""
    if (_is_call(node, "reshape") or _is_call(node, "view")) and tuple(node.args[1:]) == (-1,):
        return node.args[0]
    return None


def _combine(down: fx.Node) -> tuple[fx.Node, fx.Node] | str:
    """(output, topk_weights) of ``(down * w.unsqueeze(-1))[inv_perm]?.view(T, k, H).sum(dim=1)``."""
    weighted = [u for u in down.users if _is_call(u, "mul") and u.args[0] is down]
    if len(weighted) != 1:
        return "the down projection is not multiplied by the routing weights"
    weighted = weighted[0]
    unsqueeze = weighted.args[1]
    if not (_is_call(unsqueeze, "unsqueeze") and unsqueeze.args[1:] == (-1,)):
        return "the routing weights are not applied per slot"
    slot_weights = unsqueeze.args[0]
    if slot_weights.op == "call_function" and slot_weights.target is operator.getitem:
        slot_weights = slot_weights.args[0]  # sorted by expert (grouped form)
    topk_weights = _flattened(slot_weights)
    if topk_weights is None:
        return "the routing weights are not the flattened top-k weights"
    node = weighted
    if len(node.users) == 1 and next(iter(node.users)).target is operator.getitem:
        node = next(iter(node.users))  # back to token order (grouped form)
    view = next(iter(node.users)) if len(node.users) == 1 else None
    total = next(iter(view.users)) if view is not None and len(view.users) == 1 else None
    if not (_is_call(view, "view") or _is_call(view, "reshape")) or not _is_call(total, "sum"):
        return "the expert outputs are not summed per token"
    if total.kwargs.get("dim", total.args[1] if len(total.args) > 1 else None) != 1:
        return "the expert outputs are not summed over the top-k dimension"
    return total, topk_weights


def match_moe(gate_up: ExpertProjection, down: ExpertProjection) -> MoeSite | str:
    """The MoE block around a gate/up and a down projection of one experts module, or why not."""
    if gate_up.batched != down.batched:
        return "gate/up and down projections use different expert implementations"
    gate_up_bias, gate_up_out = _bias_add(gate_up.out)
    split = _gate_and_up(_after_sentinel_fill(gate_up_out))
    if isinstance(split, str):
        return split
    gate, up, interleaved = split
    activation = _activation(down.x, gate, up)
    if isinstance(activation, str):
        return activation
    down_bias, down_out = _bias_add(down.out)
    combine = _combine(_after_sentinel_fill(down_out))
    if isinstance(combine, str):
        return combine
    output, topk_weights = combine
    weights_value = topk_weights.meta.get("example_value")
    if not isinstance(weights_value, torch.Tensor) or weights_value.dim() != 2:
        return "the top-k routing weights are not a (tokens, k) tensor"
    k = weights_value.shape[1]
    hidden = _routed_hidden(gate_up, k)
    if hidden is None:
        return "the expert inputs are not the hidden states repeated per slot"
    topk_ids = _topk_ids(gate_up)
    if topk_ids is None:
        return "the expert choice is not the flattened top-k indices"
    return MoeSite(output, hidden, topk_ids, topk_weights, gate_up, down, gate_up_bias, down_bias, interleaved,
                   *activation)


def _topk_ids(projection: ExpertProjection) -> fx.Node | None:
    """The (T, k) expert indices: flattened, then gathered from (batched) or sorted (grouped)."""
    if projection.batched:
        index = projection.expert_index
        if _is_call(index, "clamp"):
            index = index.args[0]  # slots of no local expert clamped to a valid index (see above)
        return _flattened(index)
    x = projection.x  # hidden[perm // k]
    divided = x.args[1]
    if not (divided.op == "call_function" and divided.target is operator.floordiv):
        return None
    perm = divided.args[0]
    if not (perm.op == "call_function" and perm.target is operator.getitem and perm.args[1] == 1):
        return None
    sort = perm.args[0]
    return _flattened(sort.args[0]) if _is_call(sort, "sort") else None
