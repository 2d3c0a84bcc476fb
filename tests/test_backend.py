"""The fp4 torch.compile backend and the linear pass, on plain modules and tiny HF models (CPU)."""

import importlib.metadata

import pytest
import torch
from compile_helpers import (  # noqa: F401
    FP4_LINEAR,
    compile_captured,
    fake_quant_copy,
    fresh_dynamo,
    relative,
)
from tiny_models import tiny_llama
from torch import nn

import fp4compile
from fp4compile import Fp4Config, quantized_weights

transformers = pytest.importorskip("transformers")


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
    assert capture.count(FP4_LINEAR) == 3
    assert capture.count(torch.nn.functional.linear) == 0
    assert relative(y, expected) < 1e-5
    assert relative(y, full) < (0.25 if config.act_mode == "fp4" else 0.15)


def test_report_lists_quantized_and_kept_layers():
    model = tiny_llama()
    with torch.no_grad():
        torch.compile(model, backend="fp4")(torch.randint(0, 256, (1, 4)))
    text = fp4compile.report(model)
    down_proj_line = next(line for line in text.splitlines() if line.startswith("model.layers.1.mlp.down_proj"))
    assert "64x128" in down_proj_line and "nvfp4" in down_proj_line  # (out, in) = (hidden 64, MLP 128)
    assert "lm_head" in text and "kept by default ('lm_head'" in text
    assert f"{len(LLAMA_LINEARS)} layer(s) quantized" in text and "1 kept in their original dtype" in text
    assert text.count("torch (reference)") == len(LLAMA_LINEARS)


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
    assert capture.count(FP4_LINEAR) == 2
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
    config = Fp4Config(include=["*.mlp.*", "lm_head"], exclude=["*.down_proj"], fuse_projections=False)
    with torch.no_grad():
        _, capture = compile_captured(model, config)
        _(torch.randint(0, 256, (1, 4)))
    assert capture.count(FP4_LINEAR) == 2 * 2 + 1  # gate/up per layer + lm_head


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


def test_compiling_with_grad_enabled_trains_what_stays_in_high_precision():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.LayerNorm(64), nn.Linear(64, 8))
    x = torch.randn(4, 32, requires_grad=True)
    reference = fake_quant_copy(model, Fp4Config(), ["0", "2"])
    compiled = torch.compile(model, backend="fp4")
    compiled(x).square().sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    reference(x_ref).square().sum().backward()
    assert relative(x.grad, x_ref.grad) < 1e-4
    assert relative(model[1].weight.grad, reference[1].weight.grad) < 1e-4
    assert relative(model[2].bias.grad, reference[2].bias.grad) < 1e-4
    assert model[0].weight.grad is None  # fp4 weights are frozen


def test_dynamic_true_compiles_once_for_all_lengths():
    model = tiny_llama()
    with torch.no_grad():
        compiled, capture = compile_captured(model, dynamic=True)
        for length in (3, 8, 21):
            compiled(torch.randint(0, 256, (2, length)))
    # (Dynamo may restart an analysis and call the backend twice for one graph; it counts once.)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert capture.count(FP4_LINEAR, graph=-1) == len(LLAMA_LINEARS) - 3 * 2  # q/k/v and gate/up fused, per layer


def test_one_dimensional_and_non_contiguous_inputs():
    torch.manual_seed(0)
    model = nn.Linear(64, 16)
    reference = fake_quant_copy(nn.Sequential(model), Fp4Config(), ["0"])[0]
    x = torch.randn(64, 5).t()  # non-contiguous (5, 64)
    with torch.no_grad():
        compiled = torch.compile(model, backend="fp4")
        assert relative(compiled(x), reference(x)) < 1e-5
        assert relative(compiled(x[2]), reference(x[2])) < 1e-5  # 1-D


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"format": 4}, TypeError, "Fp4Config.format must be a string"),
        ({"exclude": "lm_head"}, TypeError, "Fp4Config.exclude takes a list .* wrap it in a list"),
        ({"release_weights": "yes"}, TypeError, "Fp4Config.release_weights must be True or False"),
    ],
)
def test_wrong_option_types_raise(options: dict, error: type, match: str):
    # torch.compile calls a backend at the first run and wraps what it raises.
    with torch.no_grad(), pytest.raises(Exception, match=f"{error.__name__}: {match}"):
        torch.compile(nn.Linear(32, 32), backend="fp4", options=options)(torch.randn(1, 32))


def test_a_released_weight_cannot_be_requantized_in_another_format():
    model = nn.Linear(32, 32)
    with torch.no_grad():
        torch.compile(model, backend="fp4")(torch.randn(1, 32))
        torch._dynamo.reset()
        with pytest.raises(Exception, match="already quantized as nvfp4/optimal"):
            torch.compile(model, backend="fp4", options={"format": "mxfp4"})(torch.randn(1, 32))


