"""The projection-fusion pass: quantized layers on one input run as one fp4::linear (CPU)."""

import pytest
import torch
import torch.nn.functional as F
from compile_helpers import FP4_LINEAR, GraphCapture, fake_quant_copy, fresh_dynamo, relative  # noqa: F401
from torch import nn

import fp4compile
from fp4compile import Fp4Config, quantized_weights
from fp4compile.backend import Fp4Backend
from test_linear_pass import FAMILIES, compile_tiny


class Block(nn.Module):
    """Attention-like and MLP-like projections: q/k/v on one input, gate/up on another."""

    def __init__(self, bias: bool = False):
        super().__init__()
        self.q_proj = nn.Linear(64, 64, bias=bias)
        self.k_proj = nn.Linear(64, 32, bias=bias)
        self.v_proj = nn.Linear(64, 32, bias=bias)
        self.gate_proj = nn.Linear(64, 96, bias=False)
        self.up_proj = nn.Linear(64, 96, bias=False)
        self.down_proj = nn.Linear(96, 64, bias=False)

    def forward(self, x):
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        # view() splits the last dimension, as attention code does with heads
        h = q.view(*q.shape[:-1], 4, 16).flatten(-2) + torch.cat([k, v], -1)
        return self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


LAYERS = ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]


def compile_block(model: nn.Module, config: Fp4Config, x: torch.Tensor) -> tuple[torch.Tensor, GraphCapture]:
    capture = GraphCapture()
    with torch.no_grad():
        return torch.compile(model, backend=Fp4Backend(config, capture))(x), capture


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
@pytest.mark.parametrize("act_mode", ["none", "fp4"])
@pytest.mark.parametrize("bias", [False, True])
def test_projections_on_one_input_run_as_one_gemm_with_the_separate_layers_results(fmt, act_mode, bias):
    torch.manual_seed(0)
    model = Block(bias)
    config = Fp4Config(format=fmt, act_mode=act_mode)
    x = torch.randn(3, 5, 64)
    expected = fake_quant_copy(model, config, LAYERS)(x)
    out, capture = compile_block(model, config, x)
    assert capture.count(FP4_LINEAR) == 3  # q/k/v, gate/up, down
    assert capture.count(torch.cat) == (2 if bias else 1)  # the block's own cat, and the q/k/v biases'
    assert relative(out, expected) < 1e-5


def test_nvfp4_layers_keep_their_own_global_scales_as_one_per_row():
    torch.manual_seed(0)
    model = Block()
    with torch.no_grad():
        model.k_proj.weight.mul_(8)  # a global scale 8x q's
    compile_block(model, Fp4Config(), torch.randn(2, 64))
    views = [quantized_weights.lookup(getattr(model, name).weight).quantized for name in ("q_proj", "k_proj", "v_proj")]
    fused = quantized_weights.fuse_once([getattr(model, name).weight for name in ("q_proj", "k_proj", "v_proj")])
    assert fused.out_features == (64, 32, 32)
    expected = torch.cat([q.global_scale.reshape(1).expand(q.packed.shape[0]) for q in views])
    assert fused.quantized.global_scale.shape == (128,)
    assert torch.equal(fused.quantized.global_scale, expected)
    assert not torch.equal(views[0].global_scale, views[1].global_scale)


def test_each_layer_stores_a_view_of_the_fused_weight_and_recompiles_reuse_it():
    torch.manual_seed(0)
    model = Block()
    config = Fp4Config(format="mxfp4")
    compiled = torch.compile(model, backend=Fp4Backend(config, GraphCapture()), dynamic=False)
    weights = [model.q_proj.weight, model.k_proj.weight, model.v_proj.weight]
    with torch.no_grad():
        compiled(torch.randn(2, 64))
        fused = quantized_weights.fuse_once(weights)
        storage = fused.quantized.packed.untyped_storage().data_ptr()
        for w in weights:
            assert quantized_weights.lookup(w).quantized.packed.untyped_storage().data_ptr() == storage
        compiled(torch.randn(7, 64))  # another shape: a recompile
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2
    assert quantized_weights.fuse_once(weights) is fused
    report = fp4compile.report(compiled)
    assert "one GEMM with q_proj, v_proj" in report.splitlines()[2]  # k_proj's line


class Unfusable(nn.Module):
    """Layers on one input that must stay separate: bias on one only, and a weight used twice."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(64, 32, bias=True)
        self.b = nn.Linear(64, 32, bias=False)
        self.shared = nn.Linear(64, 32, bias=False)

    def forward(self, x):
        return self.a(x) + self.b(x), self.shared(x) * self.shared(x)


def test_layers_with_and_without_bias_or_a_weight_used_twice_stay_separate():
    torch.manual_seed(0)
    model = Unfusable()
    x = torch.randn(4, 64)
    config = Fp4Config()
    expected = fake_quant_copy(model, config, ["a", "b", "shared"])(x)
    out, capture = compile_block(model, config, x)
    # a has a bias and b not; shared is applied twice, so b has no partner left: 4 separate GEMMs
    assert capture.count(FP4_LINEAR) == 4
    for got, want in zip(out, expected):
        assert relative(got, want) < 1e-5


def test_fusion_can_be_turned_off():
    torch.manual_seed(0)
    _, capture = compile_block(Block(), Fp4Config(fuse_projections=False), torch.randn(2, 64))
    assert capture.count(FP4_LINEAR) == 6


GEMMS_PER_LAYER = {"llama": 4, "qwen3": 4, "mistral": 4, "gemma": 4, "phi3": 4, "gpt2": 4}
"""fp4::linear calls per decoder layer after fusion: q/k/v and gate/up fused where they are
separate modules; Phi-3 and GPT-2 store them fused already (nothing to do)."""


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_models_fuse_their_projections_and_match_fake_quant(family: str):
    _, eligible, reference, capture, compiled = compile_tiny(family, Fp4Config())
    with torch.no_grad():
        ids = torch.randint(0, 256, (2, 9))
        logits, expected = compiled(ids).logits, reference(ids).logits
    assert capture.count(FP4_LINEAR, graph=0) == GEMMS_PER_LAYER[family] * 2
    assert relative(logits, expected) < 1e-4
    assert f"{len(eligible)} layer(s) quantized" in fp4compile.report(compiled)
