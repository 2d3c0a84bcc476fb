"""Shared by the backend tests: graph capture, eager fake-quant references, error measure."""

import copy

import pytest
import torch
from torch import nn

import fp4compile
from fp4compile import Fp4Config
from fp4compile.backend import Fp4Backend, compile_with_inductor

FP4_LINEAR = torch.ops.fp4.linear.default


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Start each test from empty Dynamo caches and counters (recompile counts are asserted)."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


class GraphCapture:
    """A downstream compiler that keeps the rewritten graphs, then compiles them with Inductor."""

    def __init__(self):
        self.graphs = []
        self.inductor_options = []

    def __call__(self, gm, example_inputs, inductor_options):
        self.graphs.append(copy.deepcopy(gm.graph))
        self.inductor_options.append(inductor_options)
        return compile_with_inductor(gm, example_inputs, inductor_options)

    def count(self, target, graph: int | None = None) -> int:
        """Calls of ``target`` in all captured graphs, or in the ``graph``-th one."""
        graphs = self.graphs if graph is None else [self.graphs[graph]]
        return sum(1 for g in graphs for n in g.nodes if n.op == "call_function" and n.target is target)


def compile_captured(model, config: Fp4Config = Fp4Config(), **kwargs):
    """``torch.compile`` with the fp4 backend, keeping the rewritten graphs."""
    capture = GraphCapture()
    return torch.compile(model, backend=Fp4Backend(config, compile_graph=capture), **kwargs), capture


def fake_quant_copy(model: nn.Module, config: Fp4Config, names: list[str]) -> nn.Module:
    """Eager reference: the named layers get dequantized fp4 weights, and fp4 activations in W4A4.

    GPT-2's Conv1D stores its weight as (in, out); its transpose is what gets quantized.
    """
    ref = copy.deepcopy(model)
    for name in names:
        layer = ref.get_submodule(name)
        transposed = type(layer).__name__ == "Conv1D"
        weight = layer.weight.detach().t() if transposed else layer.weight.detach()
        q = fp4compile.quantize(weight, config.format, scale_rule=config.scale_rule)
        decoded = fp4compile.dequantize(q, weight.dtype)
        layer.weight.data = decoded.t().contiguous() if transposed else decoded
        if config.act_mode == "fp4":
            layer.register_forward_pre_hook(
                lambda m, args: fp4compile.dequantize(fp4compile.quantize(args[0], config.format), args[0].dtype)
            )
    return ref


def fake_quant_experts(model, config: Fp4Config):
    """Eager reference: every experts module's weights replaced by their fp4 values, quantized
    here independently of the pass (rows along the input dimension; gpt-oss stores (E, K, N))."""
    ref = copy.deepcopy(model)
    stored_kn = model.config.model_type == "gpt_oss"
    for name, module in ref.named_modules():
        if not name.endswith(".experts"):
            continue
        for projection in ("gate_up_proj", "down_proj"):
            weight = getattr(module, projection)
            matrix = weight.detach().transpose(-2, -1) if stored_kn else weight.detach()
            q = fp4compile.quantize(matrix, config.format, scale_rule=config.scale_rule)
            values = fp4compile.dequantize(q, weight.dtype)
            weight.data = values.transpose(-2, -1).contiguous() if stored_kn else values
    return ref


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 error of ``a`` against ``b``, in float64."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()
