"""The fp4 torch.compile backend and the linear pass, on plain modules and tiny HF models (CPU)."""

import copy
import importlib.metadata

import pytest
import torch
from torch import nn

import fp4compile
from fp4compile import Fp4Config, quantized_weights
from fp4compile.backend import Fp4Backend, compile_with_inductor

transformers = pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Start each test from empty Dynamo caches and counters (recompile counts are asserted)."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


class GraphCapture:
    """A downstream compiler that keeps the rewritten graphs (then compiles them with Inductor)."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(copy.deepcopy(gm.graph))
        return compile_with_inductor(gm, example_inputs)

    def count(self, target) -> int:
        return sum(1 for g in self.graphs for n in g.nodes if n.op == "call_function" and n.target is target)


def compile_captured(model, config=Fp4Config(), **kwargs):
    capture = GraphCapture()
    return torch.compile(model, backend=Fp4Backend(config, compile_graph=capture), **kwargs), capture


def fake_quant_copy(model: nn.Module, config: Fp4Config, names: list[str]) -> nn.Module:
    """Eager reference: the named linears get dequantized fp4 weights (and fp4 activations)."""
    ref = copy.deepcopy(model)
    for name in names:
        linear = ref.get_submodule(name)
        q = fp4compile.quantize(linear.weight.detach(), config.format, scale_rule=config.scale_rule)
        linear.weight.data = fp4compile.dequantize(q, linear.weight.dtype)
        if config.act_mode == "fp4":
            linear.register_forward_pre_hook(
                lambda m, args: fp4compile.dequantize(fp4compile.quantize(args[0], config.format), args[0].dtype)
            )
    return ref


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def tiny_llama(**overrides) -> nn.Module:
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256, **overrides,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


LLAMA_LINEARS = [f"model.layers.{i}.{p}" for i in range(2) for p in (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]


@pytest.mark.parametrize("config", [Fp4Config(), Fp4Config(format="mxfp4", act_mode="fp4", scale_rule="spec")])
def test_mlp_linears_are_replaced_and_match_fake_quant(config: Fp4Config):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 32), nn.ReLU(), nn.Linear(32, 40))
    x = torch.randn(5, 64)
    ref = fake_quant_copy(model, config, ["0", "2", "4"])
    with torch.no_grad():
        full = model(x)
        expected = ref(x)
        compiled, capture = compile_captured(model, config)
        y = compiled(x)
    assert capture.count(torch.ops.fp4.linear.default) == 3
    assert capture.count(torch.nn.functional.linear) == 0
    assert relative(y, expected) < 1e-5
    assert relative(y, full) < (0.25 if config.act_mode == "fp4" else 0.15)


def test_tiny_llama_quantizes_every_eligible_linear_and_keeps_lm_head():
    model = tiny_llama()
    ids = torch.randint(0, 256, (2, 9))
    config = Fp4Config()
    ref = fake_quant_copy(model, config, LLAMA_LINEARS)
    with torch.no_grad():
        full, expected = model(ids).logits, ref(ids).logits
        compiled, capture = compile_captured(model, config)
        logits = compiled(ids).logits
    assert capture.count(torch.ops.fp4.linear.default) == len(LLAMA_LINEARS)
    assert relative(logits, expected) < 1e-4
    assert relative(logits, full) < 0.2  # random-init logits are small; fp4 weights: ~0.1
    text = fp4compile.report(compiled)
    assert "lm_head" in text and "kept by default" in text
    assert f"{len(LLAMA_LINEARS)} layer(s) quantized" in text


def test_weights_are_quantized_once_across_recompiles_and_a_second_compile(monkeypatch):
    calls = []
    original = quantized_weights.quantize
    monkeypatch.setattr(quantized_weights, "quantize", lambda *a, **k: calls.append(1) or original(*a, **k))
    model = tiny_llama()
    with torch.no_grad():
        compiled = torch.compile(model, backend="fp4")
        for length in (5, 7, 11, 13):
            compiled(torch.randint(0, 256, (1, length)))
        torch.compile(model, backend="fp4")(torch.randint(0, 256, (1, 6)))
    assert len(calls) == len(LLAMA_LINEARS)


def test_varying_sequence_lengths_cause_at_most_one_recompile():
    model = tiny_llama()
    with torch.no_grad():
        compiled = torch.compile(model, backend="fp4")
        for length in (5, 7, 11, 13, 17):
            compiled(torch.randint(0, 256, (1, length)))
    # The second length makes Dynamo mark the sequence dimension dynamic; then no more compiles.
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 2


def test_quantized_weights_release_their_original_memory():
    model = tiny_llama()
    weights = [model.get_submodule(n).weight for n in LLAMA_LINEARS]
    before = sum(w.untyped_storage().nbytes() for w in weights)
    with torch.no_grad():
        torch.compile(model, backend="fp4")(torch.randint(0, 256, (1, 4)))
    after = sum(w.untyped_storage().nbytes() for w in weights)
    quantized = sum(quantized_weights.lookup(w).quantized_bytes for w in weights)
    assert after == 0
    assert quantized <= 0.30 * before / 2  # fp32 weights here: <= 0.30x of their bf16 size
    assert model.lm_head.weight.untyped_storage().nbytes() > 0


def test_release_can_be_turned_off():
    model = nn.Sequential(nn.Linear(32, 32))
    with torch.no_grad():
        torch.compile(model, backend="fp4", options={"release_weights": False})(torch.randn(2, 32))
    assert model[0].weight.untyped_storage().nbytes() > 0
    assert quantized_weights.lookup(model[0].weight) is not None


class WithGraphBreak(nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.second = nn.Linear(32, 64), nn.Linear(64, 16)

    def forward(self, x):
        h = self.first(x)
        torch._dynamo.graph_break()
        return self.second(torch.relu(h))


def test_graph_breaks_send_every_subgraph_through_the_backend():
    model = WithGraphBreak()
    x = torch.randn(3, 32)
    ref = fake_quant_copy(model, Fp4Config(), ["first", "second"])
    with torch.no_grad():
        compiled, capture = compile_captured(model)
        y = compiled(x)
        expected = ref(x)
    assert len(capture.graphs) == 2
    assert capture.count(torch.ops.fp4.linear.default) == 2
    assert relative(y, expected) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_activation_dtypes(dtype: torch.dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48), nn.SiLU(), nn.Linear(48, 16)).to(dtype)
    x = torch.randn(4, 64).to(dtype)
    with torch.no_grad():
        full = model(x)
        y = torch.compile(model, backend="fp4")(x)
    assert y.dtype == dtype
    assert relative(y, full) < 0.15


def test_decorating_a_function_and_a_forward():
    torch.manual_seed(0)
    layer = nn.Linear(32, 16)
    x = torch.randn(3, 32)
    expected = fake_quant_copy(nn.Sequential(layer), Fp4Config(), ["0"])(x)

    @torch.compile(backend="fp4")
    def uses_module(inp):
        return torch.tanh(layer(inp))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(32, 16)

        @torch.compile(backend="fp4")
        def forward(self, inp):
            return self.proj(inp) * 2

    with torch.no_grad():
        assert relative(uses_module(x), torch.tanh(expected)) < 1e-5
        block = Block()
        reference = fake_quant_copy(nn.Sequential(block.proj), Fp4Config(), ["0"])[0](x) * 2
        assert relative(block(x), reference) < 1e-5
    assert "1 layer(s) quantized" in fp4compile.report(block)


def test_model_without_linear_layers_runs_unchanged():
    model = nn.Sequential(nn.ReLU(), nn.LayerNorm(8))
    x = torch.randn(2, 8)
    with torch.no_grad():
        assert torch.allclose(torch.compile(model, backend="fp4")(x), model(x))
    assert "no linear layers" in fp4compile.report(model)


def test_layers_with_unaligned_in_features_are_kept_with_a_reason():
    model = nn.Sequential(nn.Linear(40, 64), nn.Linear(64, 8))
    with torch.no_grad():
        torch.compile(model, backend="fp4")(torch.randn(2, 40))
    text = fp4compile.report(model)
    assert "in_features=40 is not a multiple of the nvfp4 group size 16" in text
    assert "1 layer(s) quantized" in text


def test_include_and_exclude_patterns():
    model = tiny_llama()
    config = Fp4Config(include=["*.mlp.*", "lm_head"], exclude=["*.down_proj"])
    with torch.no_grad():
        _, capture = compile_captured(model, config)
        _(torch.randint(0, 256, (1, 4)))
    assert capture.count(torch.ops.fp4.linear.default) == 2 * 2 + 1  # gate/up per layer + lm_head


def test_bad_options_raise_clear_errors():
    model = nn.Sequential(nn.Linear(32, 32))
    with torch.no_grad(), pytest.raises(Exception, match=r"unknown fp4compile option\(s\) \['fmt'\]"):
        torch.compile(model, backend="fp4", options={"fmt": "mxfp4"})(torch.randn(1, 32))
    with torch.no_grad(), pytest.raises(Exception, match="unknown fp4 format 'fp8'"):
        torch.compile(nn.Linear(32, 32), backend="fp4", options={"format": "fp8"})(torch.randn(1, 32))
    with pytest.raises(TypeError, match="takes an Fp4Config, got dict"):
        fp4compile.backend({"format": "mxfp4"})


def test_entry_point_is_registered():
    names = {ep.name for ep in importlib.metadata.entry_points(group="torch_dynamo_backends")}
    assert "fp4" in names
    assert "fp4" in torch._dynamo.list_backends()


def test_generate_runs_on_the_compiled_model():
    model = tiny_llama()
    ids = torch.randint(0, 256, (1, 5))
    with torch.no_grad():
        model.forward = torch.compile(model.forward, backend="fp4")
        out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 9)


def test_each_model_instance_gets_its_own_quantized_weights():
    """Dynamo reuses compiled code across instances of a class unless a guard says otherwise; the
    fp4 graph bakes one instance's weights in, so a second instance must recompile, not reuse."""
    torch.manual_seed(0)
    first, second = nn.Sequential(nn.Linear(32, 32)), nn.Sequential(nn.Linear(32, 32))
    x = torch.randn(2, 32)
    expected = [fake_quant_copy(m, Fp4Config(), ["0"])(x) for m in (first, second)]
    with torch.no_grad():
        y_first = torch.compile(first, backend="fp4")(x)
        y_second = torch.compile(second, backend="fp4")(x)
        y_first_again = torch.compile(first, backend="fp4")(x)
    assert relative(y_first, expected[0]) < 1e-5
    assert relative(y_second, expected[1]) < 1e-5
    assert torch.equal(y_first_again, y_first)
