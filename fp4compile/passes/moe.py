"""The MoE pass: a SwiGLU mixture-of-experts block -> ``fp4::moe`` on its experts' fp4 weights.

Runs before the linear pass. The router (a linear layer, kept in its dtype by default) and the
top-k stay in the graph; everything from the routing tensors to the combined output becomes one
``fp4::moe`` call (see ``moe_match`` for the forms recognised and ``formats/moe.py`` for the math).
Blocks the graph never shows (HF's ``eager`` experts, whose loop breaks the graph at
``nonzero``) are detected and reported with the fix.
"""

import inspect
import logging
import operator
import re
import sys

import torch
from torch import fx

from .. import quantized_weights
from ..config import Fp4Config
from ..formats import get_format
from ..formats.blocks import SUPPORTED_DTYPES
from ..ops.chooser import AUTO
from ..ops.implementations import implementation_for
from ..ops.moe import choice_prefix as moe_choice_prefix
from ..quantized_weights import nbytes
from ..report import LayerRecord, record_layer
from .graph import DynamoGraph
from .manager import PassResult
from .weights import fp8_weights_for
from .moe_match import MoeSite, match_moe, match_projection

logger = logging.getLogger("fp4compile")

GATE_UP, DOWN = "gate_up_proj", "down_proj"

_WARNED_EAGER: set[str] = set()


class MoePass:
    """Replaces every eligible SwiGLU MoE block with ``torch.ops.fp4.moe``.

    Eligible: the experts module is selected by the config, its two weights are 3-D floating
    parameters used only inside the block, and the hidden and intermediate sizes are multiples
    of the format's group size. Anything else keeps the block as traced, with the reason.
    """

    name = "moe"

    def __call__(self, graph: DynamoGraph, config: Fp4Config) -> PassResult:
        result = PassResult(self.name)
        projections = {}
        for node in list(graph.gm.graph.nodes):
            if (projection := match_projection(node)) is not None and (found := graph.parameter_of(projection.weight)):
                projections[found[1]] = projection
            _warn_if_eager_experts(node)
        for path, gate_up in projections.items():
            if not path.endswith("." + GATE_UP):
                continue
            experts = path.removesuffix("." + GATE_UP)
            down = projections.get(f"{experts}.{DOWN}")
            site = match_moe(gate_up, down) if down is not None else f"no {DOWN} projection of {experts} in the graph"
            if isinstance(site, str):
                self._keep(graph, experts, (gate_up, down), site, result)
            else:
                self._rewrite(graph, config, experts, site, result)
        return result

    def _keep(self, graph: DynamoGraph, experts: str, projections: tuple, reason: str, result: PassResult) -> None:
        result.skip(reason)
        for projection in projections:
            if projection is not None:
                weight, path = graph.parameter_of(projection.weight)
                record_layer(weight, LayerRecord(path, tuple(weight.shape), nbytes(weight), nbytes(weight), skipped=reason))

    def _rewrite(self, graph: DynamoGraph, config: Fp4Config, experts: str, site: MoeSite, result: PassResult) -> None:
        (gate_up, gate_up_path), (down, down_path) = (graph.parameter_of(p.weight) for p in (site.gate_up, site.down))
        block = _block(site.output)
        reason = _ineligible(site, block, gate_up, down, experts, config)
        if reason is not None and any(quantized_weights.is_released(w) for w in (gate_up, down)):
            raise RuntimeError(
                f"fp4compile: {experts} is now kept in its original dtype ({reason}), but an earlier compile quantized "
                f"it and released its original values. Rebuild the model, or compile with release_weights=False."
            )
        if reason is not None:
            self._keep(graph, experts, (site.gate_up, site.down), reason, result)
            return
        stored = {
            GATE_UP: quantized_weights.quantize_once(gate_up, config.format, config.scale_rule, config.release_weights,
                                                     site.gate_up.stored_kn, site.interleaved),
            DOWN: quantized_weights.quantize_once(down, config.format, config.scale_rule, config.release_weights,
                                                  site.down.stored_kn),
        }
        graph.pin(site.gate_up.weight)
        e4m3 = {projection: fp8_weights_for(weight, stored[projection], experts, config)
                 for projection, weight in ((GATE_UP, gate_up), (DOWN, down))}
        fx_graph = graph.gm.graph
        with fx_graph.inserting_before(site.output):
            weights = [node for projection, s in stored.items()
                       for node in graph.quantized_nodes(f"fp4_{experts}_{projection}", s.quantized)]
            e4m3_nodes = [graph.constant_node(f"fp4_{experts}_{projection}_{part}", tensor)
                          for projection, pair in e4m3.items() for part, tensor in zip(("e4m3", "e4m3_scale"), pair)]
            biases = [self._bias(graph, experts, site.gate_up_bias, site.interleaved), site.down_bias]
            moe = fx_graph.call_function(
                torch.ops.fp4.moe.default,
                (site.hidden, site.topk_ids, site.topk_weights, *weights, *biases, config.format, config.act_mode,
                 site.activation, site.alpha, site.limit, config.implementation, *e4m3_nodes),
            )
            replacement = moe
            output_dtype = site.output.meta["example_value"].dtype
            if site.hidden.meta["example_value"].dtype != output_dtype:
                replacement = fx_graph.call_method("to", (moe, output_dtype))
        moe.meta.update(site.hidden.meta)
        replacement.meta.update(site.output.meta)
        site.output.replace_all_uses_with(replacement)
        _erase_dead(fx_graph, block)
        result.matched += 1
        implementation = implementation_for(gate_up.device, config.format, config.act_mode, config.implementation, "moe")
        prefix = _choice_prefix(site, stored[GATE_UP].quantized.packed.shape, config) if config.implementation == AUTO else ""
        for projection, weight, path in ((GATE_UP, gate_up, gate_up_path), (DOWN, down, down_path)):
            s = stored[projection]
            record_layer(weight, LayerRecord(path, tuple(weight.shape), s.original_bytes,
                                             s.quantized_bytes + nbytes(*e4m3[projection]), config.format,
                                             config.act_mode, implementation, choice_prefix=prefix))

    @staticmethod
    def _bias(graph: DynamoGraph, experts: str, bias: fx.Node | None, interleaved: bool) -> fx.Node | None:
        """The gate/up bias in the op's [gate | up] column order (a reordered copy if interleaved)."""
        if bias is None or not interleaved:
            return bias
        value = graph.values[bias].detach()
        reordered = torch.cat((value[..., 0::2], value[..., 1::2]), dim=-1)
        return graph.constant_node(f"fp4_{experts}_gate_up_bias", reordered)