@pytest.mark.parametrize(
    ("source", "path"),
    [
        ("L['self']._modules['model']._modules['layers']._modules['0']._parameters['weight']", "model.layers.0.weight"),
        ("L['fn']._modules['0']._parameters['weight']", "0.weight"),
        ("G['lin']._parameters['weight']", "lin.weight"),
        ("L['block']._modules['proj']._parameters['bias']", "block.proj.bias"),
    ],
)
def test_module_paths_from_dynamo_sources(source: str, path: str):
    from fp4compile.passes import module_path

    assert module_path(source) == path


def test_unknown_compile_modes_are_refused_before_quantizing():
    model = nn.Linear(32, 32)
    with torch.no_grad(), pytest.raises(Exception, match="unknown torch.compile mode 'fastest' for the fp4 backend"):
        torch.compile(model, backend="fp4", mode="fastest")(torch.randn(1, 32))
    assert quantized_weights.lookup(model.weight) is None


@pytest.mark.parametrize("mode, settings", [
    (None, {}),
    ("reduce-overhead", {"triton.cudagraphs": True}),
    ("max-autotune-no-cudagraphs", {"max_autotune": True, "coordinate_descent_tuning": True}),
])
def test_compile_modes_reach_inductor_as_its_own_settings(mode: str | None, settings: dict):
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 16))
    x = torch.randn(3, 32)
    with torch.no_grad():
        compiled, capture = compile_captured(model, Fp4Config(release_weights=False), mode=mode)
        out = compiled(x)
    assert capture.inductor_options == [settings]
    assert capture.count(FP4_LINEAR) == 2
    assert relative(out, model(x)) < 0.2


def test_compiling_logs_a_summary_at_info(caplog: pytest.LogCaptureFixture):
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 40), nn.Linear(40, 8))
    with torch.no_grad(), caplog.at_level("INFO", logger="fp4compile"):
        torch.compile(model, backend="fp4")(torch.randn(1, 32))
    assert "fp4compile: 2 layer(s) quantized" in caplog.text
    assert "in_features=40 is not a multiple of the nvfp4 group size 16" in caplog.text


def test_weights_that_share_a_storage_are_not_released():
    """Views into one buffer (a fused checkpoint split into views): freeing one would free all."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32, bias=False), nn.Linear(32, 32, bias=False))
    buffer = torch.randn(64, 32)
    model[0].weight, model[1].weight = nn.Parameter(buffer[:32]), nn.Parameter(buffer[32:])
    x = torch.randn(3, 32)
    expected = fake_quant_copy(model, Fp4Config(), ["0", "1"])(x)
    with torch.no_grad():
        compiled = torch.compile(model, backend="fp4")
        assert relative(compiled(x), expected) < 1e-5
        assert relative(compiled(x), expected) < 1e-5
    assert buffer.untyped_storage().nbytes() == 64 * 32 * 4


def test_keeping_a_released_weight_in_a_later_compile_raises_clearly():
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32))
    with torch.no_grad():
        torch.compile(model, backend="fp4")(torch.randn(1, 32))
        torch._dynamo.reset()
        with pytest.raises(Exception, match="2 is now kept in its original dtype .* release_weights=False"):
            torch.compile(model, backend="fp4", options={"exclude": ["2"]})(torch.randn(1, 32))


def test_module_names_that_flatten_alike_keep_their_own_weights():
    torch.manual_seed(0)
    model = nn.Module()
    model.mlp = nn.Module()
    model.mlp.fc_1 = nn.Linear(32, 32)
    model.mlp_fc = nn.ModuleList([nn.Identity(), nn.Linear(32, 32)])
    model.forward = lambda x: model.mlp.fc_1(x) + 2 * model.mlp_fc[1](x)
    x = torch.randn(3, 32)
    reference = fake_quant_copy(model, Fp4Config(), ["mlp.fc_1", "mlp_fc.1"])
    expected = reference.mlp.fc_1(x) + 2 * reference.mlp_fc[1](x)
    with torch.no_grad():
        y = torch.compile(model.forward, backend="fp4")(x)
    assert relative(y, expected) < 1e-5


@pytest.mark.parametrize("config", [Fp4Config(), Fp4Config(act_mode="fp4")])
def test_an_empty_batch(config: Fp4Config):
    model = nn.Linear(32, 16)
    with torch.no_grad():
        y = torch.compile(model, backend=fp4compile.backend(config))(torch.randn(0, 32))
    assert y.shape == (0, 16)