def _choice_prefix(site: MoeSite, gate_up_packed_shape: torch.Size, config: Fp4Config) -> str:
    """``fp4::moe``'s choice-key prefix for the block, for the layer report ("" if top-k is not a
    plain number in the graph)."""
    top_k = site.topk_ids.meta["example_value"].shape[-1]
    if not isinstance(top_k, int):
        return ""
    experts, two_inter, half_hidden = gate_up_packed_shape
    return moe_choice_prefix(config.format, config.act_mode, experts, 2 * half_hidden, two_inter // 2, top_k)


def _ineligible(site: MoeSite, block: set[fx.Node], gate_up: torch.Tensor, down: torch.Tensor, experts: str,
                config: Fp4Config) -> str | None:
    """Why the block (``block``: the nodes it is computed from) must stay as traced, or None if its
    experts can be quantized."""
    selected, reason = config.selects(experts)
    if not selected:
        return reason
    for name, weight in ((GATE_UP, gate_up), (DOWN, down)):
        if weight.dim() != 3 or weight.dtype not in SUPPORTED_DTYPES:
            return f"{name} is {weight.dtype} of shape {tuple(weight.shape)}, not a 3-D float tensor"
    group = get_format(config.format).group_size
    hidden_size = gate_up.shape[-2] if site.gate_up.stored_kn else gate_up.shape[-1]
    intermediate = down.shape[-2] if site.down.stored_kn else down.shape[-1]
    for name, size in (("hidden size", hidden_size), ("expert intermediate size", intermediate)):
        if size % group:
            return f"{name} {size} is not a multiple of the {config.format} group size {group}"
    for parameter in (site.gate_up.weight, site.down.weight, site.gate_up_bias, site.down_bias):
        if parameter is not None and any(user not in block for user in parameter.users):
            return f"{parameter.name} is also used outside the MoE block"
    return None


def _ancestors(node: fx.Node) -> set[fx.Node]:
    """``node`` and every node it depends on."""
    seen, stack = {node}, [node]
    while stack:
        for parent in stack.pop().all_input_nodes:
            if parent not in seen:
                seen.add(parent)
                stack.append(parent)
    return seen


def _block(output: fx.Node) -> set[fx.Node]:
    """What ``output`` is computed from, counting the in-place writes into those values (a bias
    added with ``out.add_(bias[ids])`` is read by no node, yet changes ``out``) and their inputs."""
    block = _ancestors(output)
    while writes := {user for node in block for user in node.users if user not in block and _mutates(user, node)}:
        for write in writes:
            block |= _ancestors(write)
    return block


def _writes_in_place(node: fx.Node) -> bool:
    """Whether ``node`` writes into its first argument (``t.add_(...)``, ``t[i] = v``, ``t /= d``)."""
    return (node.op == "call_function" and node.target in _IN_PLACE_OPERATORS) or (
        node.op == "call_method" and node.target.endswith("_") and not node.target.startswith("_"))


_IN_PLACE_OPERATORS = {operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv}


def _mutates(node: fx.Node, tensor: fx.Node) -> bool:
    """Whether ``node`` only writes into ``tensor`` in place, its result unused."""
    return _writes_in_place(node) and not node.users and node.args[0] is tensor


def _erase_dead(graph: fx.Graph, candidates: set[fx.Node]) -> None:
    """Erase the ``candidates`` nothing reads any more, with the in-place writes into them
    (Dynamo graphs keep those as nodes without users, which plain dead-code elimination keeps)."""
    changed = True
    while changed:
        changed = False
        for node in reversed(list(graph.nodes)):
            if node not in candidates or node.op in ("placeholder", "output") or _writes_in_place(node):
                continue  # a write goes only with the tensor it writes into
            if all(_mutates(user, node) for user in node.users):
                for user in list(node.users):
                    graph.erase_node(user)
                graph.erase_node(node)
                candidates.discard(node)
                changed = True


def _warn_if_eager_experts(node: fx.Node) -> None:
    """Warn once per experts class when HF's ``eager`` experts show up: their loop over experts
    breaks the graph at ``nonzero``, so the expert matmuls never reach this backend and stay in
    their dtype. Dynamo traces that loop's prologue (``one_hot`` of the top-k indices) as a graph
    of its own, from inside the experts' ``forward``: the module's path in the model is unknown
    there (no module stack, no parameters), but the node's stack trace gives the source file and
    line, and from them the class whose ``forward`` it is."""
    if not (node.op == "call_function" and getattr(node.target, "__name__", "") == "one_hot"):
        return
    index = node.args[0] if node.args else None
    source = getattr(index, "_dynamo_source", None)
    frames = _TRACE_FRAME.findall(node.meta.get("stack_trace") or "")
    if getattr(source, "name", None) != "L['top_k_index']" or not frames:
        return  # HF's experts take (hidden_states, top_k_index, top_k_weights)
    path, line = frames[-1]
    where = f"{path}:{line}"
    if where in _WARNED_EAGER:
        return
    _WARNED_EAGER.add(where)
    experts_class = _class_whose_forward_spans(path, int(line))
    logger.warning(
        "fp4compile: the MoE experts %s(%s) run with experts_implementation='eager': their loop over experts breaks "
        "the graph at nonzero, so the expert weights never reach the fp4 backend and stay in their dtype. Call "
        "model.set_experts_implementation('grouped_mm') (or load the model with experts_implementation='grouped_mm') "
        "before torch.compile to quantize them.", f"{experts_class} " if experts_class else "", where)


def _class_whose_forward_spans(path: str, line: int) -> str | None:
    """The name of a class defined in the loaded module at ``path`` whose own ``forward`` (through
    decorators) contains ``line``, or None. HF defines its experts classes at module level."""
    for module in list(sys.modules.values()):
        if getattr(module, "__file__", None) != path:
            continue
        for name, value in vars(module).items():
            forward = value.__dict__.get("forward") if isinstance(value, type) else None
            code = getattr(inspect.unwrap(forward), "__code__", None) if callable(forward) else None
            if code is None or code.co_filename != path:
                continue
            lines = [number for *_, number in code.co_lines() if number is not None]
            if lines and min(lines) <= line <= max(lines):
                return name
    return None


_TRACE_FRAME = re.compile(r'File "([^"]+)", line (\d+)')
